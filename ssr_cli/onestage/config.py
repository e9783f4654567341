"""Settings of ``ssr train`` (single-stage SSR). Pure Python: the CLI imports it at no cost.

The CMPA part keeps ``train-cmpa``'s defaults (the paper's numbers: prototype refresh every
``proto_every`` steps, initial temperature tau 0.05); the online pseudo-masks keep
``refine``'s (CLIP : DINO attention 0.4 : 0.6, the SGC superpixel mask, background
``(1 - max CAM) ** bg_alpha``); ``gamma`` = 0.1 weighs the segmentation loss (the paper's).
The decoder and its optimizer follow WeCLIP (AdamW, lr 2e-4, poly decay), our reading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.config_fields import ResultFields, require
from ssr_cli.refine.config import AFFINITY_WEIGHTS, SGCParams
from ssr_cli.seg.config import LOSSES as SEG_LOSSES  # the segmenter's losses

#: online pseudo-mask affinities and column masks (no CRF online)
ONLINE_AFFINITIES = ("none", "clip", "clip+dino")
ONLINE_MASKS = ("none", "box", "sgc")
#: cells per patch side of the precomputed superpixel region maps (4: a 16-pixel patch holds 4x4 cells)
REGION_CELLS = 4
_CMPA = CmpaConfig  # the CMPA part's defaults are train-cmpa's


@dataclass
class SsrConfig(ResultFields):
    """Every setting of a single-stage run. ``batch_size`` is per process. Fields after ``seed``
    do not change results."""

    iters: int = 20000
    batch_size: int = 4
    size: int = _CMPA.size
    scale_range: tuple[float, float] = _CMPA.scale_range
    flip: bool = _CMPA.flip
    jitter: float = _CMPA.jitter
    # CMPA (train-cmpa's defaults, read from its config)
    lr: float = _CMPA.lr
    weight_decay: float = _CMPA.weight_decay
    dim: int = _CMPA.dim
    hidden: int = _CMPA.hidden  # 0: the same as dim
    head_init: str = _CMPA.head_init
    init_images: int = _CMPA.init_images
    protos_per_class: int = _CMPA.protos_per_class
    proto_every: int = _CMPA.proto_every
    proto_ema: float = _CMPA.proto_ema
    temperature: float = _CMPA.temperature
    pool: str = _CMPA.pool
    text_target: str = _CMPA.text_target
    cam_target: str = "auto"
    # segmentation decoder (WeCLIP-style)
    gamma: float = 0.1
    seg_loss: str = "balanced"
    decoder_dim: int = 256
    decoder_layers: tuple[int, ...] = ()  # (): every block of CLIP's image tower
    decoder_convs: int = 2
    seg_lr: float = 2e-4
    seg_weight_decay: float = 1e-2
    poly_power: float = 0.9
    # online pseudo-masks (refine's defaults, no CRF)
    affinity: str = "clip+dino"
    affinity_weights: tuple[float, float] = AFFINITY_WEIGHTS
    clip_blocks: int = 8
    dino_blocks: int | tuple[int, ...] = (-1,)  # N = the last N blocks, or block indices (refine's rule)
    mask: str = "sgc"
    sgc: SGCParams = field(default_factory=SGCParams)
    bg_alpha: float = 1.0
    conf_thresh: float = 0.0  # 0: keep every pixel; else pixels whose top score is below it -> 255
    precision: str = "fp32"
    seed: int = 0
    workers: int = 2
    save_every: int = 500
    log_every: int = 10
    val_every: int = 1000
    check_sync_every: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sgc, dict):
            self.sgc = SGCParams(**self.sgc)
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        self.affinity_weights = (float(self.affinity_weights[0]), float(self.affinity_weights[1]))
        self.decoder_layers = tuple(int(v) for v in self.decoder_layers)
        if not isinstance(self.dino_blocks, int):
            self.dino_blocks = tuple(int(v) for v in self.dino_blocks)
        self.hidden = self.hidden or self.dim
        checks = [
            (self.iters >= 0, "--iters must be at least 0"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.size >= 16, "--size must be at least 16"),
            (0 < self.scale_range[0] <= self.scale_range[1], "--scale-range must be 0 < min <= max"),
            (0 <= self.jitter < 1, "--jitter must be in [0, 1)"),
            (self.lr >= 0 and self.seg_lr > 0, "--lr must not be negative and --seg-lr must be positive"),
            (self.weight_decay >= 0 and self.seg_weight_decay >= 0, "weight decays must not be negative"),
            (self.dim >= 1 and self.hidden >= 1, "--dim and --hidden must be at least 1"),
            (self.head_init in ("pca", "random"), "--head-init must be pca or random"),
            (self.init_images >= 1, "--init-images must be at least 1"),
            (self.protos_per_class >= 1, "--protos-per-class must be at least 1"),
            (self.proto_every >= 1, "--proto-every must be at least 1"),
            (0 <= self.proto_ema < 1, "--proto-ema must be in [0, 1) (0: off)"),
            (self.pool in ("tokens", "projected"), "--pool must be tokens or projected"),
            (self.text_target in ("live", "snapshot"), "--text-target must be live or snapshot"),
            (self.cam_target in ("auto", "prob", "logodds"), "--cam-target must be auto, prob or logodds"),
            (self.gamma >= 0, "--gamma must not be negative"),
            (self.seg_loss in SEG_LOSSES, f"--seg-loss must be one of {', '.join(SEG_LOSSES)}"),
            (self.decoder_dim >= 8 and self.decoder_convs >= 0, "--decoder-dim >= 8, --decoder-convs >= 0"),
            (self.poly_power >= 0, "--poly-power must not be negative"),
            (self.affinity in ONLINE_AFFINITIES, f"--affinity must be one of {', '.join(ONLINE_AFFINITIES)}"),
            (
                min(self.affinity_weights) >= 0 and sum(self.affinity_weights) > 0,
                "--affinity-weights must be two weights >= 0 for CLIP,DINO, not both 0",
            ),
            (self.clip_blocks >= 1, "--clip-blocks must be at least 1"),
            (self.mask in ONLINE_MASKS, f"--mask must be one of {', '.join(ONLINE_MASKS)}"),
            (self.bg_alpha > 0, "--bg-alpha must be positive"),
            (0 <= self.conf_thresh <= 1, "--conf-thresh must be in [0, 1]"),
            (self.save_every >= 1 and self.log_every >= 1, "--save-every and --log-every must be at least 1"),
            (self.val_every >= 0, "--val-every must not be negative"),
        ]
        require(checks)
        self.sgc.check()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("scale_range", "affinity_weights", "decoder_layers", "dino_blocks"):
            if not isinstance(data[key], int):
                data[key] = list(data[key])
        return data

    def cmpa_config(self) -> Any:
        """The ``CmpaConfig`` of the CMPA part (for ``cmpa.train.init_heads``)."""
        shared = {f.name for f in fields(CmpaConfig)} & {f.name for f in fields(self)}
        return CmpaConfig(**{k: getattr(self, k) for k in shared})
