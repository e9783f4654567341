"""Throughput and memory of ``ssr eval`` (ssr_cli.stages.evaluate.evaluate).

Writes 4N synthetic 500x375 palette-PNG (GT, prediction) pairs to a temporary
folder, then times ``evaluate`` on N images with 1 and 2 workers, and on N and
4N images with 2 workers. Each measurement runs in a fresh subprocess so its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; flat
memory means the 4N peak is about the N peak.

Usage: python benchmarks/bench_eval.py [--n 400] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

H, W = 375, 500


def _synthetic_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A VOC-like GT (background, 1-3 blobs of classes 1..20, a 255 band) and a noisy prediction."""
    yy, xx = np.mgrid[0:H, 0:W]
    gt = np.zeros((H, W), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.integers(40, H - 40), rng.integers(40, W - 40)
        ry, rx = rng.integers(20, 150), rng.integers(20, 200)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        ring = ((yy - cy) / (ry + 4)) ** 2 + ((xx - cx) / (rx + 4)) ** 2 <= 1.0
        gt[ring & ~inside] = 255
        gt[inside] = rng.integers(1, 21)
    pred = np.roll(gt, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), axis=(0, 1))
    pred[pred == 255] = 0
    noise = rng.random((H, W)) < 0.01
    pred[noise] = rng.integers(0, 21, int(noise.sum()))
    pred[rng.random((H, W)) < 0.005] = 255
    return gt, pred


def _write(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(labels, mode="P")
    image.putpalette([(i * 37) % 256 for i in range(768)])
    image.save(path)


def make_data(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("gt", "pred"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        gt, pred = _synthetic_pair(rng)
        _write(root / "gt" / f"img_{i:05d}.png", gt)
        _write(root / "pred" / f"img_{i:05d}.png", pred)


def subset(src: Path, dst: Path, count: int) -> None:
    """Hard links to the first ``count`` pairs of ``src``."""
    for sub in ("gt", "pred"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / sub).glob("*.png"))[:count]:
            os.link(path, dst / sub / path.name)


def child(folder: Path, workers: int) -> None:
    from ssr_cli.stages.evaluate import evaluate

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = evaluate(folder / "pred", gt_dir=folder / "gt", num_classes=21, workers=workers)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "images": report["summary"]["images"],
                "seconds": seconds,
                "miou": report["summary"]["miou"],
                "rss_before_kb": rss_before,
                "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def measure(folder: Path, workers: int) -> dict:
    env = dict(os.environ, SSR_QUIET="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), "--workers", str(workers)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=400, help="images in the small set (the large one has 4N)")
    parser.add_argument("--keep", type=Path, default=None, help="write the data here and keep it")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.workers)
        return

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = args.keep or Path(tmp)
        n = args.n
        start = time.perf_counter()
        make_data(root / "large", 4 * n)
        subset(root / "large", root / "small", n)
        print(
            f"wrote {4 * n} synthetic {W}x{H} pairs in {time.perf_counter() - start:.1f} s "
            f"({os.cpu_count()} CPUs)"
        )

        runs = {}
        for name, folder, workers in (
            ("N, 1 worker", root / "small", 1),
            ("N, 2 workers", root / "small", 2),
            ("4N, 2 workers", root / "large", 2),
        ):
            measure(folder, workers)  # warm the page cache and imports
            runs[name] = result = measure(folder, workers)
            rate = result["images"] / result["seconds"]
            print(
                f"{name:>14}: {result['images']:5d} images in {result['seconds']:6.2f} s = "
                f"{rate:7.1f} images/s; "
                f"peak RSS {result['peak_rss_kb'] / 1024:6.1f} MiB "
                f"(after imports {result['rss_before_kb'] / 1024:6.1f} MiB); mIoU {result['miou']:.4f}"
            )
        one, two, big = runs["N, 1 worker"], runs["N, 2 workers"], runs["4N, 2 workers"]
        speedup = (two["images"] / two["seconds"]) / (one["images"] / one["seconds"])
        print(f"speed-up 2 workers vs 1: {speedup:.2f}x")
        print(
            f"peak RSS 4N vs N: {big['peak_rss_kb'] / 1024:.1f} vs {two['peak_rss_kb'] / 1024:.1f} MiB "
            f"(+{(big['peak_rss_kb'] - two['peak_rss_kb']) / 1024:.1f} MiB for {3 * n} more images)"
        )


if __name__ == "__main__":
    main()
