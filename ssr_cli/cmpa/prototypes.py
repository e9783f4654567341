"""CAM-weighted foreground features, prototypes, and the streaming passes that collect them.

- Feature of class c in image i: ``normalize(sum_j CAM_c[j] * ISA(p_j) / sum_j CAM_c[j])``
  over the projected patch tokens ``p_j`` (CLIP's ``proj`` applied to every patch token
  after ``ln_post``). The CAM is GradCAM of the softmax over cos(ISA(mean patch token),
  TSA(text)) with the current heads (``cam_heads=True``, the default) or of plain CLIP; it
  is a constant weight (no gradient flows through it). Pairs whose CAM is all zero are
  skipped.
- Image prototypes: per class, K-means (scikit-learn, on L2-normalised features) with M
  centroids, L2-normalised; M = 1 is the normalised mean, computed from running sums.
- Text prototypes: per class, the normalised mean of ``normalize(TSA(e))`` over the
  class's prompt embeddings (one per template); background words the same way.

Collection streams through the data: with M = 1 only per-class sums [K, d2] are kept;
with M > 1 one d2 vector per (image, class) pair (what K-means needs). Under torchrun
each rank takes every ``world``-th image and the results are summed / gathered, then
sorted by (image, class), so every rank ends with the same prototypes.

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


@dataclass
class Prototypes:
    """``image`` [K, M, d2] (rows of classes without features are zero), ``text`` [K, d2],
    ``background`` [B, d2], ``valid`` [K] bool (class has image prototypes), ``counts`` [K]
    features behind each class, ``iteration`` of the last refresh. All L2-normalised."""

    image: torch.Tensor
    text: torch.Tensor
    background: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    iteration: int = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "image": self.image.detach().float().cpu().contiguous(),
            "text": self.text.detach().float().cpu().contiguous(),
            "background": self.background.detach().float().cpu().contiguous(),
            "valid": self.valid.cpu().to(torch.uint8),
            "counts": self.counts.cpu().long(),
            "iteration": torch.tensor(int(self.iteration)),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device) -> Prototypes:
        return cls(
            image=state["image"].float().to(device),
            text=state["text"].float().to(device),
            background=state["background"].float().to(device),
            valid=state["valid"].bool().to(device),
            counts=state["counts"].long().to(device),
            iteration=int(state["iteration"]),
        )


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


def text_prototypes(head: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
    """[K, T, E] prompt embeddings -> [K, d2]: normalise(mean over T of normalise(TSA(e)))."""
    return F.normalize(F.normalize(head(prompts).float(), dim=-1).mean(dim=1), dim=-1)


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


def image_prototypes(found: ClassFeatures, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes [K, M, d2], valid [K]) from a collection pass: K-means per class (M > 1;
    a class with fewer than M features repeats its centroids), the normalised mean for M = 1."""
    k, dim = found.sums.shape
    protos = torch.zeros(k, per_class, dim, dtype=torch.float32)
    valid = found.counts > 0
    if per_class == 1:
        protos[:, 0] = F.normalize(found.sums.float(), dim=-1) * valid.unsqueeze(1)
        return protos, valid
    from sklearn.cluster import KMeans

    assert found.features is not None
    for c in range(k):
        feats = found.features[c]
        if len(feats) == 0:
            continue
        n_clusters = min(per_class, len(feats))
        if n_clusters == 1:
            centres = feats.mean(axis=0, keepdims=True)
        else:
            km = KMeans(n_clusters=n_clusters, n_init=3, random_state=(seed * 7919 + c) % (2**31))
            centres = km.fit(feats.astype(np.float64)).cluster_centers_
        centres_t = F.normalize(torch.as_tensor(np.asarray(centres), dtype=torch.float32), dim=-1)
        protos[c] = centres_t[torch.arange(per_class) % n_clusters]
    return protos, valid


