"""The ``report`` stage: an HTML page and a PNG contact sheet from any set of run folders.

Sources (in argument order): ``seeds`` runs (``cams/*.npz``; labels by the CLIP-ES rule
``(1 - max CAM) ** 1`` as background), ``refine`` runs (``labels/*.png``, plus refined
CAMs ``cams/*.npz`` with --save-cams), ``predict`` runs (``labels/*.png``), or plain
folders of ``<id>.png``. The *primary* labels are those of the last source with label
PNGs (else the last seeds run): they choose the ids, the per-image IoU and the order.

Pass 1 scores every id of the primary labels against ground truth (one confusion
matrix, as ``ssr eval``; plus per image: mean IoU over the classes present in the
image's GT or prediction). Pass 2 draws thumbnails of the ``limit`` sampled images only.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.artefacts import MANIFEST
from ssr_cli.artefacts.manifest import open_run
from ssr_cli.errors import ArtefactError, ConfigError, DataError
from ssr_cli.parallel import bounded_map

SAMPLES = ("worst", "random", "first")
IOU_RULE = "mean IoU over the classes present in the image's ground truth or prediction (GT 255 ignored)"
SEED_RULE = {"alpha": 1.0}


@dataclass
class Source:
    """One run folder given to the report. ``index`` is 1-based (argument order)."""

    index: int
    root: Path
    stage: str
    manifest: dict[str, Any] | None
    labels_dir: Path | None = None
    cams_dir: Path | None = None
    ids: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.index}:{self.stage}"

    @property
    def cam_title(self) -> str:
        return "seed CAM" if self.stage == "seeds" else "refined CAM"

    @property
    def gives_labels(self) -> bool:
        return self.labels_dir is not None or self.stage == "seeds"

    def cams(self, item_id: str) -> dict[str, np.ndarray] | None:
        """The seed-format CAMs of ``item_id`` (``cams`` [C, h, w], ``class_ids``, ``image_hw``)."""
        if self.cams_dir is None:
            return None
        path = self.cams_dir / f"{item_id}.npz"
        if not path.is_file():
            return None
        from ssr_cli.artefacts.seeds import load_seed

        return load_seed(path, with_attn=False)

    def labels(self, item_id: str) -> np.ndarray | None:
        """HxW class ids at image size, or None when this source has none for ``item_id``."""
        if self.labels_dir is not None:
            path = self.labels_dir / f"{item_id}.png"
            if not path.is_file():
                return None
            from ssr_cli.data.images import read_mask

            return read_mask(path)
        seed = self.cams(item_id)
        if seed is None:
            return None
        from ssr_cli.cam.labels import cams_to_labels, upsample_cams

        h, w = (int(v) for v in seed["image_hw"])
        cams = upsample_cams(seed["cams"].astype(np.float32), (h, w))
        return cams_to_labels(cams, [int(c) for c in seed["class_ids"]], **SEED_RULE)


def _ids_in(folder: Path, suffix: str) -> list[str]:
    from ssr_cli.artefacts.run import list_item_files

    return [p.relative_to(folder).with_suffix("").as_posix() for p in list_item_files(folder, suffix)]


def open_source(root: str | Path, index: int) -> Source:
    """A run folder (seeds, refine, predict) or a plain folder of ``<id>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("run folder not found", path=root, hint="pass seeds/refine/predict output folders")
    if not (root / MANIFEST).is_file():
        src = Source(index, root, "labels", None, labels_dir=root)
        src.ids = _ids_in(root, ".png")
    else:
        run = open_run(root)
        manifest, stage, item_dir = run.data, run.stage, run.item_dir
        if stage == "seeds":
            src = Source(index, root, stage, manifest, cams_dir=item_dir)
            src.ids = _ids_in(item_dir, ".npz")
        elif stage in ("refine", "predict"):
            cams = root / "cams"
            src = Source(
                index, root, stage, manifest, labels_dir=item_dir, cams_dir=cams if cams.is_dir() else None
            )
            src.ids = _ids_in(item_dir, ".png")
        else:
            raise ArtefactError(
                f"a '{stage}' run has no per-image outputs to show",
                path=root / MANIFEST,
                hint="pass seeds, refine or predict run folders",
            )
    if not src.ids:
        raise DataError(f"the {src.stage} folder holds no items yet", path=root, hint="run its stage first")
    return src


