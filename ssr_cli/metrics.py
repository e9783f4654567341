"""Confusion matrices and segmentation scores (numpy only).

The protocol (METHOD.md section 6): ONE confusion matrix is accumulated over the
whole split (sum the per-image matrices, never average per-image scores);
ground-truth pixels equal to the ignore index (255) are skipped;
IoU = TP / (TP + FP + FN); mIoU is the mean over the classes present in the
ground truth. Rows of the matrix are ground-truth classes, columns predictions.

Prediction pixels equal to 255 ("uncertain" in CRF pseudo-labels) are handled by
``pred_ignore``:

- ``"background"`` (default): counted as class 0. CLIP-ES's pseudo-label scoring
  (``eval_cam_with_crf.py --eval_only`` in linyq2117/CLIP-ES, read via the code
  search) does NOT do this explicitly: it applies the ``confidence < 0.95 -> 255``
  rule only when writing the PNGs and scores the plain CRF argmax, so its
  predictions never contain 255 (its ``_fast_hist`` masks only the GT range and
  would mis-bin or crash on a 255 prediction). Counting 255 as background is the
  usual way to score a saved pseudo-label PNG as a full label map, and it makes a
  0/255-free prediction score exactly as CLIP-ES scores it.
- ``"wrong"``: a miss (FN) for the ground-truth class, never a false positive of
  any class. Implemented with one extra column (index K) in the matrix, which
  counts towards each row's total but towards no class's predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

PredIgnore = Literal["background", "wrong"]
PRED_IGNORE_MODES: tuple[str, ...] = ("background", "wrong")


def _check_mode(pred_ignore: str) -> None:
    if pred_ignore not in PRED_IGNORE_MODES:
        raise ValueError(f"pred_ignore must be one of {', '.join(PRED_IGNORE_MODES)}, not {pred_ignore!r}")


def matrix_columns(num_classes: int, pred_ignore: str = "background") -> int:
    """Number of columns of the matrix :func:`confusion_matrix` returns (K, or K+1 for "wrong")."""
    _check_mode(pred_ignore)
    return num_classes + 1 if pred_ignore == "wrong" else num_classes


def empty_confusion(num_classes: int, pred_ignore: str = "background") -> np.ndarray:
    """A zero matrix of the shape :func:`confusion_matrix` returns, to accumulate into."""
    return np.zeros((num_classes, matrix_columns(num_classes, pred_ignore)), dtype=np.int64)


def _value_error(name: str, value: int, k: int, ignore_index: int) -> ValueError:
    return ValueError(
        f"{name} has value {value}, which is not a class id 0..{k - 1} nor the ignore value {ignore_index}"
    )


def _ignored(flat: np.ndarray, name: str, k: int, ignore_index: int) -> np.ndarray:
    """The ``ignore_index`` pixels of ``flat``; ValueError at the first value that is neither
    a class id in [0, k) nor ``ignore_index``."""
    ignored = flat == ignore_index
    bad = (flat >= k) | (flat < 0) if flat.dtype.kind == "i" else flat >= k
    bad &= ~ignored
    if bad.any():
        raise _value_error(name, int(flat[bad].flat[0]), k, ignore_index)
    return ignored


def confusion_matrix(
    gt: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
    pred_ignore: str = "background",
) -> np.ndarray:
    """Count (GT class, predicted class) pixel pairs of one image.

    ``gt`` and ``pred`` are HxW integer arrays of class ids (any integer dtype;
    uint8 from palette PNGs). GT pixels equal to ``ignore_index`` are skipped.
    Prediction pixels equal to ``ignore_index`` are class 0 (``"background"``)
    or go to an extra last column (``"wrong"``).

    Returns an int64 matrix of shape [K, K] (``"background"``) or [K, K+1]
    (``"wrong"``); rows are GT classes, columns predictions.

    Raises ValueError for different shapes, non-integer arrays, or values that
    are neither a class id in [0, K) nor ``ignore_index`` (in GT or prediction);
    callers turn it into a DataError naming the file.
    """
    _check_mode(pred_ignore)
    k = int(num_classes)
    if k < 1:
        raise ValueError(f"num_classes must be at least 1, not {num_classes}")
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    for name, arr in (("ground truth", gt), ("prediction", pred)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer class ids, not {arr.dtype}")

    if gt.dtype == np.uint8 and pred.dtype == np.uint8 and k <= ignore_index <= 255:
        return _confusion_uint8(gt, pred, k, ignore_index, pred_ignore)
    gt_flat = gt.ravel()
    pred_flat = pred.ravel()
    gt_ign = _ignored(gt_flat, "ground truth", k, ignore_index)
    pred_ign = _ignored(pred_flat, "prediction", k, ignore_index)

    cols = matrix_columns(k, pred_ignore)
    keep = ~gt_ign
    g = gt_flat[keep].astype(np.intp)
    p = pred_flat[keep].astype(np.intp)
    if pred_ign.any():
        p[pred_ign[keep]] = 0 if pred_ignore == "background" else k
    counts = np.bincount(g * cols + p, minlength=k * cols)
    return counts.reshape(k, cols).astype(np.int64, copy=False)


def _confusion_uint8(
    gt: np.ndarray, pred: np.ndarray, k: int, ignore_index: int, pred_ignore: str
) -> np.ndarray:
    """Fast path for uint8 masks: one bincount over (gt << 8 | pred), then checks on the 256x256 table."""
    code = (gt.astype(np.uint16) << 8) | pred
    table = np.bincount(code.ravel(), minlength=65536).reshape(256, 256)
    ids = np.arange(256)
    allowed = (ids < k) | (ids == ignore_index)
    bad_gt = table.sum(axis=1).astype(bool) & ~allowed
    if bad_gt.any():
        raise _value_error("ground truth", int(np.argmax(bad_gt)), k, ignore_index)
    bad_pred = table.sum(axis=0).astype(bool) & ~allowed
    if bad_pred.any():
        raise _value_error("prediction", int(np.argmax(bad_pred)), k, ignore_index)
    conf = np.zeros((k, matrix_columns(k, pred_ignore)), dtype=np.int64)
    conf[:, :k] = table[:k, :k]
    conf[:, 0 if pred_ignore == "background" else k] += table[:k, ignore_index]
    return conf


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def scores(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class and mean scores from an accumulated confusion matrix.

    ``conf`` is [K, K] or [K, K+1] (the extra column: GT pixels predicted as
    ignore under ``pred_ignore="wrong"``; they are FN of their row's class and
    FP of no class). ``class_names`` has K names (index 0 = background).

    Per class: IoU = TP/(TP+FP+FN), precision = TP/(TP+FP), recall = TP/(TP+FN)
    (None where the denominator is 0), ``present`` = the class has GT pixels.
    ``miou``, ``mprecision`` and ``mrecall`` average over the present classes;
    a present class that is never predicted has no precision and is left out
    of ``mprecision`` (its recall 0 still counts in ``mrecall``). Scores are
    fractions in [0, 1]; everything returned is plain JSON-able Python.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be [K, K] or [K, K+1], not {list(conf.shape)}")
    k = conf.shape[0]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}-class confusion matrix")
    tp = np.diag(conf[:, :k])
    gt_pixels = conf.sum(axis=1)  # includes the "predicted ignore" column
    pred_pixels = conf[:, :k].sum(axis=0)
    fp = pred_pixels - tp
    fn = gt_pixels - tp

    rows: list[dict[str, Any]] = []
    for c in range(k):
        rows.append(
            {
                "id": c,
                "name": str(class_names[c]),
                "present": bool(gt_pixels[c] > 0),
                "iou": _ratio(tp[c], tp[c] + fp[c] + fn[c]),
                "precision": _ratio(tp[c], tp[c] + fp[c]),
                "recall": _ratio(tp[c], tp[c] + fn[c]),
                "tp": int(tp[c]),
                "fp": int(fp[c]),
                "fn": int(fn[c]),
                "gt_pixels": int(gt_pixels[c]),
                "pred_pixels": int(pred_pixels[c]),
            }
        )
    present = [r for r in rows if r["present"]]
    total = int(conf.sum())
    return {
        "classes": rows,
        "miou": _mean([r["iou"] for r in present]),
        "mprecision": _mean([r["precision"] for r in present]),
        "mrecall": _mean([r["recall"] for r in present]),
        "pixel_accuracy": _ratio(int(tp.sum()), total),
        "pixels": total,
        "classes_present": len(present),
        "pred_ignored_pixels": int(conf[:, k:].sum()),
    }
