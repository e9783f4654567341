"""The ``eval`` stage: score label maps against ground truth with one confusion matrix.

Predictions come from a run folder (``manifest.json`` + ``<item_dir>/<id>.png``,
the output of ``refine`` or ``predict``) or from a plain folder of ``<id>.png``
files (ids may contain ``/``). Ground truth comes from a dataset split
(``Item.gt``) or from a folder of PNGs (every ``*.png`` under it is an id).

Masks are read by a thread pool with a bounded number of images in flight; each
image becomes a small [K, K] matrix that is summed as results come back, so
memory does not grow with the number of images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli import __version__
from ssr_cli.artefacts import MANIFEST, read_manifest
from ssr_cli.artefacts.manifest import Manifest
from ssr_cli.errors import ArtefactError, ConfigError, DataError
from ssr_cli.metrics import PRED_IGNORE_MODES, confusion_matrix, empty_confusion, scores
from ssr_cli.parallel import bounded_map

IGNORE_INDEX = 255


@dataclass
class PredSource:
    """Where the predicted label map of each id lives and how to read it.

    ``read(id)`` returns an HxW integer array of class ids (255 = uncertain).
    The seeds hook replaces ``read`` with a CAM -> label conversion.
    """

    root: Path
    item_root: Path
    suffix: str
    manifest: dict[str, Any] | None = None
    read: Callable[[str], np.ndarray] | None = field(default=None, repr=False)
    read_many: Callable[[str], list[np.ndarray]] | None = field(default=None, repr=False)
    candidates: list[dict[str, float]] | None = None

    def path(self, item_id: str) -> Path:
        return self.item_root / f"{item_id}{self.suffix}"

    def load(self, item_id: str) -> np.ndarray:
        if self.read is not None:
            return self.read(item_id)
        from ssr_cli.data.images import read_mask

        return read_mask(self.path(item_id))

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"path": str(self.root), "kind": "folder" if self.manifest is None else "run"}
        if self.manifest is not None:
            info.update(
                stage=self.manifest.get("stage"),
                fingerprint=self.manifest.get("fingerprint"),
                item_dir=self.manifest.get("item_dir"),
                completed=self.manifest.get("completed"),
            )
        return info


BG_ALPHAS = (1.0, 2.0)  # CLIP-ES's search over the background exponent
BG_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 13))  # 0.05 .. 0.60


def bg_candidates(search: bool, alpha: float | None, threshold: float | None) -> list[dict[str, float]]:
    """The background rules to score for seeds: one (the given one) or the whole search grid."""
    if search:
        return [{"alpha": a} for a in BG_ALPHAS] + [{"bg_threshold": t} for t in BG_THRESHOLDS]
    if threshold is not None:
        return [{"bg_threshold": float(threshold)}]
    return [{"alpha": 1.0 if alpha is None else float(alpha)}]


def _seed_source(pred: Path, manifest: dict[str, Any], candidates: list[dict[str, float]]) -> PredSource:
    """A ``seeds`` run (``cams/*.npz``): CAMs are upsampled to the image size (bilinear) and
    turned into labels by each background rule in ``candidates`` (METHOD.md section 4)."""
    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.cam.labels import cams_to_labels, upsample_cams

    run = Manifest(pred, manifest)
    item_root, suffix = run.item_dir, run.item_suffix

    def read_many(item_id: str) -> list[np.ndarray]:
        seed = load_seed(item_root / f"{item_id}{suffix}", with_attn=False)
        h, w = (int(v) for v in seed["image_hw"])
        cams = upsample_cams(seed["cams"].astype(np.float32), (h, w))
        ids = [int(c) for c in seed["class_ids"]]
        return [cams_to_labels(cams, ids, **rule) for rule in candidates]

    return PredSource(
        root=pred,
        item_root=item_root,
        suffix=suffix,
        manifest=manifest,
        read=lambda item_id: read_many(item_id)[0],
        read_many=read_many,
        candidates=candidates,
    )


def open_predictions(
    pred: str | Path, candidates: list[dict[str, float]] | None = None, *, refined_cams: bool = False
) -> PredSource:
    """Resolve ``pred`` (a run folder or a plain folder of PNGs) to a :class:`PredSource`.

    ``refined_cams``: for a refine run saved with ``--save-cams``, score its refined CAMs
    (``cams/``, seed format) with the background rules ``candidates`` instead of its PNGs.
    """
    pred = Path(pred)
    if not pred.is_dir():
        what = "prediction folder does not exist" if not pred.exists() else "predictions must be a folder"
        raise DataError(what, path=pred, hint="pass a run folder of refine/predict or a folder of <id>.png")
    if not (pred / MANIFEST).is_file():
        return PredSource(root=pred, item_root=pred, suffix=".png")
    manifest = read_manifest(pred)
    stage = manifest.get("stage")
    if stage == "seeds":
        return _seed_source(pred, manifest, candidates or bg_candidates(False, None, None))
    if refined_cams and stage == "refine":
        if not (manifest.get("config") or {}).get("save_cams"):
            raise ArtefactError(
                "this refine run holds no refined CAMs to search a background rule on",
                path=pred / MANIFEST,
                hint="rerun refine with --save-cams, or drop --search-bg/--bg-threshold to score its labels",
            )
        cams = dict(manifest, item_dir="cams", item_suffix=".npz")
        return _seed_source(pred, cams, candidates or bg_candidates(False, None, None))
    run = Manifest(pred, manifest)
    if run.item_suffix != ".png":
        raise ArtefactError(
            f"a '{stage}' run holds no label maps to evaluate",
            path=pred / MANIFEST,
            hint="evaluate the output folder of refine or predict, or a folder of <id>.png",
        )
    return PredSource(root=pred, item_root=run.item_dir, suffix=".png", manifest=manifest)


def _gt_ids(gt_dir: Path) -> list[str]:
    if not gt_dir.is_dir():
        raise DataError("ground-truth folder does not exist", path=gt_dir, hint="pass a folder of label PNGs")
    ids = sorted(
        p.relative_to(gt_dir).with_suffix("").as_posix()
        for p in gt_dir.rglob("*.png")
        if p.is_file() and not p.name.startswith(".")
    )
    if not ids:
        raise DataError("no .png files in the ground-truth folder", path=gt_dir)
    return ids


def _class_names(num_classes: int | None, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        if num_classes is None:
            raise ConfigError("the number of classes is unknown", hint="pass --num-classes or --vocab")
        return ["background"] + [f"class {i}" for i in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(
            f"{num_classes} classes asked for but the vocabulary has {len(names)} (with background)",
            hint="drop --num-classes or pass the matching --vocab",
        )
    return names


@dataclass
class GroundTruth:
    """The ids to score (those with a mask), their mask paths, the ``gt`` report entry, and the
    dataset's ids left out for want of a mask."""

    ids: list[str]
    paths: dict[str, Path]
    info: dict[str, Any]
    no_gt: list[str] = field(default_factory=list)


def _dataset_gt(dataset: Any, gt_root: Path | None) -> GroundTruth:
    if gt_root is None:
        gt_paths = {item.id: Path(item.gt) for item in dataset.items if item.gt is not None}
    else:
        gt_paths = {i: gt_root / f"{i}.png" for i in dataset.ids if (gt_root / f"{i}.png").is_file()}
    # Partial ground truth: score the images that have a mask, count the others.
    no_gt = [i for i in dataset.ids if i not in gt_paths]
    ids = [i for i in dataset.ids if i in gt_paths]
    if not ids:
        folder = gt_root if gt_root is not None else dataset.root
        raise DataError(
            f"none of the {len(dataset)} images of split '{dataset.split}' has a ground-truth mask",
            path=folder,
            hint="put <id>.png masks in the dataset's mask folder or pass --gt DIR",
        )
    info: dict[str, Any] = {"source": "dataset", "dataset": dataset.describe()}
    if gt_root is not None:
        info["path"] = str(gt_root)
    return GroundTruth(ids, gt_paths, info, no_gt)


def open_ground_truth(dataset: Any, gt_root: Path | None) -> GroundTruth:
    """Ground truth from ``dataset`` (its masks, or ``gt_root``'s for its ids), else every PNG
    under ``gt_root``; ConfigError with neither."""
    if dataset is not None:
        return _dataset_gt(dataset, gt_root)
    if gt_root is not None:
        ids = _gt_ids(gt_root)
        return GroundTruth(
            ids, {i: gt_root / f"{i}.png" for i in ids}, {"source": "folder", "path": str(gt_root)}
        )
    raise ConfigError("no ground truth to compare with", hint="pass --data ROOT [--split S] or --gt DIR")


def _split_missing(source: PredSource, ids: list[str], allow_missing: bool) -> tuple[list[str], list[str]]:
    """(ids without a prediction, ids to score); DataError for missing ones unless ``allow_missing``."""
    missing = [i for i in ids if not source.path(i).is_file()]
    if missing and not allow_missing:
        hint = "pass --allow-missing to score only the predictions that exist"
        if source.manifest is not None and not source.manifest.get("completed", True):
            hint = "the run is not complete: rerun its stage to finish it, or pass --allow-missing"
        raise DataError(
            f"prediction not found ({len(missing)} of {len(ids)} predictions are missing)",
            path=source.path(missing[0]),
            hint=hint,
        )
    skip = set(missing)
    todo = [i for i in ids if i not in skip]
    if not todo:
        raise DataError(f"all {len(ids)} predictions are missing", path=source.item_root)
    return missing, todo


@dataclass
class ImageScorer:
    """One image's confusion matrices, one per background rule: [R, K, K] (or [R, K, K+1])."""

    source: PredSource
    gt_paths: dict[str, Path]
    k: int
    pred_ignore: str

    def __call__(self, item_id: str) -> np.ndarray:
        from ssr_cli.data.images import read_mask

        gt = read_mask(self.gt_paths[item_id])
        source = self.source
        labels = source.read_many(item_id) if source.read_many is not None else [source.load(item_id)]
        return np.stack([self.matrix(item_id, gt, label) for label in labels])

    def matrix(self, item_id: str, gt: np.ndarray, label: np.ndarray) -> np.ndarray:
        k = self.k
        if label.shape != gt.shape:
            raise DataError(
                f"prediction is {label.shape[1]}x{label.shape[0]} but its ground truth "
                f"{self.gt_paths[item_id]} is {gt.shape[1]}x{gt.shape[0]}",
                path=self.source.path(item_id),
                hint="predictions must have the size of the original image",
            )
        try:
            return confusion_matrix(gt, label, k, IGNORE_INDEX, self.pred_ignore)
        except ValueError as exc:
            bad = self.gt_paths[item_id] if str(exc).startswith("ground truth") else self.source.path(item_id)
            raise DataError(
                str(exc), path=bad, hint=f"labels must be class ids 0..{k - 1} ({k} classes) or 255"
            ) from None


def _accumulate(
    scorer: ImageScorer, todo: list[str], rules: list[Any], names: list[str], workers: int
) -> np.ndarray:
    """The summed [R, K, K] matrices of ``todo`` (R = len(rules)), as images come back in any order."""
    from ssr_cli.console import ProgressBar

    confs = np.stack([empty_confusion(scorer.k, scorer.pred_ignore) for _ in rules])
    with ProgressBar("eval", total=len(todo)) as bar:
        for done, matrices in enumerate(
            bounded_map(scorer, todo, workers, ordered=False, name="ssr-eval"), start=1
        ):
            confs += matrices
            status = None
            if done % 25 == 0 or done == len(todo):
                miou = max((scores(c, names)["miou"] or 0.0) for c in confs)
                status = f"mIoU {100 * miou:.2f} %"
            bar.update(1, status)
    return confs


def evaluate(
    pred: str | Path,
    *,
    dataset: Any = None,
    gt_dir: str | Path | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    workers: int = 2,
    pred_ignore: str = "background",
    allow_missing: bool = False,
    bg_rules: list[dict[str, float]] | None = None,
    refined_cams: bool = False,
) -> dict[str, Any]:
    """Score the label maps in ``pred`` against ground truth; returns a JSON-able report.

    ``dataset`` (an ``ssr_cli.data.Dataset``) gives the ids, GT paths and class
    names (background + vocabulary); ``gt_dir`` alone gives every PNG under it
    as an id (and overrides the dataset's GT folder when both are given).
    Labels are HxW class ids; GT 255 is ignored; prediction 255 is handled per
    ``pred_ignore`` (see ``ssr_cli.metrics``). A missing prediction is a
    DataError unless ``allow_missing`` (then it is skipped and counted). Images of the
    dataset without a ground-truth mask are left out and counted (``summary.no_gt``);
    only a split where no image has one is an error.

    The report holds ``summary`` (miou, mprecision, mrecall, pixel_accuracy,
    images, missing, ...), ``classes`` (per-class rows), ``confusion_matrix``
    (rows GT, columns prediction), and the ``pred``/``gt`` sources.

    For a ``seeds`` run, ``bg_rules`` are the background rules to try (see
    ``bg_candidates``); each is scored with its own matrix over the whole split,
    the report is that of the best mIoU, and ``bg_search`` lists them all.
    ``refined_cams``: score a refine run's ``--save-cams`` CAMs that way too.
    """
    if pred_ignore not in PRED_IGNORE_MODES:
        raise ConfigError(f"--pred-ignore {pred_ignore!r} is not understood", hint="use background or wrong")
    source = open_predictions(pred, bg_rules, refined_cams=refined_cams)
    truth = open_ground_truth(dataset, Path(gt_dir) if gt_dir is not None else None)
    if dataset is not None and class_names is None:
        class_names = ["background", *dataset.vocab.classes]
    names = _class_names(num_classes, class_names)
    if not truth.ids:
        raise DataError("the split has no images to evaluate", path=truth.info.get("path", str(pred)))
    missing, todo = _split_missing(source, truth.ids, allow_missing)

    rules = source.candidates or [{}]
    started = time.perf_counter()
    confs = _accumulate(
        ImageScorer(source, truth.paths, len(names), pred_ignore), todo, rules, names, workers
    )
    seconds = time.perf_counter() - started
    per_rule = [scores(c, names) for c in confs]
    best = max(range(len(rules)), key=lambda r: per_rule[r]["miou"] or 0.0)
    conf, result = confs[best], per_rule[best]
    report = {
        "tool": "ssr-cli",
        "tool_version": __version__,
        "num_classes": len(names),
        "ignore_index": IGNORE_INDEX,
        "pred_ignore": pred_ignore,
        "pred": source.describe(),
        "gt": truth.info,
        "summary": _summary(result, truth, todo, missing),
        "classes": result["classes"],
        "confusion_matrix": conf.tolist(),
        "missing_ids": missing[:20],
        "no_gt_ids": truth.no_gt[:20],
    }
    if source.candidates:
        report["bg_rule"] = rules[best]
        report["bg_search"] = [
            {**rule, "miou": r["miou"], "mprecision": r["mprecision"], "mrecall": r["mrecall"]}
            for rule, r in zip(rules, per_rule, strict=True)
        ]
    report["seconds"] = round(seconds, 3)
    return report


def _summary(
    result: dict[str, Any], truth: GroundTruth, todo: list[str], missing: list[str]
) -> dict[str, Any]:
    """The report's ``summary``: the best rule's means and the image counts."""
    return {
        "miou": result["miou"],
        "mprecision": result["mprecision"],
        "mrecall": result["mrecall"],
        "pixel_accuracy": result["pixel_accuracy"],
        "images": len(todo),
        "missing": len(missing),
        "no_gt": len(truth.no_gt),
        "images_total": len(truth.ids) + len(truth.no_gt),
        "pixels": result["pixels"],
        "classes_present": result["classes_present"],
        "pred_ignored_pixels": result["pred_ignored_pixels"],
    }
