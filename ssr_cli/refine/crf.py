"""From CAMs to a CRF unary, the dense CRF, and confidence-thresholded labels (METHOD.md section 4).

How CLIP-ES does it (``eval_cam_with_crf.py``, read as a fact): the unary stack is
``[bg, CAM_1, ..., CAM_C]`` with ``bg = (1 - max_c CAM_c) ** 1`` and the CAMs at
image resolution, NOT renormalised per pixel; ``pydensecrf.utils.unary_from_softmax``
turns it into ``-log(clip(p, 1e-5, 1))``; ``DenseCRF2D`` with a Gaussian term
(sxy=1, compat=3) and a bilateral term (sxy=67, srgb=3, compat=4), 10 iterations;
label = argmax, and pixels whose posterior max is below 0.95 become 255. (Its
bilateral image is the BGR image minus the VGG mean, cast back to uint8, which wraps
negative values around; we give the CRF the plain RGB image by default, because the
wrap-around turns dark pixels bright and so distorts the colour similarity of the
bilateral term; ``crf_image(image, "clip-es")`` reproduces CLIP-ES's image exactly for
exact reproduction, ``refine --crf-image clip-es``.)

Renormalising the stack per pixel (``normalise=True``, our default, so the stack is
a proper distribution as the docs of ``unary_from_softmax`` expect) changes every
label's unary at a pixel by the same constant ``log(sum)``, which mean-field
inference ignores: the posterior is the same as CLIP-ES's except where a value is
clipped at 1e-5.

Imports pydensecrf (the ``pydensecrf2`` package): import this module lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssr_cli.errors import ConfigError
from ssr_cli.refine.config import CRFParams

IGNORE = 255


CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)  # CLIP-ES's eval_cam_with_crf.py


def crf_image(image: np.ndarray, style: str = "rgb") -> np.ndarray:
    """The image the bilateral term sees: ``rgb`` = ``image`` (HxWx3 uint8 RGB) as it is;
    ``clip-es`` = CLIP-ES's: BGR minus its mean, cast to uint8 as numpy does on x86
    (truncation toward zero, then modulo 256: negative values wrap around)."""
    if style == "rgb":
        return image
    if style != "clip-es":
        from ssr_cli.errors import ConfigError

        raise ConfigError(f"unknown CRF image {style!r}", hint="use --crf-image rgb or clip-es")
    shifted = image[..., ::-1].astype(np.float32) - np.asarray(CLIP_ES_MEAN_BGR, np.float32)
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8))


def cams_to_probs(
    cams: np.ndarray,
    *,
    alpha: float | None = 1.0,
    bg_threshold: float | None = None,
    normalise: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """The CRF's unary stack ``[background, class 1..C]`` from CAMs.

    ``cams``: ``[C, H, W]`` float in [0, 1] (the image's present classes, at image
    resolution). Background score: ``(1 - max_c CAM_c) ** alpha`` (CLIP-ES: alpha
    1 for the CRF), or the constant ``bg_threshold`` when given (then ``alpha`` is
    ignored). ``normalise``: divide by the per-pixel sum so each pixel's scores sum
    to 1 (see the module docstring: the CRF posterior does not change). Returns
    ``[C + 1, H, W]`` float32; with no class at all (C = 0) the stack is all
    background.
    """
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    if cams.ndim != 3:
        raise ValueError(f"cams must be [C, H, W], got {cams.shape}")
    if bg_threshold is not None:
        if not 0.0 <= bg_threshold <= 1.0:
            raise ConfigError(f"background threshold must be in [0, 1], got {bg_threshold}")
        bg = np.full((1, *cams.shape[1:]), bg_threshold, np.float32)
    else:
        if alpha is None or alpha <= 0:
            raise ConfigError(f"background alpha must be > 0, got {alpha}")
        peak = cams.max(axis=0, keepdims=True) if len(cams) else np.zeros((1, *cams.shape[1:]), np.float32)
        bg = np.power(1.0 - peak, alpha, dtype=np.float32)
    probs = np.concatenate([bg, cams], axis=0)
    if normalise:
        probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), eps)
    return probs.astype(np.float32)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iters: int = CRFParams.iters,
    gauss_sxy: float = CRFParams.gauss_sxy,
    gauss_compat: float = CRFParams.gauss_compat,
    bilateral_sxy: float = CRFParams.bilateral_sxy,
    bilateral_srgb: float = CRFParams.bilateral_srgb,
    bilateral_compat: float = CRFParams.bilateral_compat,
    clip: float = 1e-5,
) -> np.ndarray:
    """Fully connected CRF posterior (Kraehenbuehl & Koltun, via pydensecrf).

    ``image``: ``[H, W, 3]`` uint8 RGB; ``probs``: ``[L, H, W]`` float, a
    softmax-like stack (e.g. :func:`cams_to_probs`); the unary is
    ``-log(clip(probs, clip, 1))``. Potts compatibilities, a Gaussian kernel
    (``gauss_sxy`` pixels) and a bilateral kernel (``bilateral_sxy`` pixels,
    ``bilateral_srgb`` intensity levels), ``iters`` mean-field steps. Returns the
    posterior ``[L, H, W]`` float32 (sums to 1 per pixel). Deterministic.
    """
    import pydensecrf.densecrf as dcrf

    image = np.asarray(image)  # pydensecrf needs a writable C-contiguous buffer: np.require below
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs {probs.shape} must be [L, H, W] with H, W of the image {image.shape[:2]}")
    if iters < 1:
        raise ConfigError(f"CRF iterations must be >= 1, got {iters}")
    n_labels, height, width = probs.shape
    if n_labels == 1:  # nothing to decide; pydensecrf needs two labels
        return np.ones_like(probs)
    unary = -np.log(np.clip(probs, clip, 1.0)).reshape(n_labels, -1)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy,
        srgb=bilateral_srgb,
        rgbim=np.require(image, requirements=["C", "W"]),
        compat=bilateral_compat,
    )
    posterior = np.asarray(crf.inference(int(iters)), dtype=np.float32)
    return posterior.reshape(n_labels, height, width)


def labels_with_confidence(
    posterior: np.ndarray, class_ids: Sequence[int], conf_thresh: float | None = 0.95
) -> np.ndarray:
    """Argmax labels with low-confidence pixels set to 255 (ignored by the segmenter's loss).

    ``posterior``: ``[L, H, W]``; ``class_ids``: the label id of each of the L
    channels (e.g. ``[0, *present_class_ids]``, background first); ``conf_thresh``:
    a pixel whose posterior max is below it becomes 255 (CLIP-ES: 0.95; None keeps
    every pixel). Returns ``[H, W]`` uint8.
    """
    posterior = np.asarray(posterior)
    ids = np.asarray(list(class_ids), dtype=np.int64)
    if posterior.ndim != 3 or len(ids) != posterior.shape[0]:
        raise ValueError(f"posterior {posterior.shape} needs one class id per channel, got {len(ids)}")
    if ids.size and (ids.min() < 0 or ids.max() > 254):
        raise ValueError(f"class ids must be in 0..254, got {ids.tolist()}")
    labels = ids[np.argmax(posterior, axis=0)].astype(np.uint8)
    if conf_thresh is not None:
        labels[posterior.max(axis=0) < conf_thresh] = IGNORE
    return labels
