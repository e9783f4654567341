"""CAM-weighted foreground features of CMPA and the streaming pass that collects them.

- Feature of class c in image i: ``normalize(sum_j CAM_c[j] * ISA(p_j) / sum_j CAM_c[j])``
  over the projected patch tokens ``p_j`` (``pool="projected"``), or ISA of the CAM-weighted
  mean token (``pool="tokens"``); the CAM is a constant weight (no gradient flows through it).
  Pairs whose CAM is all zero are skipped.
- ``collect_features`` streams through the data: with one prototype per class only per-class
  sums are kept, otherwise one vector per (image, class) pair. Under torchrun each rank takes
  every ``world``-th image and the results are summed / gathered and sorted by (image, class),
  so every rank ends with the same features. The prototypes built from them live in
  ``ssr_cli.cmpa.prototypes``.

Imports torch: import lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.cmpa.data import Loader, TrainItem, iter_plain_batches
from ssr_cli.train import distributed as D

# ----------------------------------------------------------------------------- features


def clip_pass(
    model: Any,
    x: torch.Tensor,
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    image_head: Callable[[torch.Tensor], torch.Tensor] | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen-CLIP part of a step: tokens, GradCAM, projected patch tokens.

    ``x`` [N, 3, H, W]; ``fg`` [K, d] / ``bg`` [B, d] texts already in the CAM's space
    (TSA-projected, or CLIP's for plain-CLIP CAMs). Returns ``patches`` [N, h*w, E]
    (no grad), ``cams`` [P, h*w] float32 (P = all (image, class) pairs in order),
    ``img_idx`` [P] and ``cls_idx`` [P] (long, on the model's device).
    """
    from ssr_cli.cam.gradcam import gradcam

    tokens = model.image_tokens(x, grad_last_block=False, precision=precision)
    cams = gradcam(model, tokens, present, fg, bg, image_head=image_head, precision=precision)
    device = tokens.pre.device
    pairs = [(i, c) for i, classes in enumerate(present) for c in classes]
    img_idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
    cls_idx = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
    flat = (
        torch.cat([c.flatten(1) for c in cams], dim=0) if pairs else torch.zeros(0, tokens.post.shape[1] - 1)
    )
    with torch.no_grad():
        patches = model.patch_embeddings(tokens)
    return patches.detach(), flat.to(device).float(), img_idx, cls_idx


