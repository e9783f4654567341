"""The trained parts of ``ssr train`` and their set-up: :class:`Joint` (CMPA heads + decoder, what
DistributedDataParallel wraps), the decoder's initial weights, the optimizer with its schedule,
and the superpixel region maps of the online pseudo-masks.

Imports torch: import lazily.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssr_cli.cmpa.data import TrainItem
from ssr_cli.models.cmpa import CmpaHeads
from ssr_cli.onestage.config import REGION_CELLS, SsrConfig
from ssr_cli.onestage.decoder import DecoderConfig, SegDecoder
from ssr_cli.onestage.pseudo import RegionCache
from ssr_cli.train.proto_loop import head_groups


class Joint(nn.Module):
    """The trained parts in one module (what DistributedDataParallel wraps): CMPA heads + decoder."""

    def __init__(self, heads: CmpaHeads, decoder: SegDecoder) -> None:
        super().__init__()
        self.heads = heads
        self.decoder = decoder

    def forward(
        self, patches: torch.Tensor, prompts: torch.Tensor, tokens: list[torch.Tensor], grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        projected, txt, inv_tau = self.heads(patches, prompts)
        return projected, txt, inv_tau, self.decoder(tokens, grid)


def region_cache(model: Any, items: list[TrainItem], cfg: SsrConfig) -> RegionCache | None:
    """The superpixel region maps of the SGC mask (built in the background), or None without it."""
    side0 = max(model.patch_size, int(round(cfg.size / model.patch_size)) * model.patch_size)
    if cfg.mask == "sgc" and cfg.affinity != "none":  # the mask only masks the affinity's columns
        cells = (side0 // model.patch_size) * REGION_CELLS
        return RegionCache([i.image for i in items], side0, cells, cfg.sgc, cfg.workers)
    return None


def build_decoder(decoder_cfg: DecoderConfig, seed: int, resume: dict[str, Any] | None) -> SegDecoder:
    """The decoder (initial weights from ``seed``, torch's RNG left as it was), or checkpoint ``resume``'s."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = SegDecoder(decoder_cfg)
    if resume is not None:
        decoder.load_state_dict(resume["decoder"])
    return decoder


def joint_optimizer(heads: CmpaHeads, decoder: SegDecoder, cfg: SsrConfig) -> tuple[Any, Any]:
    """(AdamW, its scheduler): heads and temperature at ``lr`` (constant), the decoder at ``seg_lr``
    with poly decay."""
    optimizer = torch.optim.AdamW(
        [
            *head_groups(heads, cfg.weight_decay, lr=cfg.lr),
            {
                "params": list(decoder.parameters()),
                "weight_decay": cfg.seg_weight_decay,
                "lr": cfg.seg_lr,
            },
        ],
        lr=cfg.lr,
    )
    iters = max(cfg.iters, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [lambda s: 1.0, lambda s: 1.0, lambda s: max(0.0, 1.0 - s / iters) ** cfg.poly_power],
    )
    return optimizer, scheduler
