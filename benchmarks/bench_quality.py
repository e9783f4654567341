#!/usr/bin/env python
"""Pseudo-label quality on the proving ground: the paper's ablation table on the synthetic world.

    python benchmarks/bench_quality.py            # 300 train + 100 val images (about 20-30 min here)
    python benchmarks/bench_quality.py --quick    # 200 train + 50 val, shorter training (<= 10 min)
    python benchmarks/bench_quality.py --quick --json

Every row runs the real commands (`python -m ssr_cli ...`) with the committed tiny models
(`examples/models/`: a CLIP and a DINO trained on this world by `scripts/train_tiny_clip.py`
and `scripts/train_tiny_dino.py`) on a world seed those models never saw. Seeds and
pseudo-labels are scored on the train split, the segmenter on the val split, as the VOC
protocol does (precision, recall and mIoU in %, one confusion matrix per row). Rows:

| row | what runs |
|---|---|
| CAM (random weights) | make-seeds with the same tiny architecture, untrained (`--clip-weights random`) |
| CAM | make-seeds with the trained tiny CLIP |
| +CMPA | train-cmpa on the train split, then make-seeds `--cmpa` |
| +CLIP attention | refine `--affinity clip --mask none --no-crf` on the +CMPA seeds |
| +DINO attention | refine `--affinity clip+dino --mask none --no-crf` |
| +SGC | refine `--affinity clip+dino --mask sgc --no-crf` |
| +CRF | refine `--affinity clip+dino --mask sgc --crf --conf-thresh 0` (plain CRF argmax) |
| segmenter (val) | fit-seg on the +SGC+CRF pseudo-labels (255 where the CRF is unsure), predict on val |
| single-stage (val) | `ssr train` (single-stage SSR: CMPA + decoder on online pseudo-masks), predict on val |

CAM rows (up to +SGC) pick their background rule against the ground truth
(`ssr eval --search-bg`), as the protocol does; refine rows are searched on their refined
CAMs (`--save-cams`). `--json` prints `{"rows": [{"name", "precision", "recall", "miou"}],
"seconds_per_image": {stage: s}}`; seconds per image come from each run's manifest
(`timing.runs[].loop_seconds`, the item loop without start-up; training stages: seconds per
image seen); `seconds_per_iteration` compares the two ways to a segmenter: fit-seg's and the
single-stage `ssr train`'s training loop seconds (manifest `summary.seconds`) per iteration.
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
ROW_NAMES = (
    "CAM (random weights)",
    "CAM",
    "+CMPA",
    "+CLIP attention",
    "+DINO attention",
    "+SGC",
    "+CRF",
    "segmenter (val)",
    "single-stage (val)",
)


def settings(quick: bool) -> dict:
    """Sizes of one run; `quick` keeps the whole table under 10 minutes on 2 CPU cores."""
    if quick:
        return {"images": 250, "val_fraction": 0.2, "cmpa_iters": 60, "seg_iters": 150, "ssr_iters": 150}
    return {"images": 400, "val_fraction": 0.25, "cmpa_iters": 200, "seg_iters": 400, "ssr_iters": 400}


class Runner:
    def __init__(self, work: Path, threads: int, verbose: bool) -> None:
        self.work, self.verbose = work, verbose
        self.env = dict(
            os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), SSR_CACHE=str(work / "cache")
        )
        self.clip = ["--clip-arch", str(MODELS / "ssr-tiny-clip.json")]
        self.data = ["--data", str(work / "data")]

    def ssr(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "ssr_cli", "--quiet", *args]
        if self.verbose:
            print("$ ssr " + " ".join(args), file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench_quality: `ssr {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def score(self, run: Path, split: str, search: bool) -> dict:
        extra = ["--search-bg"] if search else []
        report = json.loads(self.ssr("eval", str(run), *self.data, "--split", split, "--json", *extra))
        summary = report["summary"]
        return {
            k: round(100 * float(summary[v]), 1)
            for k, v in (("precision", "mprecision"), ("recall", "mrecall"), ("miou", "miou"))
        }


def loop_seconds_per_image(run: Path) -> float | None:
    manifest = json.loads((run / "manifest.json").read_text())
    runs = (manifest.get("timing") or {}).get("runs") or []
    seconds = sum(float(r.get("loop_seconds", r.get("seconds", 0.0))) for r in runs)
    count = sum(int(r.get("items", 0)) for r in runs) or manifest.get("count") or manifest.get("items")
    if isinstance(count, dict):
        count = count.get("done") or count.get("total")
    return round(seconds / count, 4) if seconds and count else None


def loop_seconds_per_iteration(run: Path) -> float | None:
    """A training run's loop seconds (``summary.seconds``: steps, validation, checkpoints) per iteration."""
    summary = json.loads((run / "manifest.json").read_text()).get("summary") or {}
    iters = summary.get("iterations")
    return round(float(summary["seconds"]) / iters, 4) if iters and summary.get("seconds") else None


