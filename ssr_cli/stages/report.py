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

from ssr_cli.errors import ConfigError, DataError
from ssr_cli.parallel import bounded_map
from ssr_cli.stages.report_inputs import SEED_RULE, ReportInputs, Source, open_inputs, open_source

__all__ = ["SEED_RULE", "ReportInputs", "ScoreTotals", "Source", "build_report", "choose", "open_source"]

SAMPLES = ("worst", "random", "first")
IOU_RULE = "mean IoU over the classes present in the image's ground truth or prediction (GT 255 ignored)"


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


@dataclass
class ScoreTotals:
    """Pass 1: each labelled source's summed [K, K] matrix and image count; per image, the
    primary source's IoU (None without GT) and the classes in its GT or any source's labels."""

    confs: dict[str, np.ndarray]
    counted: dict[str, int]
    ious: dict[str, float | None] = field(default_factory=dict)
    classes_of: dict[str, list[int]] = field(default_factory=dict)


def score_image(inputs: ReportInputs, item_id: str) -> tuple[str, dict[str, np.ndarray], set[int]]:
    """Each labelled source's [K, K] matrix of this image (those with GT and labels), and the
    classes in its GT or any source's labels (for the class filter)."""
    from ssr_cli.data.images import read_mask
    from ssr_cli.metrics import confusion_matrix

    k = len(inputs.names)
    gp = inputs.gt_path(item_id)
    gt = read_mask(gp) if gp is not None else None
    found: set[int] = set() if gt is None else {int(v) for v in np.unique(gt)}
    matrices: dict[str, np.ndarray] = {}
    for src in inputs.labelled:
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
            raise DataError(str(exc), path=gp, hint=f"labels must be class ids 0..{k - 1} or 255") from None
    return item_id, matrices, {c for c in found if 0 < c < k}


def score_all(inputs: ReportInputs, ids: list[str], workers: int) -> ScoreTotals:
    """Pass 1 over every id (``workers`` threads), summed as the images come back in order."""
    from ssr_cli.console import ProgressBar

    k = len(inputs.names)
    labelled = inputs.labelled
    totals = ScoreTotals(
        confs={src.name: np.zeros((k, k), dtype=np.int64) for src in labelled},
        counted={src.name: 0 for src in labelled},
    )
    primary = inputs.primary.name
    with ProgressBar("score", total=len(ids)) as bar:
        for item_id, matrices, found in bounded_map(
            lambda i: score_image(inputs, i), ids, workers, name="ssr-report"
        ):
            for name, matrix in matrices.items():
                totals.confs[name] += matrix
                totals.counted[name] += 1
            totals.ious[item_id] = _image_iou(matrices[primary]) if primary in matrices else None
            totals.classes_of[item_id] = sorted(found)
            bar.update(1)
    return totals


def render_rows(
    inputs: ReportInputs,
    shown: list[str],
    out: Path,
    totals: ScoreTotals,
    *,
    palette: list[int],
    thumb: int,
    workers: int,
) -> list[dict[str, Any]]:
    """Pass 2: the thumbnails of the ``shown`` ids, one report row each (in ``shown`` order)."""
    from ssr_cli.console import ProgressBar
    from ssr_cli.report.render import render_item

    def render(item_id: str) -> dict[str, Any]:
        return render_item(
            item_id,
            out,
            photo=inputs.photo(item_id),
            gt=inputs.gt_path(item_id),
            sources=inputs.sources,
            primary=inputs.primary,
            class_names=inputs.names,
            palette=palette,
            thumb=thumb,
        )

    with ProgressBar("render", total=len(shown)) as bar:
        rows = []
        for row in bounded_map(render, shown, workers, name="ssr-report"):
            row["iou"] = totals.ious.get(row["id"])
            row["classes"] = totals.classes_of.get(row["id"], [])
            rows.append(row)
            bar.update(1)
    return rows


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
    from ssr_cli.artefacts import atomic_write_json
    from ssr_cli.console import info
    from ssr_cli.report.html import write_pages
    from ssr_cli.report.render import render_sheet

    if not runs:
        raise ConfigError("no run folders given", hint="pass one or more seeds/refine/predict folders")
    if per_page < 1:
        raise ConfigError("--per-page must be at least 1")
    inputs = open_inputs(runs, dataset=dataset, gt_dir=gt_dir, class_names=class_names, strict=strict)
    ids = inputs.ids()
    totals = score_all(inputs, ids, workers)
    shown = choose(totals.ious, ids, limit, sample, seed)

    out = Path(out)
    _prepare_out(out)
    palette = _palette()
    rows = render_rows(inputs, shown, out, totals, palette=palette, thumb=thumb, workers=workers)
    sheet = render_sheet(rows[:sheet_rows], out / "contact_sheet.png", out, primary_name=inputs.primary.name)
    options = {"limit": limit, "sample": sample, "seed": seed, "per_page": per_page}
    report = _report_dict(inputs, ids, totals, rows, options=options, palette=palette, sheet=sheet)
    report["pages"] = [p.name for p in write_pages(out, report)]
    atomic_write_json(out / "report.json", report)
    info(f"wrote {out / 'index.html'} ({len(rows)} of {len(ids)} images, {len(report['pages'])} pages)")
    return report


def _report_dict(
    inputs: ReportInputs,
    ids: list[str],
    totals: ScoreTotals,
    rows: list[dict[str, Any]],
    *,
    options: dict[str, Any],
    palette: list[int],
    sheet: Any,
) -> dict[str, Any]:
    """The report (without its ``pages``): summary, scores, sources, options and rows."""
    from ssr_cli.metrics import scores

    names, primary = inputs.names, inputs.primary
    conf, scored = totals.confs[primary.name], totals.counted[primary.name]
    gt_root = inputs.gt_root
    return {
        "sources": [_describe(s, s is primary) for s in inputs.sources],
        "class_names": names,
        "images_total": len(ids),
        "images_scored": scored,
        "images_shown": len(rows),
        **options,  # limit, sample, seed, per_page
        "photos_from": inputs.photos_from,
        "gt": str(gt_root) if gt_root is not None else ("dataset" if scored else None),
        "iou_rule": IOU_RULE,
        "seed_label_rule": "background = (1 - max CAM) ** 1, argmax (CLIP-ES)",
        "scores": scores(conf, names) if scored else None,
        "run_scores": _run_scores(inputs, totals),
        "palette": palette[: 3 * len(names)],
        "confusion_matrix": conf.tolist() if scored else None,
        "contact_sheet": sheet,
        "rows": rows,
    }


def _run_scores(inputs: ReportInputs, totals: ScoreTotals) -> list[dict[str, Any]]:
    """Each labelled source's scores over the images it has labels (and GT) for."""
    from ssr_cli.metrics import scores

    return [
        {
            "name": src.name,
            "stage": src.stage,
            "path": str(src.root),
            "primary": src is inputs.primary,
            "images_scored": totals.counted[src.name],
            "scores": scores(totals.confs[src.name], inputs.names) if totals.counted[src.name] else None,
        }
        for src in inputs.labelled
    ]


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
