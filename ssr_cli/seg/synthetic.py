"""A synthetic dataset of coloured shapes with exact masks, for tests, benchmarks and smoke runs.

``make_shapes_dataset(root, ...)`` writes a custom-layout dataset (see
``ssr_cli.data.layouts``)::

    root/images/<id>.png     RGB, textured grey background with 1-2 shapes
    root/masks/<id>.png      palette PNG: 0 background, 1 red, 2 green, 3 blue shapes
    root/vocab.json          {"name": "shapes", "classes": ["red", "green", "blue"]}
    root/splits/<split>.txt  ids per split

The class of a shape is its colour (with jitter) and its shape is random
(rectangle, ellipse, triangle), so a segmenter can learn it from a few images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from ssr_cli.data.images import write_label_png

CLASSES = ("red", "green", "blue")
_COLOURS = {1: (210, 40, 40), 2: (40, 190, 60), 3: (50, 70, 220)}


def shapes_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8 RGB, mask HxW uint8) pair."""
    base = rng.integers(90, 170)
    image = np.clip(base + rng.normal(0, 18, (height, width, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, 4))
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[cls])
        shape = np.zeros((height, width), np.uint8)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        ry = int(rng.integers(max(3, height // 6), max(4, height * 2 // 5)))
        rx = int(rng.integers(max(3, width // 6), max(4, width * 2 // 5)))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.rectangle(shape, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, thickness=-1)
        elif kind == 1:
            cv2.ellipse(shape, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        else:
            points = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], np.int32)
            cv2.fillPoly(shape, [points], 1)
        inside = shape.astype(bool)
        image[inside] = colour
        mask[inside] = cls
    return image, mask


def make_shapes_dataset(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    size: tuple[int, int] = (72, 88),
    seed: int = 0,
) -> Path:
    """Write the dataset (module docstring) with ``splits`` = {name: image count}; returns ``root``.

    ``size``: (min, max) side length in pixels; each image gets its own height and width.
    """
    root = Path(root)
    splits = dict(splits or {"train": 8, "val": 4})
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    (root / "vocab.json").write_text(
        json.dumps({"name": "shapes", "classes": list(CLASSES)}), encoding="utf-8"
    )
    for split, count in splits.items():
        ids = []
        for index in range(count):
            image_id = f"{split}_{index:04d}"
            h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
            image, mask = shapes_image(rng, h, w)
            cv2.imwrite(str(root / "images" / f"{image_id}.png"), image[:, :, ::-1])
            write_label_png(root / "masks" / f"{image_id}.png", mask)
            ids.append(image_id)
        (root / "splits" / f"{split}.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    return root
