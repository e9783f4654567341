"""Dataset summaries and the optional full decode check behind ``ssr data check``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.artefacts import atomic_write_text
from ssr_cli.data.datasets import Dataset, Item
from ssr_cli.data.images import read_image, read_mask
from ssr_cli.data.labelfile import format_label_file
from ssr_cli.errors import DataError
from ssr_cli.parallel import parallel_map

__all__ = ["decode_all", "summarize", "write_label_file"]


def summarize(dataset: Dataset) -> dict[str, Any]:
    """``describe()`` plus per-class image counts and label statistics (JSON-able)."""
    counts = dataset.class_counts()
    summary = dataset.describe()
    summary.update(
        {
            "has_gt": dataset.has_gt,
            "images_without_labels": sum(not item.labels for item in dataset.items),
            "labels_per_image": (
                round(sum(len(item.labels) for item in dataset.items) / len(dataset), 3)
                if len(dataset)
                else 0.0
            ),
            "classes": [
                {"id": index + 1, "name": name, "images": counts[index]}
                for index, name in enumerate(dataset.vocab.classes)
            ],
        }
    )
    return summary


IGNORE_INDEX = 255


def _check_mask_values(mask: np.ndarray, path: Path, num_classes: int) -> None:
    """DataError when the mask holds ids that are neither classes of the vocabulary nor 255,
    the values ``ssr eval`` refuses."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DataError(
            f"mask has value(s) {shown} outside the class ids 0..{num_classes - 1} of the vocabulary "
            "(255 = ignore)",
            path=path,
            hint="fix the mask, or pass the vocabulary it was made with (--vocab)",
        )


def _decode_one(item: Item, num_classes: int) -> str | None:
    """Decode an item's image (and mask, checking its values); the problem as one line, or None."""
    try:
        image = read_image(item.image)
        if item.gt is not None:
            mask = read_mask(item.gt)
            if mask.shape != image.shape[:2]:
                (mh, mw), (ih, iw) = mask.shape, image.shape[:2]
                raise DataError(f"mask is {mw}x{mh} but its image is {iw}x{ih}", path=item.gt)
            _check_mask_values(mask, item.gt, num_classes)
    except DataError as exc:
        return exc.one_line()
    return None


def decode_all(dataset: Dataset, workers: int = 0) -> list[str]:
    """Decode every image and mask (thread pool); the problems found, one line each.

    Masks must also hold only what ``ssr eval`` accepts: class ids of the vocabulary or 255."""
    check = functools.partial(_decode_one, num_classes=dataset.vocab.num_classes)
    problems = parallel_map(check, dataset.items, "decoding images", workers=workers)
    return [p for p in problems if p is not None]


def write_label_file(dataset: Dataset, path: str | Path) -> Path:
    """Write the dataset's image-level labels as a label file (atomically)."""
    header = (
        f"image-level labels of {dataset.layout} split '{dataset.split}' ({len(dataset)} images), "
        f"from {dataset.label_source}, vocabulary {dataset.vocab.name}"
    )
    text = format_label_file(((item.id, item.labels) for item in dataset.items), dataset.vocab, header)
    return atomic_write_text(path, text)