def run_table(work: Path, quick: bool, threads: int, verbose: bool) -> dict:
    s = settings(quick)
    r = Runner(work, threads, verbose)
    timings: dict[str, float | None] = {}
    started = time.perf_counter()
    r.ssr(
        "data",
        "synth",
        "--out",
        str(work / "data"),
        "--images",
        str(s["images"]),
        "--seed",
        "0",
        "--val-fraction",
        str(s["val_fraction"]),
    )
    timings["synth"] = round((time.perf_counter() - started) / s["images"], 4)
    train = ["--split", "train"]
    rows = []

    def seeds(name: str, *extra: str) -> Path:
        out = work / name
        r.ssr("make-seeds", *r.data, *train, "--out", str(out), *r.clip, *extra)
        return out

    rows.append(
        ("CAM (random weights)", r.score(seeds("seeds-random", "--clip-weights", "random"), "train", True))
    )
    clip_w = ["--clip-weights", str(MODELS / "tiny_clip.pt")]
    cam = seeds("seeds", *clip_w)
    timings["make-seeds"] = loop_seconds_per_image(cam)
    rows.append(("CAM", r.score(cam, "train", True)))
    cmpa = work / "cmpa"
    t0 = time.perf_counter()
    r.ssr(
        "train-cmpa",
        *r.data,
        *train,
        "--out",
        str(cmpa),
        *r.clip,
        *clip_w,
        "--iters",
        str(s["cmpa_iters"]),
        "--batch-size",
        "16",
        "--size",
        "160",
        "--proto-every",
        "25",
        "--dim",
        "64",
    )
    timings["train-cmpa (per image seen)"] = round((time.perf_counter() - t0) / (s["cmpa_iters"] * 16), 4)
    seeds_cmpa = seeds("seeds-cmpa", *clip_w, "--cmpa", str(cmpa))
    rows.append(("+CMPA", r.score(seeds_cmpa, "train", True)))
    dino = [
        "--dino-model",
        str(MODELS / "ssr-tiny-dino.json"),
        "--dino-weights",
        str(MODELS / "tiny_dino.pth"),
    ]

    def refine(name: str, *extra: str) -> Path:
        out = work / name
        r.ssr("refine", "--seeds", str(seeds_cmpa), "--out", str(out), *dino, *extra)
        return out

    for name, affinity, mask in (
        ("+CLIP attention", "clip", "none"),
        ("+DINO attention", "clip+dino", "none"),
        ("+SGC", "clip+dino", "sgc"),
    ):
        run = refine(
            f"refine-{affinity}-{mask}", "--affinity", affinity, "--mask", mask, "--no-crf", "--save-cams"
        )
        rows.append((name, r.score(run, "train", True)))
    crf = refine("refine-crf-argmax", "--conf-thresh", "0")
    timings["refine (SGC + CRF)"] = loop_seconds_per_image(crf)
    rows.append(("+CRF", r.score(crf, "train", False)))
    pseudo = refine("refine-crf")
    seg = work / "seg"
    t0 = time.perf_counter()
    r.ssr(
        "fit-seg",
        *r.data,
        *train,
        "--pseudo",
        str(pseudo),
        "--out",
        str(seg),
        "--backbone",
        "resnet18",
        "--no-pretrained",
        "--iters",
        str(s["seg_iters"]),
        "--batch-size",
        "8",
        "--crop-size",
        "192",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--head-lr-mult",
        "1",
        "--val-every",
        "0",
        "--save-every",
        str(s["seg_iters"]),
    )
    timings["fit-seg (per image seen)"] = round((time.perf_counter() - t0) / (s["seg_iters"] * 8), 4)
    pred = work / "pred"
    r.ssr("predict", "--model", str(seg), *r.data, "--split", "val", "--out", str(pred))
    timings["predict"] = loop_seconds_per_image(pred)
    rows.append(("segmenter (val)", r.score(pred, "val", False)))
    single = work / "single-stage"
    t0 = time.perf_counter()
    r.ssr("train", *r.data, *train, "--out", str(single), *r.clip, *clip_w, *dino, "--iters",
          str(s["ssr_iters"]), "--batch-size", "8", "--size", "160", "--proto-every", "50", "--dim", "64",
          "--save-every", str(s["ssr_iters"]))  # fmt: skip
    timings["train, single-stage (per image seen)"] = round(
        (time.perf_counter() - t0) / (s["ssr_iters"] * 8), 4
    )
    pred_single = work / "pred-single-stage"
    r.ssr("predict", "--model", str(single), *r.data, "--split", "val", "--out", str(pred_single))
    rows.append(("single-stage (val)", r.score(pred_single, "val", False)))
    return {
        "rows": [{"name": name, **score} for name, score in rows],
        "seconds_per_image": timings,
        "seconds_per_iteration": {
            "fit-seg (batch 8, crop 192)": loop_seconds_per_iteration(seg),
            "train, single-stage (batch 8, size 160)": loop_seconds_per_iteration(single),
        },
        "settings": s,
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict) -> str:
    lines = ["| row | precision | recall | mIoU |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['precision']:.1f} | {row['recall']:.1f} | {row['miou']:.1f} |")
    lines += ["", "| stage | seconds per image |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["seconds_per_image"].items()]
    lines += ["", "| training loop | seconds per iteration |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.get("seconds_per_iteration", {}).items()]
    lines += ["", f"total {result['seconds']} s; settings {json.dumps(result['settings'])}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (at most 10 minutes here)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--work", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="compute threads per command")
    parser.add_argument("-v", "--verbose", action="store_true", help="echo each command on stderr")
    parser.add_argument("--models", type=Path, help="folder of the tiny models (default: examples/models)")
    args = parser.parse_args()
    global MODELS
    MODELS = (args.models or MODELS).resolve()
    for name in ("ssr-tiny-clip.json", "tiny_clip.pt", "ssr-tiny-dino.json", "tiny_dino.pth"):
        if not (MODELS / name).is_file():
            raise SystemExit(f"bench_quality: {MODELS / name} is missing (see scripts/train_tiny_*.py)")
    work = args.work or Path(tempfile.mkdtemp(prefix="ssr-bench-quality-"))
    if args.work and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        result = run_table(work, args.quick, args.threads, args.verbose)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
