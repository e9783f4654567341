"""From CAMs to a label map (numpy only, no torch).

CLIP-ES (``eval_cam.py``): background score = (1 - max_c CAM_c) ** alpha (alpha
searched in {1, 2}), or a constant threshold (0.05 .. 0.6) padded in as the
background "CAM"; label = argmax over [background, classes] (ties go to the
first, i.e. background), mapped to class ids. CAMs are brought to image size with
``cv2.resize`` (bilinear, half-pixel centres), which ``upsample_cams`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def upsample_cams(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, h, w] -> [C, H, W] float32 by bilinear interpolation with half-pixel centres.

    ``size`` is (H, W). ``cv2.resize(..., interpolation=INTER_LINEAR)`` (what CLIP-ES uses),
    which equals ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    (no antialiasing) to float rounding; OpenCV takes up to 512 channels at once.
    """
    import cv2

    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"expected CAMs of shape [C, h, w], got {cams.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if cams.shape[1:] == (out_h, out_w):
        return cams.copy()
    if cams.shape[0] == 0:
        return np.zeros((0, out_h, out_w), np.float32)
    chunks = []
    for start in range(0, cams.shape[0], 512):
        part = np.ascontiguousarray(cams[start : start + 512].transpose(1, 2, 0))
        up = cv2.resize(part, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        chunks.append(up.reshape(out_h, out_w, -1).transpose(2, 0, 1))  # a view: [C, H, W]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)


def background_score(
    cams: np.ndarray, alpha: float | None = 1.0, bg_threshold: float | None = None
) -> np.ndarray:
    """[H, W] background score: ``bg_threshold`` everywhere when given, else (1 - max_c CAM_c) ** alpha."""
    cams = np.asarray(cams, dtype=np.float32)
    if bg_threshold is not None:
        return np.full(cams.shape[1:], float(bg_threshold), dtype=np.float32)
    if alpha is None:
        raise ValueError("give alpha or bg_threshold")
    peak = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:], dtype=np.float32)
    return np.power(np.clip(1.0 - peak, 0.0, None), float(alpha)).astype(np.float32)


def cams_to_labels(
    cams: np.ndarray,
    class_ids: Sequence[int],
    alpha: float | None = 1.0,
    bg_threshold: float | None = None,
) -> np.ndarray:
    """[C, H, W] CAMs in [0, 1] of the classes ``class_ids`` (1..K) -> [H, W] uint8 labels.

    0 is background. ``bg_threshold`` (a constant background score) wins over
    ``alpha`` when both are given.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != len(class_ids):
        raise ValueError(f"CAMs {cams.shape} do not match {len(class_ids)} class ids")
    ids = np.asarray([0, *class_ids], dtype=np.int64)
    if ids.max() > 255 or ids.min() < 0:
        raise ValueError("class ids must lie in 0..255 for uint8 label maps")
    scores = np.concatenate([background_score(cams, alpha, bg_threshold)[None], cams], axis=0)
    return ids[np.argmax(scores, axis=0)].astype(np.uint8)
