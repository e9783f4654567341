"""Attention affinities and the affinity refinement of CAMs (CLIP-ES CAA, SSR SGC).

Layouts: a CAM grid is ``[h, w]`` (the ViT patch grid, row-major); an affinity is
``[hw, hw]`` with ``A[i, j]`` the attention of query patch ``i`` to key patch ``j``
(``i = row * w + col``). A stack of CAMs or masks is ``[C, h, w]``.

What CLIP-ES does (``generate_cams_voc12.py``, read as a fact, not copied):

1. ``T = A / colsum(A)``, then ``T = T / rowsum(T)``; the pair is repeated twice
   more (3 column/row passes in all);
2. ``T = (T + T^T) / 2``, then ``T = T @ T`` (squared once);
3. the class mask (boxes around the thresholded CAM) multiplies the COLUMNS of
   ``T`` (``T * mask[None, :]``), so only masked key patches pass CAM mass on;
4. ``refined = T_masked @ vec(CAM)``, reshaped to ``[h, w]`` and min-max normalised
   (``x - min``, then ``/ (max + 1e-7)``, pytorch-grad-cam's ``scale_cam_image``),
   before being resized to the image.

SSR's SGC (METHOD.md section 3, our reading): each attention source is normalised
as in step 1, the sources are summed with weights (CLIP 0.4, DINO 0.6), and steps
2-4 follow with the superpixel mask in place of the box mask. With the CLIP source
alone, :func:`fuse_affinity` is exactly CAA's ``T``.

Imports torch and cv2: import this module lazily (inside command bodies).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ssr_cli.errors import ConfigError
from ssr_cli.refine.config import AFFINITY_WEIGHTS, BOX_THRESH_DEFAULT

#: SSR's fusion weights (``refine.config.AFFINITY_WEIGHTS``; paper: CLIP : DINO = 0.4 : 0.6).
DEFAULT_WEIGHTS: dict[str, float] = {"clip": AFFINITY_WEIGHTS[0], "dino": AFFINITY_WEIGHTS[1]}
#: CLIP-ES: one column/row pass, then two more (3 in all).
NORMALISE_ITERS = 3
_TINY = 1e-12


def normalise_attention(attn: torch.Tensor, iters: int = NORMALISE_ITERS) -> torch.Tensor:
    """Alternate column and row normalisation, ``iters`` times (CLIP-ES: 3).

    ``attn``: ``[..., hw, hw]`` non-negative (query rows, key columns), any leading
    batch dims. Each pass divides by the column sums (sum over queries, dim -2),
    then by the row sums (dim -1), so the result's rows sum to 1 exactly and its
    columns to 1 approximately (a Sinkhorn iteration). Returns float32 (float64
    stays float64); no symmetrisation here.
    """
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [..., hw, hw], got {tuple(attn.shape)}")
    t = attn if attn.dtype == torch.float64 else attn.float()
    for _ in range(iters):
        t = t / t.sum(dim=-2, keepdim=True).clamp_min(_TINY)
        t = t / t.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return t


def fuse_affinity(
    sources: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
    *,
    iters: int = NORMALISE_ITERS,
    power: int = 2,
) -> torch.Tensor:
    """Fuse attention sources into one affinity (SGC), or CAA's affinity for one source.

    ``sources``: name -> ``[hw, hw]`` head-averaged patch-to-patch attention, all on
    the same grid (resample DINOv2 first, :func:`resample_attention`). ``weights``:
    name -> weight (default :data:`DEFAULT_WEIGHTS`); only the sources given are
    used and their weights are rescaled to sum to 1, so a single source gives
    CLIP-ES's matrix exactly. Each source is normalised (:func:`normalise_attention`),
    the weighted sum is symmetrised ``(T + T^T) / 2`` and raised to ``power``
    (matrix power; CLIP-ES squares once: 2). Returns ``[hw, hw]`` float32.
    """
    if not sources:
        raise ConfigError("no attention source was given for the affinity")
    weights = DEFAULT_WEIGHTS if weights is None else weights
    missing = [name for name in sources if name not in weights]
    if missing:
        raise ConfigError(
            f"no fusion weight for attention source(s) {', '.join(missing)}",
            hint=f"give a weight for each of {', '.join(sources)}",
        )
    used = {name: float(weights[name]) for name in sources}
    total = sum(used.values())
    if any(w < 0 for w in used.values()) or total <= 0:
        raise ConfigError(f"affinity weights must be >= 0 with a positive sum, got {used}")
    if power < 1:
        raise ConfigError(f"affinity power must be >= 1, got {power}")
    shapes = {tuple(a.shape) for a in sources.values()}
    if len(shapes) != 1:
        raise ConfigError(
            f"attention sources have different shapes {sorted(shapes)}",
            hint="resample every source to the CLIP patch grid first",
        )
    fused: torch.Tensor | None = None
    for name, attn in sources.items():
        part = normalise_attention(attn, iters) * (used[name] / total)
        fused = part if fused is None else fused + part.to(fused.device)
    assert fused is not None
    fused = (fused + fused.transpose(-1, -2)) / 2
    return torch.linalg.matrix_power(fused, power)


def box_mask(
    cam: torch.Tensor | np.ndarray, threshold: float = BOX_THRESH_DEFAULT, *, clip_es_edges: bool = False
) -> torch.Tensor | np.ndarray:
    """CLIP-ES's class mask: 1 inside the bounding box of every contour of the thresholded CAM.

    ``cam``: ``[h, w]`` (patch grid), non-negative. As in CLIP-ES the CAM is scaled
    to 0..255 and truncated to uint8 (here relative to its maximum, which CLIP-ES's
    min-max normalised CAMs already have at 1), and a pixel is on when its value is
    strictly above ``int(threshold * 255)``. Boxes come from ``cv2.findContours``
    and ``cv2.boundingRect``; external contours suffice because a hole's box lies
    inside its outer contour's box. CLIP-ES also clips each box's exclusive end to
    ``width - 1`` / ``height - 1``, which drops the last column/row whenever a box
    touches the right/bottom edge; ``clip_es_edges=True`` reproduces that, the
    default keeps the whole box. Returns ``[h, w]`` float32 in {0, 1}, same type
    (tensor or array) as the input; all zero when the CAM is all zero.
    """
    import cv2

    if isinstance(cam, torch.Tensor):
        arr_mask = np.asarray(
            box_mask(cam.detach().float().cpu().numpy(), threshold, clip_es_edges=clip_es_edges)
        )
        return torch.from_numpy(arr_mask).to(cam.device)
    arr = np.asarray(cam, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"box_mask takes one [h, w] CAM, got shape {arr.shape}")
    height, width = arr.shape
    mask = np.zeros((height, width), np.float32)
    peak = float(arr.max()) if arr.size else 0.0
    if peak > 0:
        scaled = (np.clip(arr / peak, 0.0, 1.0) * 255).astype(np.uint8)
        binary = (scaled > int(threshold * 255)).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            x1, y1 = x + w, y + h
            if clip_es_edges:
                x1, y1 = min(x1, width - 1), min(y1, height - 1)
            mask[y:y1, x:x1] = 1.0
    return mask


def box_masks(
    cams: torch.Tensor, threshold: float = BOX_THRESH_DEFAULT, *, clip_es_edges: bool = False
) -> torch.Tensor:
    """:func:`box_mask` for each class of ``cams`` ``[C, h, w]`` -> ``[C, h, w]`` float32 {0, 1}."""
    arr = cams.detach().float().cpu().numpy()
    masks = [np.asarray(box_mask(c, threshold, clip_es_edges=clip_es_edges)) for c in arr]
    return torch.from_numpy(np.stack(masks)).to(cams.device)


def refine_cams(
    affinity: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor | None = None, *, eps: float = 1e-7
) -> torch.Tensor:
    """Propagate CAMs through the affinity with per-class column masks, then min-max normalise.

    ``affinity``: ``[hw, hw]`` (from :func:`fuse_affinity`); ``cams``: ``[C, h, w]``
    on the same grid; ``masks``: ``[C, h, w]`` in {0, 1} (box or superpixel masks) or
    None for no mask. For class c: ``refined_c = (A * mask_c[None, :]) @ vec(CAM_c)``,
    computed as ``A @ (mask_c * vec(CAM_c))`` for all classes in one matmul; then
    ``x - min(x)`` and ``/ (max + eps)`` per class (CLIP-ES's normalisation). Returns
    ``[C, h, w]`` float32 in [0, 1] (a class whose mask is empty gives zeros).
    """
    if cams.ndim != 3:
        raise ValueError(f"cams must be [C, h, w], got {tuple(cams.shape)}")
    n_cls, h, w = cams.shape
    if affinity.shape != (h * w, h * w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not match the CAM grid {h}x{w}")
    values = cams.reshape(n_cls, h * w).to(affinity.device, affinity.dtype)
    if masks is not None:
        if masks.shape != cams.shape:
            raise ValueError(f"masks {tuple(masks.shape)} do not match cams {tuple(cams.shape)}")
        values = values * masks.reshape(n_cls, h * w).to(values)
    refined = values @ affinity.transpose(0, 1)  # [C, hw]: row c = A @ (mask_c * cam_c)
    refined = refined - refined.min(dim=1, keepdim=True).values
    refined = refined / (refined.max(dim=1, keepdim=True).values + eps)
    return refined.reshape(n_cls, h, w).float()


def resample_attention(attn: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resample a patch-to-patch attention from one grid to another (e.g. DINOv2's 14-pixel grid).

    ``attn``: ``[h1*w1, h1*w1]`` (rows queries, columns keys, row-major grids);
    returns ``[h2*w2, h2*w2]``. Both the key axis and the query axis are resized
    bilinearly (``align_corners=False``, the same geometry as resizing the image),
    then each row is rescaled to sum to 1 (a query's attention is a distribution).
    Memory is O(h1w1 * h2w2).
    """
    import torch.nn.functional as F

    (h1, w1), (h2, w2) = tuple(src_hw), tuple(dst_hw)
    if attn.shape != (h1 * w1, h1 * w1):
        raise ValueError(f"attention {tuple(attn.shape)} does not match the source grid {h1}x{w1}")
    t = attn.float()
    if (h1, w1) != (h2, w2):
        # keys: each query's map [h1, w1] -> [h2, w2]
        t = F.interpolate(t.reshape(h1 * w1, 1, h1, w1), size=(h2, w2), mode="bilinear", align_corners=False)
        t = t.reshape(h1 * w1, h2 * w2).transpose(0, 1).contiguous()  # [key2, query1]
        # queries: for each new key, the map over old queries [h1, w1] -> [h2, w2]
        t = F.interpolate(t.reshape(h2 * w2, 1, h1, w1), size=(h2, w2), mode="bilinear", align_corners=False)
        t = t.reshape(h2 * w2, h2 * w2).transpose(0, 1).contiguous()  # [query2, key2]
    t = t.clamp_min(0)
    return t / t.sum(dim=1, keepdim=True).clamp_min(_TINY)
