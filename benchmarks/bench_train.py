#!/usr/bin/env python
"""Speed of `ssr train` (single-stage SSR) on this machine: seconds per iteration, peak memory,
and the share of a step spent producing the online pseudo-masks.

    python benchmarks/bench_train.py                 # tiny models and ViT-B/16, both at --size 448
    python benchmarks/bench_train.py --only tiny     # the committed tiny CLIP + DINO only
    python benchmarks/bench_train.py --json

Each configuration runs the real command (`python -m ssr_cli train`) on a small synthetic world
(`ssr data synth`) at the default resolution (`--size 448`, `--batch-size 4`, default decoder):

- `tiny`: the committed tiny CLIP and DINO (`examples/models/`), the proving ground's models;
- `vit-b16`: CLIP ViT-B/16 and DINO ViT-B/16 with RANDOM weights (`--clip-weights random
  --dino-weights random`): the paper's model sizes, whose cost does not depend on the weights.
  The heads start from a random projection (`--head-init random`, no embedding pass).

Seconds per iteration are the steps' own time (`summary.seconds_per_iter`: batch decoding,
CLIP forward and GradCAM, pseudo-masks, forward, update), without the prototype refresh at
iteration 0 and the one-time superpixels of each image (`superpixel_seconds`, reported
apart). `pseudo_share` is the pseudo-masks' part of that step time (DINO attention, affinity
fusion, SGC masks, propagation, background rule); `time_share` splits the rest. Peak memory
is the process's peak resident set (`max_rss_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"
CONFIGS = {
    "tiny": [
        "--clip-arch", str(MODELS / "ssr-tiny-clip.json"), "--clip-weights", str(MODELS / "tiny_clip.pt"),
        "--dino-model", str(MODELS / "ssr-tiny-dino.json"), "--dino-weights", str(MODELS / "tiny_dino.pth"),
        "--init-images", "16",
    ],
    "vit-b16": [
        "--clip-arch", "ViT-B-16", "--clip-weights", "random", "--dino-model", "dino_vitb16",
        "--dino-weights", "random", "--head-init", "random",
    ],
}  # fmt: skip


def run(work: Path, name: str, iters: int, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), SSR_CACHE=str(work / "cache"))
    out = work / f"run-{name}"
    cmd = [sys.executable, "-m", "ssr_cli", "--quiet", "train", "--data", str(work / "data"), "--split",
           "train", "--out", str(out), *CONFIGS[name], "--iters", str(iters), "--proto-every",
           str(10 * iters), "--save-every", str(iters), "--log-every", str(iters), "--workers", "1",
           "--device", "cpu"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_train: {name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    return {
        "name": name,
        "seconds_per_iter": summary["seconds_per_iter"],
        "pseudo_share": summary["pseudo_share"],
        "time_share": summary["time_share"],
        "max_rss_mb": summary["max_rss_mb"],
        "prototype_seconds": summary["prototype_seconds"],
        "superpixel_seconds": summary["superpixel_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "iters": iters,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| models | s / iteration | pseudo-masks share | CLIP + GradCAM | forward | update | data "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_share"]
        lines.append(
            f"| {r['name']} | {r['seconds_per_iter']:.3f} | {100 * r['pseudo_share']:.1f} % | "
            f"{100 * t['clip']:.1f} % | {100 * t['forward']:.1f} % | {100 * t['update']:.1f} % | "
            f"{100 * t['data']:.1f} % | {r['max_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(CONFIGS), help="one configuration only")
    parser.add_argument("--iters", type=int, default=0, help="iterations (default: 20 tiny, 4 vit-b16)")
    parser.add_argument("--images", type=int, default=16, help="training images of the synthetic world")
    parser.add_argument("--threads", type=int, default=2, help="compute threads")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssr-bench-train-"))
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        synth = [sys.executable, "-m", "ssr_cli", "--quiet", "data", "synth", "--out", str(work / "data"),
                 "--images", str(args.images), "--seed", "7", "--val-fraction", "0"]  # fmt: skip
        subprocess.run(synth, env=env, cwd=REPO, check=True, capture_output=True)
        names = [args.only] if args.only else list(CONFIGS)
        rows = [run(work, n, args.iters or (20 if n == "tiny" else 4), args.threads) for n in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
