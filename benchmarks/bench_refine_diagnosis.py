#!/usr/bin/env python
"""Why refinement helps or not on the proving ground: measurements behind the +CRF row of bench_quality.

    python benchmarks/bench_quality.py --quick --work /tmp/bq      # first: the run folders
    python benchmarks/bench_refine_diagnosis.py --work /tmp/bq       # then this (about 1 min here)
    python benchmarks/bench_refine_diagnosis.py --work /tmp/bq --json

It reads the run folders that ``bench_quality.py --work`` kept (the synthetic data, the +CMPA
seeds with their CLIP attention, the full refine run ``refine-crf-argmax``) and measures, on
the train split:

1. **Attention shape.** For the tiny CLIP's attention (saved in the seeds) and the tiny
   DINO's (computed on the CLIP patch grid), the share of a patch's attention that lands on
   its own object, averaged over the patches inside objects, raw and after the affinity
   transform (``fuse_affinity``: Sinkhorn, symmetrise, square); "uniform" is the share an
   attention spread evenly would give (the object's share of the patches). Also the share
   of the background patches' attention that lands on objects, and the share of a badge
   patch's affinity that lands on the body of its object (next to the body's share of the
   patches). An affinity can only pass CAM mass along an object when its own-object share is
   well above uniform, and from the badge to the body when that share is.
2. **What the CRF can do.** CAMs shaped like the ground truth at the 16-pixel patch grid
   (each class's area share of each patch cell), labelled without and with the dense CRF
   (plain argmax, the +CRF row's rule): the gap is what boundary refinement alone is worth
   in this world when the CAM is right at the patch level.
3. **CAM + CRF without affinity** (``refine --affinity none --mask none``), next to the full
   pipeline (``refine-crf-argmax``), both scored like the +CRF row.
4. **Floods.** Per background kind of the world, the share of images whose background is
   mostly (> 30%) labelled as an object class, for both runs of 3: whole images lost to a
   wrong CAM (co-occurrence, camouflage), which no boundary or affinity step can repair.
5. **Object size**: the median number of patch cells whose centre lies in an object.
6. **Partial activation.** Each object's class is shown by its badge (``ssr data synth``);
   its body looks like any class's. For each object, the mean of its class's CAM (the +CMPA
   seeds, upsampled to the image) on its badge, its body and the background; and the share
   of badge and body pixels that the two runs of 3 label with the right class. Affinity
   propagation exists to carry a CAM from the discriminative part (the badge) to the rest.
7. **Oracle affinity.** The +CMPA seeds refined (no mask, then the CRF, plain argmax) with an
   affinity that links the patches of each ground-truth object evenly and leaves background
   patches to themselves: what an affinity that groups whole objects would give here, next
   to the CAM and to CAM + CRF (3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_quality import Runner  # benchmarks/: the same command runner and scoring

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "examples" / "models"
FLOOD = 0.3  # an image floods when more than this share of its background is labelled as an object


def patch_labels(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The ground-truth label at the centre of each patch cell, ``[gh * gw]`` (255 read as background)."""
    height, width = mask.shape
    ys = ((np.arange(grid[0]) + 0.5) * height / grid[0]).astype(int)
    xs = ((np.arange(grid[1]) + 0.5) * width / grid[1]).astype(int)
    labels = mask[ys[:, None], xs[None, :]].reshape(-1).astype(int)
    labels[labels == 255] = 0
    return labels


def attention_shares(
    attn: np.ndarray, labels: np.ndarray, badge: np.ndarray | None = None
) -> dict[str, list[float]]:
    """Own-object shares (raw and fused) per object, uniform share, background-to-object share;
    with ``badge`` (bool per patch), also the share of a badge patch's fused affinity that lands
    on its object's body, and the body's share of the patches (uniform)."""
    import torch

    from ssr_cli.refine.affinity import fuse_affinity

    fused = fuse_affinity({"clip": torch.from_numpy(attn.astype(np.float32))}).numpy()
    out: dict[str, list[float]] = {"raw": [], "fused": [], "uniform": [], "bg_to_objects": []}
    for value in np.unique(labels):
        if value == 0:
            continue
        own = labels == value
        out["raw"].append(float((attn[own][:, own].sum(1) / attn[own].sum(1)).mean()))
        out["fused"].append(float((fused[own][:, own].sum(1) / fused[own].sum(1)).mean()))
        out["uniform"].append(float(own.mean()))
        if badge is not None and (own & badge).any() and (own & ~badge).any():
            part, body = own & badge, own & ~badge
            out.setdefault("badge_to_body", []).append(
                float((fused[part][:, body].sum(1) / fused[part].sum(1)).mean())
            )
            out.setdefault("body_uniform", []).append(float(body.mean()))
    background, objects = labels == 0, labels > 0
    if background.any() and objects.any():
        out["bg_to_objects"].append(
            float((attn[background][:, objects].sum(1) / attn[background].sum(1)).mean())
        )
    return out


