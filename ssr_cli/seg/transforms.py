"""Label-aligned augmentation and input normalisation for the segmenter.

Images are HxWx3 uint8 RGB, labels HxW uint8 class ids with 255 = ignore. Every
random choice comes from the ``numpy.random.Generator`` passed in, so a sample is
a pure function of its generator's seed (see ``data.py``).

This code runs in forked DataLoader workers, so it uses PIL and numpy only:
OpenCV's thread pool does not survive ``fork`` (a forked child that calls into it
after the parent used it can hang).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE = 255


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32, ``(x / 255 - mean) / std`` per channel."""
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    out = image.astype(np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize_pair(
    image: np.ndarray, label: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and label (nearest) to ``height`` x ``width``."""
    size = (int(width), int(height))
    return (
        np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)),
        np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST)),
    )


def random_scale_crop_flip(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 1.5),
    flip: bool = True,
    fill: Sequence[int] = (124, 116, 104),
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, pad, crop and horizontal flip applied identically to image and label.

    ``image`` HxWx3 uint8, ``label`` HxW uint8 of the same size. The scaled pair is
    padded to at least ``crop_size`` on each side (image with ``fill``, the mean
    colour, label with 255 so padding never counts in the loss), then a
    ``crop_size`` x ``crop_size`` window is cut. Returns (crop HxWx3 uint8, label
    crop HxW uint8).
    """
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
    low, high = scale_range
    scale = float(rng.uniform(low, high)) if high > low else float(low)
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image, label = resize_pair(image, label, nh, nw)
    ph, pw = max(crop_size - nh, 0), max(crop_size - nw, 0)
    if ph or pw:
        padded = np.empty((nh + ph, nw + pw, 3), np.uint8)
        padded[:] = np.asarray(fill, np.uint8)
        padded[:nh, :nw] = image
        image = padded
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    h, w = label.shape
    top = int(rng.integers(0, h - crop_size + 1))
    left = int(rng.integers(0, w - crop_size + 1))
    image = image[top : top + crop_size, left : left + crop_size]
    label = label[top : top + crop_size, left : left + crop_size]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
