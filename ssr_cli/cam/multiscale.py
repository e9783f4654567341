"""Multi-scale, flipped GradCAM for a batch of images of one size, with CLIP's attention taken
from the same forward (what ``ssr make-seeds`` stores per image).

Imports torch: import this module lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def cams_and_attention(
    model: Any,
    images: Sequence[np.ndarray],
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    precision: str = "fp32",
    image_head: Any = None,
    text_head: Any = None,
    attn_blocks: int | None = None,
    target: str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """CAMs [C_i, h, w] for images of one network size (h, w: the scale-1.0 patch grid) and, with
    ``attn_blocks`` (n = the last n blocks), CLIP's attention [N, h*w, h*w] float32 (CPU) of the
    scale-1.0 un-flipped input (``ClipModel.attention``).

    One GradCAM call per (scale, flip) variant covers every image and class of the batch. With
    one scale and no flip the CAMs are GradCAM's as they are (CLIP-ES); otherwise they are
    merged by ``merge_scales`` (resize to the scale-1.0 grid, sum, min-max normalise).

    The attention comes from the same forward as the scale-1.0 un-flipped CAMs
    (``TrunkTokens`` passed to GradCAM), which it does not change: the trunk's tokens
    are the same with or without it, and each block's attention is the softmax its
    forward computes anyway. Without a scale 1.0 it costs a forward of its own.
    """
    from ssr_cli.cam.gradcam import gradcam, merge_scales

    p = model.patch_size
    h0, w0 = model.resized_size(*images[0].shape[:2], 1.0)
    grid = (h0 // p, w0 // p)
    variants: list[list[tuple[torch.Tensor, bool]]] = [[] for _ in images]
    attn: torch.Tensor | None = None
    for scale in scales:
        x = torch.stack([model.preprocess(im, scale) for im in images]).to(model.device)
        for flipped in (False, True) if flip else (False,):
            source: Any = x.flip(-1) if flipped else x
            if attn_blocks is not None and attn is None and scale == 1.0 and not flipped:
                source = model.trunk_tokens(x, attn_blocks=attn_blocks, precision=precision)
                attn = source.attn.float().cpu()
            cams = gradcam(
                model,
                source,
                present,
                fg,
                bg,
                image_head=image_head,
                text_head=text_head,
                precision=precision,
                target=target,
            )
            for i, cam in enumerate(cams):
                variants[i].append((cam, flipped))
    if attn_blocks is not None and attn is None:  # no scale 1.0: a forward of its own
        x = torch.stack([model.preprocess(im, 1.0) for im in images]).to(model.device)
        attn = model.attention(x, blocks=attn_blocks, precision=precision).cpu()
    out = []
    for parts in variants:
        if len(parts) == 1 and tuple(parts[0][0].shape[-2:]) == grid:
            out.append(parts[0][0])
        elif parts[0][0].shape[0] == 0:
            out.append(torch.zeros(0, *grid))
        else:
            out.append(merge_scales([c for c, _ in parts], grid, [f for _, f in parts]))
    return out, attn