def merge(total: dict[str, list[float]], part: dict[str, list[float]]) -> None:
    for key, values in part.items():
        total.setdefault(key, []).extend(values)


def summarise(shares: dict[str, list[float]]) -> dict[str, float]:
    return {key: round(100 * float(np.mean(values)), 1) for key, values in shares.items() if values}


class Work(Runner):
    """The bench_quality run folders, and bench_quality's way to run and score commands on them."""

    def __init__(self, root: Path, threads: int) -> None:
        super().__init__(root, threads, verbose=False)
        self.root = root
        self.data_dir = root / "data"
        self.seeds = root / "seeds-cmpa"
        for need in (self.data_dir / "splits" / "train.txt", self.seeds / "manifest.json"):
            if not need.is_file():
                raise SystemExit(
                    f"bench_refine_diagnosis: {need} is missing; "
                    f"run: python benchmarks/bench_quality.py --quick --work {root}"
                )
        self.ids = [line.strip() for line in (self.data_dir / "splits" / "train.txt").read_text().split("\n")]
        self.ids = [i for i in self.ids if i]
        self.world_seed = int(json.loads((self.data_dir / "synth.json").read_text())["seed"])
        self._scenes: dict[str, tuple[str, np.ndarray]] = {}

    def score_train(self, run: Path) -> dict[str, float]:
        """Precision, recall, mIoU (%) of a run's labels on the train split, as the +CRF row is scored."""
        return self.score(run, "train", False)

    def scene(self, item: str) -> tuple[str, np.ndarray]:
        """(background kind, badge pixels) of an image, regenerated once from the world's seed."""
        if item not in self._scenes:
            from ssr_cli.data.synth import render_scene

            scene = render_scene(self.world_seed, int(item.lstrip("s")))
            self._scenes[item] = (scene.background, scene.badges)
        return self._scenes[item]

    def mask(self, item: str) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(self.data_dir / "masks" / f"{item}.png"))

    def image(self, item: str) -> np.ndarray:
        from ssr_cli.data.images import read_image

        return read_image(next((self.data_dir / "images").glob(f"{item}.*")))


def measure_attention(work: Work, count: int) -> dict[str, dict[str, float]]:
    import torch

    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.refine.sources import load_dino_model

    dino, _ = load_dino_model(
        str(MODELS / "ssr-tiny-dino.json"), str(MODELS / "tiny_dino.pth"), torch.device("cpu")
    )
    clip: dict[str, list[float]] = {}
    dino_shares: dict[str, list[float]] = {}
    for item in work.ids[:count]:
        seed = load_seed(work.seeds / "cams" / f"{item}.npz")
        if "attn" not in seed:
            raise SystemExit(
                f"bench_refine_diagnosis: {work.seeds} holds no CLIP attention (make-seeds --save-attn)"
            )
        grid = tuple(int(v) for v in seed["cams"].shape[1:])
        labels = patch_labels(work.mask(item), grid)
        badge = patch_labels(np.asarray(work.scene(item)[1], np.uint8), grid) > 0
        merge(clip, attention_shares(np.asarray(seed["attn"], np.float32), labels, badge))
        with torch.no_grad():
            attn = dino.grid_attention(work.image(item), grid).float().numpy()
        merge(dino_shares, attention_shares(attn, labels, badge))
    return {"clip": summarise(clip), "dino": summarise(dino_shares)}