def _dataset_from_manifests(sources: Sequence[Source], strict: bool) -> tuple[Any, Any]:
    """The dataset and vocabulary recorded in the manifests (``inputs.dataset``/``inputs.images``).

    The dataset root is looked up as recorded (absolute, then relative to the run folder), so
    the report works from any directory. A recorded dataset that is not found is a warning
    (photos and ground truth are then missing), or with ``strict`` an error.
    """
    from ssr_cli.console import warn
    from ssr_cli.data.recorded import open_recorded_dataset, recorded_vocabulary
    from ssr_cli.errors import SSRError

    vocabulary = None
    problem: SSRError | None = None
    for src in reversed(sources):
        inputs = (src.manifest or {}).get("inputs") or {}
        for key in ("dataset", "images"):
            info = inputs.get(key)
            if not isinstance(info, dict):
                continue
            vocabulary = vocabulary or recorded_vocabulary(info)
            if info.get("layout") and info.get("root"):
                try:
                    return open_recorded_dataset(info, src.root), vocabulary
                except SSRError as exc:
                    problem = problem or exc
    if problem is not None:
        if strict:
            raise problem
        warn(f"{problem.one_line()}; the report has no photos and no ground truth")
    return None, vocabulary


def _image_iou(conf: np.ndarray) -> float | None:
    """Mean IoU over classes with GT or predicted pixels in one image's [K, K] matrix."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else None


def choose(ious: dict[str, float | None], ids: list[str], limit: int, sample: str, seed: int) -> list[str]:
    """The ``limit`` ids to show (0 = all), by ``sample``; returned worst first (no IoU last)."""
    if sample not in SAMPLES:
        raise ConfigError(f"--sample {sample!r} is not understood", hint="use worst, random or first")

    def key(i: str) -> tuple[int, float, str]:
        v = ious.get(i)
        return (1, 0.0, i) if v is None else (0, v, i)

    n = len(ids) if limit <= 0 else min(limit, len(ids))
    if sample == "first":
        picked = ids[:n]
    elif sample == "random":
        picked = random.Random(seed).sample(ids, n)
    else:
        picked = sorted(ids, key=key)[:n]
    return sorted(picked, key=key)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", path=out, hint="choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise DataError(
            "output folder is not empty and holds no earlier report",
            path=out,
            hint="choose a new or empty folder; nothing in it was touched",
        )
    if (out / "thumbs").is_dir():
        shutil.rmtree(out / "thumbs")
    for old in out.glob("page-*.html"):
        old.unlink()
    if (out / "full").is_dir():
        shutil.rmtree(out / "full")
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / "full").mkdir(parents=True, exist_ok=True)


def build_report(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    dataset: Any = None,
    gt_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    limit: int = 200,
    sample: str = "worst",
    seed: int = 0,
    per_page: int = 50,
    thumb: int = 160,
    sheet_rows: int = 48,
    workers: int = 2,
    strict: bool = False,
) -> dict[str, Any]:
    """Write ``out/index.html`` (+ ``page-N.html``), ``out/thumbs/*.png``, ``out/contact_sheet.png``
    and ``out/report.json``; returns the report dict (also the JSON written).

    ``dataset`` gives photos, ids and GT (else the dataset recorded in the manifests gives
    photos); ``gt_dir`` a folder of GT PNGs ``<id>.png`` (overrides the dataset's).
    ``class_names`` (background first) default to the dataset's vocabulary, else the one the
    manifests record, else VOC's (with a warning). A missing input (the recorded dataset, the
    photos, the vocabulary) is a warning, with ``strict`` an error.
    """
    from ssr_cli.console import ProgressBar, info
    from ssr_cli.metrics import confusion_matrix, scores
    from ssr_cli.report.html import write_pages
    from ssr_cli.report.render import render_item, render_sheet

    if not runs:
        raise ConfigError("no run folders given", hint="pass one or more seeds/refine/predict folders")
    if per_page < 1:
        raise ConfigError("--per-page must be at least 1")
    sources = [open_source(r, i) for i, r in enumerate(runs, start=1)]
    labelled = [s for s in sources if s.gives_labels]
    primary = next((s for s in reversed(labelled) if s.labels_dir is not None), labelled[-1])
    photos_from = "--data" if dataset is not None else "run manifests"
    recorded_vocab = None
    if dataset is None:
        dataset, recorded_vocab = _dataset_from_manifests(sources, strict)
    if dataset is None and gt_dir is None:
        _missing_input("no photos and no ground truth: the runs record no dataset that opens", strict)
    if class_names is None:
        if dataset is not None:
            class_names = ["background", *dataset.vocab.classes]
        elif recorded_vocab is not None:
            class_names = ["background", *recorded_vocab.classes]
        else:
            from ssr_cli.data.vocab import load_vocabulary

            _missing_input("the runs record no vocabulary: class names are VOC's (pass --vocab)", strict)
            class_names = ["background", *load_vocabulary("voc").classes]
    names = [str(n) for n in class_names]
    k = len(names)
    items = {item.id: item for item in dataset.items} if dataset is not None else {}

    have = set(primary.ids)
    ids = [i for i in dataset.ids if i in have] if dataset is not None and items else sorted(have)
    if not ids:
        raise DataError(
            f"none of the {len(have)} items of {primary.root} belong to the dataset split",
            path=primary.root,
            hint="pass the --data/--split the runs were made on",
        )
    gt_root = Path(gt_dir) if gt_dir is not None else None

    def gt_path(item_id: str) -> Path | None:
        if gt_root is not None:
            p = gt_root / f"{item_id}.png"
            return p if p.is_file() else None
        item = items.get(item_id)
        return Path(item.gt) if item is not None and item.gt is not None else None

    def score(item_id: str) -> tuple[str, dict[str, np.ndarray], set[int]]:
        """Each labelled source's [K, K] matrix of this image (those with GT and labels), and the
        classes in its GT or any source's labels (for the class filter)."""
        from ssr_cli.data.images import read_mask

        gp = gt_path(item_id)
        gt = read_mask(gp) if gp is not None else None
        found: set[int] = set() if gt is None else {int(v) for v in np.unique(gt)}
        matrices: dict[str, np.ndarray] = {}
        for src in labelled:
            pred = src.labels(item_id)
            if pred is None:
                continue
            found |= {int(v) for v in np.unique(pred)}
            if gt is None:
                continue
            if pred.shape != gt.shape:
                raise DataError(
                    f"labels of {src.root} are {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
                    f"{gt.shape[1]}x{gt.shape[0]}",
                    path=gp,
                    hint="labels must have the size of the original image",
                )
            try:
                matrices[src.name] = confusion_matrix(gt, pred, k)
            except ValueError as exc:
                raise DataError(
                    str(exc), path=gp, hint=f"labels must be class ids 0..{k - 1} or 255"
                ) from None
        return item_id, matrices, {c for c in found if 0 < c < k}

    confs = {src.name: np.zeros((k, k), dtype=np.int64) for src in labelled}
    counted = {src.name: 0 for src in labelled}
    ious: dict[str, float | None] = {}
    classes_of: dict[str, list[int]] = {}
    with ProgressBar("score", total=len(ids)) as bar:
        for item_id, matrices, found in bounded_map(score, ids, workers, name="ssr-report"):
            for name, matrix in matrices.items():
                confs[name] += matrix
                counted[name] += 1
            ious[item_id] = _image_iou(matrices[primary.name]) if primary.name in matrices else None
            classes_of[item_id] = sorted(found)
            bar.update(1)
    conf, scored = confs[primary.name], counted[primary.name]
    shown = choose(ious, ids, limit, sample, seed)

    out = Path(out)
    _prepare_out(out)
    palette = _palette()

    def render(item_id: str) -> dict[str, Any]:
        item = items.get(item_id)
        return render_item(
            item_id,
            out,
            photo=Path(item.image) if item is not None else None,
            gt=gt_path(item_id),
            sources=sources,
            primary=primary,
            class_names=names,
            palette=palette,
            thumb=thumb,
        )

    with ProgressBar("render", total=len(shown)) as bar:
        rows = []
        for row in bounded_map(render, shown, workers, name="ssr-report"):
            row["iou"] = ious.get(row["id"])
            row["classes"] = classes_of.get(row["id"], [])
            rows.append(row)
            bar.update(1)
    sheet = render_sheet(rows[:sheet_rows], out / "contact_sheet.png", out, primary_name=primary.name)

    report: dict[str, Any] = {
        "sources": [_describe(s, s is primary) for s in sources],
        "class_names": names,
        "images_total": len(ids),
        "images_scored": scored,
        "images_shown": len(rows),
        "limit": limit,
        "sample": sample,
        "seed": seed,
        "per_page": per_page,
        "photos_from": photos_from if dataset is not None else None,
        "gt": str(gt_root) if gt_root is not None else ("dataset" if scored else None),
        "iou_rule": IOU_RULE,
        "seed_label_rule": "background = (1 - max CAM) ** 1, argmax (CLIP-ES)",
        "scores": scores(conf, names) if scored else None,
        "run_scores": [
            {
                "name": src.name,
                "stage": src.stage,
                "path": str(src.root),
                "primary": src is primary,
                "images_scored": counted[src.name],
                "scores": scores(confs[src.name], names) if counted[src.name] else None,
            }
            for src in labelled
        ],
        "palette": palette[: 3 * k],
        "confusion_matrix": conf.tolist() if scored else None,
        "contact_sheet": sheet,
        "rows": rows,
    }
    report["pages"] = [p.name for p in write_pages(out, report)]
    from ssr_cli.artefacts import atomic_write_json

    atomic_write_json(out / "report.json", report)
    info(f"wrote {out / 'index.html'} ({len(rows)} of {len(ids)} images, {len(report['pages'])} pages)")
    return report


def _missing_input(message: str, strict: bool) -> None:
    from ssr_cli.console import warn

    if strict:
        raise DataError(message, hint="pass --data ROOT (and --vocab), or drop --strict")
    warn(message)


def _palette() -> list[int]:
    from ssr_cli.data.images import voc_palette

    return voc_palette()


def _describe(src: Source, primary: bool) -> dict[str, Any]:
    m = src.manifest or {}
    runs = (m.get("timing") or {}).get("runs") or []
    return {
        "index": src.index,
        "name": src.name,
        "path": str(src.root),
        "stage": src.stage,
        "primary": primary,
        "items": len(src.ids),
        "item_count": m.get("item_count"),
        "completed": m.get("completed"),
        "created": m.get("created"),
        "fingerprint": m.get("fingerprint"),
        "seconds": round(sum(float(r.get("seconds", 0.0)) for r in runs), 3) if runs else None,
        "loop_seconds": (
            round(sum(float(r.get("loop_seconds", 0.0)) for r in runs), 3)
            if any("loop_seconds" in r for r in runs)
            else None
        ),
        "shards": len({str(r.get("shard", "0/1")) for r in runs}) if runs else None,  # not the reruns
        "sessions": len(runs),
        "config": json.loads(json.dumps(m.get("config"), default=str)) if m else None,
        "has_cams": src.cams_dir is not None,
    }