def ema_update(
    protos: Prototypes,
    feats: torch.Tensor,
    cls: torch.Tensor,
    text_live: torch.Tensor,
    bg_live: torch.Tensor,
    momentum: float,
    env: D.DistEnv,
) -> None:
    """Move the prototypes toward this step's features (in place; identical on every rank).

    Each image feature [P, d2] of class ``cls`` [P] goes to its class's nearest prototype;
    a prototype with new features becomes ``normalize(m * old + (1 - m) * mean)``; a class
    seen for the first time takes the mean. Text/background prototypes move toward the
    live TSA prototypes ``text_live`` [K, d2] / ``bg_live`` [B, d2] the same way.
    """
    k, m, dim = protos.image.shape
    feats, cls = feats.detach().float(), cls.detach()
    sims = torch.einsum("pd,pmd->pm", feats, protos.image[cls]) if feats.shape[0] else feats.new_zeros(0, m)
    slot = cls * m + sims.argmax(dim=1)
    sums = torch.zeros(k * m, dim, dtype=torch.float64, device=feats.device)
    counts = torch.zeros(k * m, dtype=torch.float64, device=feats.device)
    sums.index_add_(0, slot, feats.double())
    counts.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
    D.all_reduce_sum(env, sums)
    D.all_reduce_sum(env, counts)
    mean = F.normalize(sums.float(), dim=-1).view(k, m, dim)
    hit = (counts > 0).view(k, m)
    new_class = hit.any(dim=1) & ~protos.valid
    moved = F.normalize(momentum * protos.image + (1 - momentum) * mean, dim=-1)
    image = torch.where(hit.unsqueeze(-1) & protos.valid.view(k, 1, 1), moved, protos.image)
    first = mean[torch.arange(k), (counts.view(k, m) > 0).float().argmax(dim=1)]  # [K, d2]
    image = torch.where(new_class.view(k, 1, 1), first.unsqueeze(1).expand(k, m, dim), image)
    protos.image = image
    protos.valid = protos.valid | new_class
    protos.counts = protos.counts + counts.view(k, m).sum(dim=1).round().long().to(protos.counts.device)
    protos.text = F.normalize(momentum * protos.text + (1 - momentum) * text_live.detach().float(), dim=-1)
    if protos.background.numel():
        protos.background = F.normalize(
            momentum * protos.background + (1 - momentum) * bg_live.detach().float(), dim=-1
        )


def save_prototypes(path: Any, protos: Prototypes, metadata: dict[str, str]) -> Any:
    """Atomically write the prototypes as safetensors (``metadata`` as given)."""
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from ssr_cli.artefacts import atomic_write

    tensors = protos.state_dict()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)

    return atomic_write(Path(path), write)


def refresh_prototypes(
    command: str,
    iteration: int,
    *,
    model: Any,
    heads: Any,
    items: list[TrainItem],
    cfg: Any,
    prompts: tuple[torch.Tensor, torch.Tensor],
    cams: tuple[torch.Tensor, torch.Tensor, bool],
    precision: str,
    env: D.DistEnv,
    loader: Loader,
    pick_seed: int,
    bar: Any,
    write_log: Callable[[dict[str, Any]], None],
) -> tuple[Prototypes, float]:
    """The prototype refresh of train-cmpa and ``ssr train``: features of every image of the split
    through the current heads, per-class image prototypes (K-means seeded by ``pick_seed``), the
    text and background prototypes; a ``prototypes`` log record. ``prompts``: the class and
    background prompt embeddings; ``cams``: (fg, bg, CAMs through the heads). Returns the
    prototypes and the seconds it took; a one-line error when every CAM was empty."""
    import time

    from ssr_cli.console import info, progress_enabled
    from ssr_cli.errors import DataError

    started = time.perf_counter()
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n * env.world
        if bar is not None:
            bar.update(0, status=f"prototypes {min(seen[0], len(items))}/{len(items)}")

    if env.is_main and not progress_enabled():
        info(f"{command}: iteration {iteration}: collecting prototypes over {len(items)} images")
    fg, bg, cam_heads = cams
    fg_prompts, bg_prompts = prompts
    heads.eval()
    found = collect_features(
        model,
        heads,
        items,
        side=cfg.size,
        batch_size=cfg.batch_size,
        fg=fg,
        bg=bg,
        cam_heads=cam_heads,
        precision=precision,
        env=env,
        loader=loader,
        keep=cfg.protos_per_class > 1,
        on_batch=progress,
        pool=cfg.pool,
    )
    image, valid = image_prototypes(found, cfg.protos_per_class, pick_seed)
    if cfg.protos_per_class > 1:
        image = D.broadcast_object(env, image)
    with torch.no_grad():
        text = text_prototypes(heads.project_text, fg_prompts)
        back = text_prototypes(heads.project_text, bg_prompts)
    heads.train()
    if not bool(valid.any()):
        raise DataError(
            "no foreground features: every CAM of the split was empty",
            hint="check the labels and the CLIP weights",
        )
    seconds = time.perf_counter() - started
    record = {"features": found.counts.tolist(), "classes": int(valid.sum()), "seconds": round(seconds, 3)}
    write_log({"type": "prototypes", "iter": iteration, "prototypes": record})
    device = env.device
    protos = Prototypes(image.to(device), text, back, valid.to(device), found.counts.to(device), iteration)
    return protos, seconds