def relabel(
    work: Work,
    out: Path,
    crf: bool,
    prepare: Callable[[str, dict[str, np.ndarray]], np.ndarray | None],
) -> None:
    """Refine every train image's +CMPA seed (no mask, plain argmax, CRF or not) into
    ``out/<id>.png``; ``prepare(item, seed)`` may change the seed in place and returns the
    affinity (None: the identity)."""
    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.refine.config import CRFParams
    from ssr_cli.refine.pipeline import ItemJob, RefineParams, process_item

    out.mkdir(parents=True, exist_ok=True)
    params = RefineParams(mask="none", crf=vars(CRFParams()) if crf else None, conf_thresh=None)
    for item in work.ids:
        seed = dict(load_seed(work.seeds / "cams" / f"{item}.npz"))
        affinity = prepare(item, seed)
        result = process_item(ItemJob(item, work.image(item), seed, affinity), params)
        (out / f"{item}.png").write_bytes(result.png)


def gt_shaped_labels(work: Work, out: Path, crf: bool) -> None:
    """Label maps from CAMs shaped like the ground truth at the patch grid (see the docstring)."""
    import cv2

    def gt_shaped(item: str, seed: dict[str, np.ndarray]) -> None:
        mask = work.mask(item)
        _, gh, gw = seed["cams"].shape
        cams = [
            cv2.resize((mask == int(c)).astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
            for c in seed["class_ids"]
        ]
        if cams:
            stack = np.stack(cams)
            seed["cams"] = (
                stack / np.maximum(stack.reshape(len(stack), -1).max(1), 1e-6)[:, None, None]
            ).astype(np.float32)

    relabel(work, out, crf, gt_shaped)


def oracle_labels(work: Work, out: Path) -> None:
    """Label maps of the +CMPA seeds refined with the oracle affinity (see the docstring)."""

    def oracle(item: str, seed: dict[str, np.ndarray]) -> np.ndarray:
        labels = patch_labels(work.mask(item), tuple(int(v) for v in seed["cams"].shape[1:]))
        same = (labels[:, None] == labels[None, :]) & (labels[:, None] > 0)
        affinity = np.where(same, 1.0, np.eye(len(labels))).astype(np.float32)
        return affinity / affinity.sum(1, keepdims=True)

    relabel(work, out, True, oracle)


def floods(work: Work, run: Path) -> dict[str, str]:
    """Per background kind: flooded images / images (see the docstring)."""
    from PIL import Image

    flooded: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for item in work.ids:
        background = work.scene(item)[0]
        truth = work.mask(item)
        pred = np.asarray(Image.open(run / "labels" / f"{item}.png"))
        bg = truth == 0
        wrong = bg & (pred > 0) & (pred != 255)
        seen[background] += 1
        flooded[background] += int(wrong.sum() > FLOOD * max(1, bg.sum()))
    return {kind: f"{flooded[kind]}/{seen[kind]}" for kind in sorted(seen)}


def object_cells(work: Work) -> float:
    from ssr_cli.artefacts.seeds import load_seed

    cells = []
    for item in work.ids:
        grid = tuple(int(v) for v in load_seed(work.seeds / "cams" / f"{item}.npz")["cams"].shape[1:])
        labels = patch_labels(work.mask(item), grid)
        cells += [int((labels == v).sum()) for v in np.unique(labels) if v]
    return float(np.median(cells)) if cells else 0.0


def partial_activation(work: Work, runs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Mean class CAM on badge / body / background, and per-run recall of badge and body pixels."""
    import cv2
    from PIL import Image

    from ssr_cli.artefacts.seeds import load_seed

    cam: dict[str, list[float]] = {"badge": [], "body": [], "background": []}
    hits: dict[str, dict[str, list[float]]] = {name: {"badge": [], "body": []} for name in runs}
    for item in work.ids:
        badges = work.scene(item)[1]
        truth = work.mask(item)
        seed = load_seed(work.seeds / "cams" / f"{item}.npz")
        preds = {name: np.asarray(Image.open(run / "labels" / f"{item}.png")) for name, run in runs.items()}
        for k, class_id in enumerate(seed["class_ids"]):
            value = int(class_id)
            if not (truth == value).any():
                continue
            obj = truth == value
            where = {"badge": obj & badges, "body": obj & ~badges, "background": truth == 0}
            full = cv2.resize(
                np.asarray(seed["cams"][k], np.float32), truth.shape[::-1], interpolation=cv2.INTER_LINEAR
            )
            for region, pixels in where.items():
                if pixels.sum() >= 16:
                    cam[region].append(float(full[pixels].mean()))
            for name, pred in preds.items():
                for region in ("badge", "body"):
                    if where[region].sum() >= 16:
                        hits[name][region].append(float((pred[where[region]] == value).mean()))
    result = {"mean class CAM": {k: round(float(np.mean(v)), 3) for k, v in cam.items() if v}}
    for name, regions in hits.items():
        result[f"recall: {name}"] = {k: round(100 * float(np.mean(v)), 1) for k, v in regions.items() if v}
    return result


def diagnose(work: Work, count: int) -> dict:
    result: dict = {"attention_own_object_share": measure_attention(work, count)}
    gt_runs = {}
    for crf in (False, True):
        out = work.root / f"diag-gt-shaped-{'crf' if crf else 'no-crf'}"
        gt_shaped_labels(work, out, crf)
        report = json.loads(
            work.ssr(
                "eval",
                str(out),
                "--data",
                str(work.data_dir),
                "--split",
                "train",
                "--json",
                "--out",
                str(out.parent / f"{out.name}.json"),
            )
        )
        gt_runs["CRF" if crf else "no CRF"] = round(100 * float(report["summary"]["miou"]), 1)
    result["gt_shaped_cams_miou"] = gt_runs
    oracle = work.root / "diag-oracle-affinity"
    oracle_labels(work, oracle)
    result["oracle_affinity"] = work.score_train(oracle)
    plain = work.root / "diag-crf-only"
    work.ssr(
        "refine",
        "--seeds",
        str(work.seeds),
        "--out",
        str(plain),
        "--affinity",
        "none",
        "--mask",
        "none",
        "--conf-thresh",
        "0",
        "--overwrite",
    )
    full = work.root / "refine-crf-argmax"
    result["cam_crf"] = {"no affinity, no mask": work.score_train(plain)}
    result["floods"] = {"no affinity, no mask": floods(work, plain)}
    if (full / "manifest.json").is_file():
        result["cam_crf"]["full SSR (+CRF row)"] = work.score_train(full)
        result["floods"]["full SSR (+CRF row)"] = floods(work, full)
    result["median_patch_cells_per_object"] = object_cells(work)
    runs = {"no affinity, no mask": plain}
    if (full / "manifest.json").is_file():
        runs["full SSR (+CRF row)"] = full
    result["partial_activation"] = partial_activation(work, runs)
    return result


def markdown(result: dict) -> str:
    lines = [
        "| attention | own object, raw | own object, affinity | uniform | background -> objects "
        "| badge -> body, affinity | body uniform |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["attention_own_object_share"].items():
        lines.append(
            f"| {name} | {s.get('raw')} | {s.get('fused')} | {s.get('uniform')} | {s.get('bg_to_objects')} "
            f"| {s.get('badge_to_body')} | {s.get('body_uniform')} |"
        )
    gt = result["gt_shaped_cams_miou"]
    lines += ["", f"GT-shaped patch-grid CAMs: mIoU {gt['no CRF']} without the CRF, {gt['CRF']} with it", ""]
    o = result["oracle_affinity"]
    lines += [f"oracle affinity + CRF: P {o['precision']}, R {o['recall']}, mIoU {o['miou']}", ""]
    lines += [
        "| CAM + CRF | precision | recall | mIoU | flooded images per background |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["cam_crf"].items():
        flood = ", ".join(f"{k} {v}" for k, v in result["floods"][name].items())
        lines.append(f"| {name} | {s['precision']} | {s['recall']} | {s['miou']} | {flood} |")
    lines += ["", f"median patch cells per object: {result['median_patch_cells_per_object']}", ""]
    lines += ["| partial activation | badge | body | background |", "|---|---|---|---|"]
    for name, s in result["partial_activation"].items():
        lines.append(f"| {name} | {s.get('badge')} | {s.get('body')} | {s.get('background', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="a bench_quality.py --work folder")
    parser.add_argument("--images", type=int, default=80, help="images for the attention measurements")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = diagnose(Work(args.work.resolve(), args.threads), args.images)
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
