"""Speed and memory of ``ssr fit-seg`` and ``ssr predict`` (a benchmark, not a test).

Measures, on a synthetic dataset of VOC-sized images (500x375, coloured shapes):

- training images/s and peak resident memory at the default crop (321) with
  batch 2 and a randomly initialised ResNet backbone (default resnet50), for
  ``--workers 0`` and ``--workers 2``, and the share of each step spent waiting
  for data (``data_share`` in log.jsonl; the goal is under 10% with 2 workers);
- ``predict`` images/s, single scale and with ``--scales 0.75,1.0,1.25 --flip``.

Every configuration runs as its own ``python -m ssr_cli`` process (so peak memory
is per configuration); the first logged iteration (warm-up) is left out of the
averages. Usage::

    python benchmarks/bench_segmenter.py [--backbone resnet50] [--iters 6] [--device cpu]

Prints a table on stderr and one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(args: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSR_QUIET="1")
    done = subprocess.run([sys.executable, "-m", "ssr_cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"command failed: ssr {' '.join(args)}\n{done.stderr[-2000:]}")


def bench_train(data: Path, out: Path, opts: argparse.Namespace, workers: int) -> dict:
    _run([
        "fit-seg", "--data", str(data), "--split", "train", "--pseudo", str(data / "masks"),
        "--out", str(out), "--backbone", opts.backbone, "--no-pretrained", "--iters", str(opts.iters),
        "--batch-size", str(opts.batch_size), "--crop-size", str(opts.crop_size), "--log-every", "1",
        "--save-every", str(10 * opts.iters), "--device", opts.device, "--workers", str(workers),
    ])  # fmt: skip
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r][1:]  # drop the warm-up iteration
    return {
        "workers": workers,
        "images_per_s": round(statistics.median(r["images_per_s"] for r in steps), 3),
        "data_share": round(statistics.mean(r["data_share"] for r in steps), 4),
        "max_rss_mb": records[-1]["max_rss_mb"],
        "max_gpu_mb": records[-1].get("max_gpu_mb"),
        "seconds_per_step": round(opts.batch_size / statistics.median(r["images_per_s"] for r in steps), 3),
    }


def bench_predict(model: Path, images: Path, out: Path, opts: argparse.Namespace, extra: list[str]) -> dict:
    _run(["predict", "--model", str(model), "--images", str(images), "--out", str(out),
          "--device", opts.device, "--workers", "2", *extra])  # fmt: skip
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    return {"options": " ".join(extra) or "single scale", "images_per_s": summary["images_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop-size", type=int, default=321)
    parser.add_argument("--images", type=int, default=16, help="synthetic training images")
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()

    from ssr_cli.seg.synthetic import make_shapes_dataset

    with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
        root = Path(tmp)
        data = make_shapes_dataset(root / "data", {"train": opts.images}, size=(375, 500), seed=0)
        train = [bench_train(data, root / f"train_w{w}", opts, w) for w in (0, 2)]
        images = root / "predict_images"
        images.mkdir()
        for path in sorted((data / "images").glob("*.png"))[:8]:
            (images / path.name).symlink_to(path)
        model = root / "train_w0"
        predict = [
            bench_predict(model, images, root / "pred1", opts, []),
            bench_predict(model, images, root / "pred3", opts, ["--scales", "0.75,1.0,1.25", "--flip"]),
        ]
    import torch

    result = {
        "backbone": opts.backbone,
        "crop_size": opts.crop_size,
        "batch_size": opts.batch_size,
        "device": opts.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "train": train,
        "predict": predict,
    }
    for row in train:
        print(
            f"train {opts.backbone} crop {opts.crop_size} batch {opts.batch_size} workers {row['workers']}: "
            f"{row['images_per_s']:.2f} img/s, {row['seconds_per_step']:.2f} s/step, "
            f"data {100 * row['data_share']:.1f}% of the step, peak RSS {row['max_rss_mb']:.0f} MiB",
            file=sys.stderr,
        )
    for row in predict:
        print(f"predict 500x375 ({row['options']}): {row['images_per_s']:.2f} img/s", file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
