"""The settings of ``ssr make-seeds``, every default in one place (the CLI reads them from here).

Pure Python (no numpy, no torch), so that the CLI can import it at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssr_cli.refine.config import DEFAULT_MAX_SIDE


@dataclass
class SeedsConfig:
    arch: str = "ViT-B-16"
    weights: str | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str = "auto"
    batch_size: int = 1
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    cmpa: str | None = None
    save_attn: bool = True
    attn_blocks: int = 8  # CLIP-ES: the last 8 blocks
    max_side: int = DEFAULT_MAX_SIDE  # longer image side; larger images: see oversize
    oversize: str = "error"  # error | skip | downscale (ssr_cli.data.size_limit)
    cam_target: str = "auto"  # prob | logodds | auto (ssr_cli.cam.gradcam.CAM_TARGETS)
    extra: dict[str, Any] = field(default_factory=dict)
