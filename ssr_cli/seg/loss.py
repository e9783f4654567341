"""Segmentation losses that ignore 255 and never return NaN.

``balanced`` (default): the mean cross-entropy over background pixels (label 0)
and the mean over foreground pixels (labels 1..K-1) are averaged with equal
weight, so large background areas do not drown the objects; when one of the two
groups has no pixel in the batch, the other alone is the loss. ``ce``: the plain
mean over all labelled pixels. A batch without any labelled pixel (all 255)
gives a zero loss that still has a graph (so DDP's gradient all-reduce runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssr_cli.seg.config import LOSSES as LOSSES  # re-exported; named with the settings

IGNORE = 255


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    count = mask.sum()
    if int(count) == 0:
        return None
    return (per_pixel * mask).sum() / count


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "balanced") -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, K, H, W) against ``target`` (N, H, W) int64, 255 ignored.

    Returns a scalar. ``kind``: ``balanced`` or ``ce`` (see the module docstring).
    """
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {kind!r}")
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    valid = target != IGNORE
    zero = logits.sum() * 0.0
    if kind == "ce":
        mean = _masked_mean(per_pixel, valid.float())
        return zero if mean is None else mean
    parts = [
        part
        for part in (
            _masked_mean(per_pixel, (target == 0).float()),
            _masked_mean(per_pixel, (valid & (target != 0)).float()),
        )
        if part is not None
    ]
    if not parts:
        return zero
    return torch.stack(parts).mean()
