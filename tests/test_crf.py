"""Dense CRF (real pydensecrf), the unary stack from CAMs, confidence-thresholded labels."""

from __future__ import annotations

import inspect

import cv2
import numpy as np
import pytest

from ssr_cli.errors import ConfigError
from ssr_cli.refine.config import CRF_DEFAULTS
from ssr_cli.refine.crf import cams_to_probs, dense_crf, labels_with_confidence

pytestmark = pytest.mark.timeout(60)

H, W = 120, 160


def shapes_scene(seed: int = 0):
    """A yellow square and a blue disc on a grey noisy background, and CAMs that are the shapes
    blurred (sigma 9) and scaled so that the argmax of the raw stack overflows the edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    square = (abs(yy - 60) < 25) & (abs(xx - 45) < 25)
    disc = (yy - 55) ** 2 + (xx - 115) ** 2 < 24**2
    img = np.full((H, W, 3), 110.0) + rng.normal(0, 6, (H, W, 3))
    img[square] = (220, 200, 40)
    img[disc] = (40, 70, 210)
    image = np.clip(img, 0, 255).astype(np.uint8)
    cams = []
    for shape in (square, disc):
        c = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), 9)
        cams.append(np.clip(1.6 * c / c.max(), 0, 1))
    return image, np.stack(cams), (square, disc)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_crf_snaps_blurred_cams_to_the_edges():
    image, cams, shapes = shapes_scene()
    probs = cams_to_probs(cams)
    before = np.argmax(probs, axis=0)
    posterior = dense_crf(image, probs)
    after = np.argmax(posterior, axis=0)
    assert posterior.shape == probs.shape and posterior.dtype == np.float32
    np.testing.assert_allclose(posterior.sum(axis=0), 1.0, atol=1e-4)
    for label, shape in enumerate(shapes, start=1):
        gain = iou(after == label, shape) - iou(before == label, shape)
        assert iou(after == label, shape) > 0.9 and gain > 0.1, (label, iou(before == label, shape), gain)


def test_crf_is_deterministic_and_normalising_changes_nothing():
    image, cams, _ = shapes_scene(seed=1)
    first = dense_crf(image, cams_to_probs(cams))
    assert np.array_equal(first, dense_crf(image, cams_to_probs(cams)))
    # two classes: the raw stack does not sum to 1, so normalising really changes the input,
    # but a per-pixel constant in the unary is invisible to mean-field inference
    raw = cams_to_probs(cams, normalise=False)
    assert np.abs(raw.sum(axis=0) - 1).max() > 0.1
    np.testing.assert_allclose(dense_crf(image, raw), first, atol=1e-4)


def test_crf_takes_read_only_and_strided_images():
    """Library callers hand over what PIL or a view gives them: np.asarray(Image) is read-only,
    a BGR flip is a strided view; pydensecrf needs a writable C buffer, so dense_crf copies."""
    image, cams, _ = shapes_scene(seed=2)
    probs = cams_to_probs(cams)
    expected = dense_crf(image, probs)
    frozen = image.copy()
    frozen.setflags(write=False)
    np.testing.assert_array_equal(dense_crf(frozen, probs), expected)
    flipped = np.ascontiguousarray(image[..., ::-1])[..., ::-1]  # same pixels, negative stride
    assert not flipped.flags.c_contiguous
    np.testing.assert_array_equal(dense_crf(flipped, probs), expected)


def test_crf_parameters_matter_and_defaults_are_clip_es():
    image, cams, _ = shapes_scene()
    probs = cams_to_probs(cams)
    base = dense_crf(image, probs)
    assert np.abs(dense_crf(image, probs, bilateral_compat=0.0, gauss_compat=0.0) - base).max() > 0.1
    assert np.abs(dense_crf(image, probs, iters=1) - base).max() > 1e-3
    defaults = {k: v.default for k, v in inspect.signature(dense_crf).parameters.items() if k in CRF_DEFAULTS}
    assert (
        defaults
        == CRF_DEFAULTS
        == {
            "iters": 10,
            "gauss_sxy": 1.0,
            "gauss_compat": 3.0,
            "bilateral_sxy": 67.0,
            "bilateral_srgb": 3.0,
            "bilateral_compat": 4.0,
        }
    )
    with pytest.raises(ValueError):
        dense_crf(image, probs[:, :10])
    with pytest.raises(ConfigError):
        dense_crf(image, probs, iters=0)
    single = dense_crf(image, probs[:1])
    assert single.shape == (1, H, W) and np.all(single == 1)


def test_cams_to_probs_background_rules():
    cams = np.array([[[0.0, 0.5, 1.0]], [[0.2, 0.1, 0.3]]], np.float32)  # [2, 1, 3]
    raw = cams_to_probs(cams, alpha=1.0, normalise=False)
    np.testing.assert_allclose(raw[0], [[0.8, 0.5, 0.0]])
    np.testing.assert_allclose(raw[1:], cams)
    sq = cams_to_probs(cams, alpha=2.0, normalise=False)
    np.testing.assert_allclose(sq[0], [[0.64, 0.25, 0.0]], atol=1e-6)
    norm = cams_to_probs(cams, alpha=2.0)
    np.testing.assert_allclose(norm.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(norm[:, 0, 1], np.array([0.25, 0.5, 0.1]) / 0.85, atol=1e-6)
    const = cams_to_probs(cams, bg_threshold=0.4, normalise=False)
    np.testing.assert_allclose(const[0], 0.4)
    only_bg = cams_to_probs(np.zeros((0, 2, 2), np.float32))
    assert only_bg.shape == (1, 2, 2) and np.all(only_bg == 1)
    with pytest.raises(ConfigError):
        cams_to_probs(cams, alpha=0)
    with pytest.raises(ConfigError):
        cams_to_probs(cams, bg_threshold=1.5)


def test_labels_with_confidence():
    post = np.zeros((3, 2, 3), np.float32)
    post[:, 0, 0] = (0.97, 0.02, 0.01)  # background, confident
    post[:, 0, 1] = (0.05, 0.95, 0.00)  # class 15, exactly at the threshold: kept
    post[:, 0, 2] = (0.10, 0.10, 0.80)  # class 3, unsure
    post[:, 1, 0] = (0.50, 0.49, 0.01)  # background, unsure
    post[:, 1, 1] = (0.00, 0.01, 0.99)  # class 3, confident
    post[:, 1, 2] = (0.00, 0.96, 0.04)  # class 15, confident
    labels = labels_with_confidence(post, [0, 15, 3])
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 15, 255], [255, 3, 15]]
    assert labels_with_confidence(post, [0, 15, 3], conf_thresh=None).tolist() == [[0, 15, 3], [0, 3, 15]]
    assert labels_with_confidence(post, [0, 15, 3], conf_thresh=0.5).tolist() == [[0, 15, 3], [0, 3, 15]]
    with pytest.raises(ValueError):
        labels_with_confidence(post, [0, 15])
    with pytest.raises(ValueError):
        labels_with_confidence(post, [0, 15, 255])


def test_crf_labels_end_to_end_mark_unsure_edges():
    image, cams, shapes = shapes_scene()
    labels = labels_with_confidence(dense_crf(image, cams_to_probs(cams)), [0, 7, 12])
    assert set(np.unique(labels).tolist()) <= {0, 7, 12, 255}
    interior = cv2.erode(shapes[0].astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
    assert np.mean(labels[interior] == 7) > 0.95
    assert 0 < np.mean(labels == 255) < 0.3


def test_crf_image_clip_es_reproduces_its_uint8_wraparound() -> None:
    """CLIP-ES hands its CRF cv2's BGR image minus (104.008, 116.669, 122.675), cast to uint8:
    written here the way its code computes it (float32 array, numpy astype on x86)."""
    from ssr_cli.refine.crf import crf_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    bgr = rgb[..., ::-1].astype(np.float32)
    bgr -= (104.008, 116.669, 122.675)
    want = bgr.astype(np.uint8)  # what CLIP-ES's line does (negative values wrap around)
    got = crf_image(rgb, "clip-es")
    assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, want)
    assert (rgb[..., 2] < 104).any() and (got[..., 0][rgb[..., 2] < 104] > 150).all()  # wrapped
    assert crf_image(rgb, "rgb") is rgb
