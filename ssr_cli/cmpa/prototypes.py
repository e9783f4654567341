"""CMPA's prototypes: per-class image prototypes from the CAM-weighted foreground features
(``ssr_cli.cmpa.features``), text prototypes, their EMA update, saving, and the refresh pass.

- Image prototypes: per class, K-means (scikit-learn, on L2-normalised features) with M
  centroids, L2-normalised; M = 1 is the normalised mean, computed from running sums.
- Text prototypes: per class, the normalised mean of ``normalize(TSA(e))`` over the
  class's prompt embeddings (one per template); background words the same way.

Under torchrun every rank ends with the same prototypes (the features are gathered and
sorted, the K-means centroids broadcast).

Imports torch: import lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.cmpa.data import Loader, TrainItem
from ssr_cli.cmpa.features import ClassFeatures as ClassFeatures  # re-exported
from ssr_cli.cmpa.features import clip_pass as clip_pass  # re-exported
from ssr_cli.cmpa.features import collect_features
from ssr_cli.cmpa.features import embedding_moment as embedding_moment  # re-exported
from ssr_cli.cmpa.features import foreground_features as foreground_features  # re-exported
from ssr_cli.cmpa.features import pool_features as pool_features  # re-exported
from ssr_cli.cmpa.features import weighted_mean as weighted_mean  # re-exported
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


def text_prototypes(head: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
    """[K, T, E] prompt embeddings -> [K, d2]: normalise(mean over T of normalise(TSA(e)))."""
    return F.normalize(F.normalize(head(prompts).float(), dim=-1).mean(dim=1), dim=-1)


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
