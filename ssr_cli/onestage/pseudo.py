"""Online pseudo-masks of single-stage SSR: one label map per training image, every step.

For each image of the step (its augmented, resized tensor and its GradCAMs through the
current CMPA heads, the same CAMs the prototype loss pools with):

1. affinity: the CLIP attention of the last ``clip_blocks`` blocks (from the step's own CLIP
   forward) and, with ``clip+dino``, DINO's attention of the same augmented image on the same
   grid, fused as ``refine`` fuses them (``refine.affinity.fuse_affinity``: each normalised,
   weighted 0.4 : 0.6, symmetrised, squared);
2. column mask (``--mask sgc``; ``box``: CLIP-ES's boxes; ``none``): SGC's superpixel regions
   (``refine.sgc``: target regions where at least ``region_thresh`` of a region is
   high-confidence CAM, pooled to the patch grid). The superpixels and their colour clusters
   are computed ONCE per image (on the plain image at ``--size``, in a thread pool ahead of
   the loop) and kept as a region map of ``REGION_CELLS`` x ``REGION_CELLS`` cells per patch;
   a step resizes that map (nearest) to its own grid and mirrors it with the image: the colour
   jitter is not seen by SLIC;
3. ``refine_cams`` (masked propagation, min-max), upsampled bilinearly to the label grid
   (``REGION_CELLS`` cells per patch side), background ``(1 - max_c CAM_c) ** bg_alpha``,
   argmax; pixels whose top score is below ``conf_thresh`` become 255 (0: none). No CRF.

Imports torch: import lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD
from ssr_cli.onestage.config import REGION_CELLS
from ssr_cli.refine.config import SGCParams


def superpixel_regions(path: Path, side: int, cells: int, params: SGCParams) -> tuple[np.ndarray, int]:
    """(region map [cells, cells] uint16/int32, region count) of an image resized to ``side`` x ``side``."""
    import cv2
    from PIL import Image

    from ssr_cli.data import read_image
    from ssr_cli.refine.sgc import superpixels_of

    pil = Image.fromarray(read_image(path))
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.Resampling.BICUBIC)
    image = np.asarray(pil, dtype=np.uint8)
    sp = superpixels_of(image, params)
    regions, count = sp.regions(params.region_mode)
    small = cv2.resize(regions.astype(np.int32), (cells, cells), interpolation=cv2.INTER_NEAREST)
    return small.astype(np.uint16 if count < 2**16 else np.int32), int(count)


class RegionCache:
    """The superpixel region maps of the training images, computed once each in a thread pool."""

    def __init__(self, paths: Sequence[Path], side: int, cells: int, params: SGCParams, workers: int) -> None:
        self.paths, self.side, self.cells, self.params = list(paths), side, cells, params
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.found: dict[int, Future] = {}

    def submit(self, indices: Sequence[int]) -> None:
        for i in indices:
            if i not in self.found:
                self.found[i] = self.pool.submit(
                    superpixel_regions, self.paths[i], self.side, self.cells, self.params
                )

    def get(self, index: int) -> tuple[np.ndarray, int]:
        self.submit([index])
        return self.found[index].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def dino_input(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images -> ImageNet-normalised (DINO's), same pixels."""
    from ssr_cli.models.dino import IMAGENET_MEAN, IMAGENET_STD

    def stats(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    rgb = x * stats(CLIP_STD) + stats(CLIP_MEAN)
    return (rgb - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)


def dino_grid_attention(
    dino: Any, x: torch.Tensor, grid: tuple[int, int], blocks: int | Sequence[int], precision: str
) -> torch.Tensor:
    """DINO's patch attention [N, h*w, h*w] on CLIP's grid ``grid`` for CLIP-normalised images ``x``;
    ``blocks``: N = the last N blocks, or block indices (``ssr_cli.models.attention``)."""
    from ssr_cli.refine.affinity import resample_attention

    blocks = blocks if isinstance(blocks, int) else tuple(blocks)
    p = dino.patch_size
    xd = dino_input(x)
    if p == x.shape[-1] // grid[1]:
        return dino.attention(xd, blocks, precision)
    own = (max(1, round(x.shape[-2] / p)), max(1, round(x.shape[-1] / p)))
    xd = F.interpolate(xd, size=(own[0] * p, own[1] * p), mode="bilinear", align_corners=False)
    attn = dino.attention(xd, blocks, precision)
    return torch.stack([resample_attention(a, own, grid) for a in attn])


def sgc_grid_masks(regions: np.ndarray, count: int, cams: torch.Tensor, params: SGCParams) -> torch.Tensor:
    """SGC column masks [C, h, w] (float32 {0, 1}) from a region map [h*c, w*c] and CAMs [C, h, w]."""
    from ssr_cli.refine.sgc import pool_to_grid, target_regions

    n_cls, h, w = cams.shape
    fine = F.interpolate(cams[None].float(), size=regions.shape, mode="bilinear", align_corners=False)[0]
    regions = regions.astype(np.int64)
    _, targets = target_regions(
        regions, count, fine.cpu().numpy(), high_conf=params.high_conf, region_thresh=params.region_thresh
    )
    masks = np.stack([pool_to_grid(chosen[regions], (h, w), params.patch_fraction) for chosen in targets])
    return torch.from_numpy(masks.astype(np.float32))


def pseudo_masks(
    cams: Sequence[torch.Tensor],
    present: Sequence[Sequence[int]],
    affinity: torch.Tensor | None,
    regions: Sequence[tuple[np.ndarray, int]] | None,
    flips: Sequence[bool],
    cfg: Any,
) -> torch.Tensor:
    """Label maps [N, h*c, w*c] (int64: 0 background, 1..K classes, 255 ignored) of one step.

    ``cams``: per image [C_i, h, w] (GradCAM, min-max normalised); ``present``: per image the
    0-based class indices of those maps; ``affinity``: [N, h*w, h*w] fused affinity or None;
    ``regions``: per image the precomputed (region map at the base size, count) or None (no
    SGC mask); ``flips``: whether each image was mirrored; ``cfg``: the ``SsrConfig``.
    """
    from ssr_cli.refine.affinity import refine_cams

    c = REGION_CELLS
    labels = []
    for i, maps in enumerate(cams):
        n_cls, h, w = maps.shape
        out_hw = (h * c, w * c)
        if n_cls == 0:
            labels.append(torch.zeros(out_hw, dtype=torch.long))
            continue
        masks = None
        if regions is not None:
            base, count = regions[i]
            import cv2

            grid_map = cv2.resize(
                base.astype(np.int32), (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST
            )
            if flips[i]:
                grid_map = np.ascontiguousarray(grid_map[:, ::-1])
            masks = sgc_grid_masks(grid_map, count, maps, cfg.sgc)
        elif cfg.mask == "box" and affinity is not None:  # CLIP-ES's boxes around the CAM > 0.4 max
            from ssr_cli.refine.affinity import box_masks
            from ssr_cli.refine.config import BOX_THRESH_DEFAULT

            masks = box_masks(maps.float().cpu(), BOX_THRESH_DEFAULT)
        if affinity is not None:
            refined = refine_cams(affinity[i].float().cpu(), maps.float().cpu(), masks)
        else:
            refined = maps.float().cpu()
        up = F.interpolate(refined[None], size=out_hw, mode="bilinear", align_corners=False)[0].clamp(0, 1)
        bg = (1.0 - up.max(dim=0, keepdim=True).values) ** cfg.bg_alpha
        scores = torch.cat([bg, up], dim=0)
        ids = torch.tensor([0, *[k + 1 for k in present[i]]], dtype=torch.long)
        best = scores.argmax(dim=0)
        label = ids[best]
        if cfg.conf_thresh > 0:
            probs = scores / scores.sum(dim=0, keepdim=True).clamp_min(1e-8)
            label = torch.where(probs.max(dim=0).values < cfg.conf_thresh, torch.full_like(label, 255), label)
        labels.append(label)
    return torch.stack(labels)