def weighted_mean(
    cams: torch.Tensor, values: torch.Tensor, img_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM-weighted average: ``cams`` [P, L], ``values`` [N, L, D] -> (means [P, D] (not
    normalised), ``ok`` [P] bool: the CAM has some mass)."""
    mass = cams.sum(dim=1)
    ok = mass > 1e-6
    pooled = torch.einsum("pl,pld->pd", cams, values[img_idx].float()) / mass.clamp_min(1e-6).unsqueeze(1)
    return pooled, ok


def pool_features(
    cams: torch.Tensor, projected: torch.Tensor, img_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM-weighted average pooling of projected tokens: ``projected`` [N, L, d2] -> (features
    [P, d2] L2-normalised, ``ok`` [P])."""
    pooled, ok = weighted_mean(cams, projected, img_idx)
    return F.normalize(pooled, dim=-1), ok


def foreground_features(
    cams: torch.Tensor,
    patches: torch.Tensor,
    img_idx: torch.Tensor,
    isa: Callable[[torch.Tensor], torch.Tensor],
    pool: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground features [P, d2] (L2-normalised) and ``ok`` [P] from CLIP's patch tokens
    ``patches`` [N, L, E]. ``pool`` ``tokens``: ISA(CAM-weighted mean of the tokens), the same
    form as the CAM's ISA(mean of the tokens); ``projected``: CAM-weighted mean of ISA(tokens)."""
    if pool == "tokens":
        pooled, ok = weighted_mean(cams, patches, img_idx)
        return F.normalize(isa(pooled).float(), dim=-1), ok
    return pool_features(cams, isa(patches), img_idx)


# ----------------------------------------------------------------------------- streaming passes


def embedding_moment(
    model: Any,
    items: Sequence[TrainItem],
    order: Sequence[int],
    side: int,
    batch_size: int,
    precision: str,
    env: D.DistEnv,
    loader: Loader,
) -> torch.Tensor:
    """[E, E] float64: mean of ``v v^T`` over the L2-normalised image embeddings of ``order``
    (this rank takes every ``world``-th image; summed over ranks)."""
    e = int(model.embed_dim)
    total = torch.zeros(e, e, dtype=torch.float64, device=env.device)
    count = torch.zeros((), dtype=torch.float64, device=env.device)
    for _, x in iter_plain_batches(items, list(order)[env.rank :: env.world], side, batch_size, loader):
        with torch.no_grad():
            emb = model.image_tokens(x.to(env.device), grad_last_block=False, precision=precision).embedding
        v = F.normalize(emb.double(), dim=-1)
        total += v.t() @ v
        count += v.shape[0]
    D.all_reduce_sum(env, total)
    D.all_reduce_sum(env, count)
    return (total / count.clamp_min(1)).cpu()


@dataclass
class ClassFeatures:
    """What a collection pass found: per-class sums [K, d2] (float64) and counts [K];
    with ``keep``, also per class the features [n_c, d2] sorted by (image, class)."""

    sums: torch.Tensor
    counts: torch.Tensor
    features: list[np.ndarray] | None = None


def collect_features(
    model: Any,
    heads: Any,
    items: Sequence[TrainItem],
    *,
    side: int,
    batch_size: int,
    fg: torch.Tensor,
    bg: torch.Tensor,
    cam_heads: bool,
    precision: str,
    env: D.DistEnv,
    loader: Loader,
    keep: bool,
    on_batch: Callable[[int], None] | None = None,
    pool: str = "tokens",
) -> ClassFeatures:
    """One pass over ``items`` (plain images at ``side``): foreground features of every
    labelled class; ``fg``/``bg`` are CLIP's class/background embeddings [K, E]/[B, E]."""
    k, dim = fg.shape[0], heads.cfg.dim
    device = env.device
    sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    kept: list[tuple[int, int, np.ndarray]] = []
    with torch.no_grad():
        fg_cam = heads.project_text(fg) if cam_heads else fg
        bg_cam = heads.project_text(bg) if cam_heads else bg
    head = heads.project_image if cam_heads else None
    mine = list(range(len(items)))[env.rank :: env.world]
    for chunk, x in iter_plain_batches(items, mine, side, batch_size, loader, on_batch):
        present = [list(items[i].classes) for i in chunk]
        patches, cams, img_idx, cls_idx = clip_pass(
            model, x.to(device), present, fg_cam, bg_cam, head, precision
        )
        if cams.shape[0] == 0:
            continue
        with torch.no_grad(), model.autocast(precision):
            feats, ok = foreground_features(cams, patches, img_idx, heads.project_image, pool)
        feats, cls_ok = feats[ok].double(), cls_idx[ok]
        sums.index_add_(0, cls_ok, feats)
        counts.index_add_(0, cls_ok, torch.ones_like(cls_ok, dtype=torch.float64))
        if keep:
            owners = img_idx[ok].tolist()
            for f, i, c in zip(feats.float().cpu().numpy(), owners, cls_ok.tolist(), strict=True):
                kept.append((chunk[i], c, f))
    D.all_reduce_sum(env, sums)
    D.all_reduce_sum(env, counts)
    features = None
    if keep:
        everything = [row for part in D.all_gather_object(env, kept) for row in part]
        everything.sort(key=lambda row: (row[0], row[1]))
        features = [np.zeros((0, dim), dtype=np.float32) for _ in range(k)]
        by_class: list[list[np.ndarray]] = [[] for _ in range(k)]
        for _, c, f in everything:
            by_class[c].append(f)
        features = [np.stack(rows) if rows else features[c] for c, rows in enumerate(by_class)]
    return ClassFeatures(sums=sums.cpu(), counts=counts.round().long().cpu(), features=features)
