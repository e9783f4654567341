"""Confusion matrix and scores (ssr_cli.metrics) against brute-force counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ssr_cli.metrics import confusion_matrix, empty_confusion, scores

pytestmark = pytest.mark.timeout(30)


def _loop_confusion(gt: np.ndarray, pred: np.ndarray, k: int, mode: str) -> np.ndarray:
    """Pixel-by-pixel reference, written without bincount."""
    out = np.zeros((k, k + (mode == "wrong")), dtype=np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if g == 255:
            continue
        if p == 255:
            p = 0 if mode == "background" else k
        out[g, p] += 1
    return out


@pytest.mark.parametrize("k", [2, 21, 81])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("mode", ["background", "wrong"])
def test_matches_pixel_loop(k: int, dtype: type, mode: str) -> None:
    rng = np.random.default_rng(k)
    gt = rng.integers(0, k, size=(37, 23))
    pred = rng.integers(0, k, size=(37, 23))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred[rng.random(pred.shape) < 0.1] = 255
    got = confusion_matrix(gt.astype(dtype), pred.astype(dtype), k, pred_ignore=mode)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _loop_confusion(gt, pred, k, mode))


def test_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(20, 30)).astype(np.uint8)
    gt[:2] = 255
    pred = np.where(gt == 255, 3, gt).astype(np.uint8)  # anything under GT 255 is ignored
    s = scores(confusion_matrix(gt, pred, 6), [f"c{i}" for i in range(6)])
    assert s["miou"] == 1.0 and s["mprecision"] == 1.0 and s["mrecall"] == 1.0
    assert s["pixel_accuracy"] == 1.0
    assert s["pixels"] == int((gt != 255).sum())
    absent = s["classes"][5]
    assert absent["present"] is False and absent["iou"] is None and absent["precision"] is None
    assert s["classes_present"] == 5


def test_gt_ignore_pixels_do_not_count() -> None:
    gt = np.array([[1, 1, 255, 255]], np.uint8)
    a = confusion_matrix(gt, np.array([[1, 1, 0, 2]], np.uint8), 3)
    b = confusion_matrix(gt, np.array([[1, 1, 2, 255]], np.uint8), 3)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 2 and a[1, 1] == 2


def test_miou_averages_present_classes_only() -> None:
    # GT has classes 0 and 1; the prediction also paints class 2 (absent from GT).
    gt = np.array([[0, 0, 0, 0, 1, 1, 1, 1]], np.uint8)
    pred = np.array([[0, 0, 0, 2, 1, 1, 2, 2]], np.uint8)
    s = scores(confusion_matrix(gt, pred, 3), ["bg", "a", "b"])
    iou0 = 3 / (3 + 0 + 1)
    iou1 = 2 / (2 + 0 + 2)
    assert s["classes"][2]["present"] is False
    assert s["classes"][2]["iou"] == 0.0  # defined (it has FP) but not averaged
    assert s["miou"] == pytest.approx((iou0 + iou1) / 2, abs=1e-12)
    assert s["mprecision"] == pytest.approx(1.0)
    assert s["mrecall"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert s["pixel_accuracy"] == pytest.approx(5 / 8)


def test_pred_ignore_modes() -> None:
    gt = np.array([[0, 0, 1, 1, 1, 2]], np.uint8)
    pred = np.array([[0, 255, 1, 255, 255, 2]], np.uint8)
    bg = confusion_matrix(gt, pred, 3, pred_ignore="background")
    np.testing.assert_array_equal(bg, confusion_matrix(gt, np.where(pred == 255, 0, pred), 3))
    wrong = confusion_matrix(gt, pred, 3, pred_ignore="wrong")
    assert wrong.shape == (3, 4) and wrong[:, 3].tolist() == [1, 2, 0]
    sb, sw = scores(bg, "abc"), scores(wrong, "abc")
    # "wrong": class 0 gets no FP from the uncertain class-1 pixels, and both lose recall
    assert sw["classes"][0]["precision"] == 1.0 and sb["classes"][0]["precision"] == pytest.approx(2 / 4)
    assert sw["classes"][0]["recall"] == 0.5 and sb["classes"][0]["recall"] == 1.0
    assert sw["classes"][1]["iou"] == pytest.approx(1 / 3) and sw["classes"][1]["fp"] == 0
    assert sw["pixel_accuracy"] == pytest.approx(3 / 6)
    assert sw["pred_ignored_pixels"] == 3 and sb["pred_ignored_pixels"] == 0
    assert sum(r["pred_pixels"] for r in sw["classes"]) == 3


def test_accumulated_matrix_equals_matrix_of_concatenation() -> None:
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 4, size=(5 + i, 7)).astype(np.uint8) for i in range(4)]
    preds = [rng.integers(0, 4, size=g.shape).astype(np.uint8) for g in gts]
    total = empty_confusion(4)
    for g, p in zip(gts, preds, strict=True):
        total += confusion_matrix(g, p, 4)
    flat = confusion_matrix(
        np.concatenate([g.ravel() for g in gts]), np.concatenate([p.ravel() for p in preds]), 4
    )
    np.testing.assert_array_equal(total, flat)


def test_undefined_ratios_are_none() -> None:
    gt = np.array([[1, 1]], np.uint8)
    pred = np.array([[0, 0]], np.uint8)
    s = scores(confusion_matrix(gt, pred, 3), ["bg", "a", "b"])
    bg, a, b = s["classes"]
    assert bg["precision"] == 0.0 and bg["recall"] is None and bg["present"] is False
    assert a["precision"] is None and a["recall"] == 0.0 and a["iou"] == 0.0
    assert b["iou"] is None and b["precision"] is None and b["recall"] is None
    assert s["miou"] == 0.0 and s["mprecision"] is None and s["mrecall"] == 0.0


@pytest.mark.parametrize(
    ("gt", "pred", "match"),
    [
        ([[0, 1]], [[0, 3]], "prediction has value 3"),
        ([[0, 1]], [[0, 254]], "prediction has value 254"),
        ([[0, 7]], [[0, 1]], "ground truth has value 7"),
        ([[0, 1]], [[0, 1, 1]], "shape"),
        ([[0, 255]], [[0, 9]], "prediction has value 9"),  # checked under GT-ignored pixels too
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int64])  # the uint8 fast path and the general one
def test_invalid_inputs(gt: list, pred: list, match: str, dtype: type) -> None:
    with pytest.raises(ValueError, match=match):
        confusion_matrix(np.array(gt, dtype), np.array(pred, dtype), 3)


def test_negative_and_float_predictions_rejected() -> None:
    gt = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="value -1"):
        confusion_matrix(gt, np.array([[0, -1], [0, 0]], np.int16), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(gt, np.zeros((2, 2), np.float32), 3)
    with pytest.raises(ValueError, match="pred_ignore"):
        confusion_matrix(gt, gt, 3, pred_ignore="skip")


def test_scores_checks_names_and_shape() -> None:
    with pytest.raises(ValueError, match="class names"):
        scores(np.eye(3, dtype=np.int64), ["a", "b"])
    with pytest.raises(ValueError, match="confusion matrix"):
        scores(np.zeros((3, 5), np.int64), "abc")


def test_all_pairs_counted_once() -> None:
    k = 4
    pairs = list(itertools.product(range(k), range(k)))
    gt = np.array([[g for g, _ in pairs]], np.uint8)
    pred = np.array([[p for _, p in pairs]], np.uint8)
    np.testing.assert_array_equal(confusion_matrix(gt, pred, k), np.ones((k, k), np.int64))
