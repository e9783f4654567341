"""``fit-seg``'s training settings (:class:`TrainConfig`), pure Python like the other configs (the
CLI reads its defaults at no cost). The recipe defaults come from ``ssr_cli.seg.recipes``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ssr_cli.config_fields import ResultFields, require
from ssr_cli.seg.recipes import RECIPES

OPTIMIZERS = ("sgd", "adamw")
#: the segmentation losses (``ssr_cli.seg.loss``), named here so that this module stays torch-free
LOSSES = ("balanced", "ce")
_DEFAULT = RECIPES["deeplabv3plus"]


@dataclass
class TrainConfig(ResultFields):
    """Training settings. ``batch_size`` is per process; the effective batch is
    ``batch_size * accum * world``. Fields after ``seed`` do not change results."""

    iters: int = 20000
    batch_size: int = 10
    crop_size: int = 321
    accum: int = 1
    optimizer: str = "sgd"
    lr: float = _DEFAULT.lr
    momentum: float = _DEFAULT.momentum
    weight_decay: float = _DEFAULT.weight_decay
    poly_power: float = _DEFAULT.poly_power
    head_lr_mult: float = _DEFAULT.head_lr_mult
    head_bias_lr_mult: float = _DEFAULT.head_bias_lr_mult
    freeze_bn: bool = _DEFAULT.freeze_bn
    bias_decay: bool = _DEFAULT.bias_decay
    norm_decay: bool = _DEFAULT.norm_decay
    loss: str = "balanced"
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    precision: str = "fp32"
    sync_bn: bool = False
    seed: int = 0
    workers: int = 2
    save_every: int = 1000
    val_every: int = 1000
    log_every: int = 20
    check_sync_every: int = 0
    tensorboard: bool = False  # also TensorBoard event files in RUN/tensorboard/

    def __post_init__(self) -> None:
        checks = [
            (self.iters >= 1, "--iters must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.crop_size >= 16, "--crop-size must be at least 16"),
            (self.accum >= 1, "--accum must be at least 1"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.head_lr_mult > 0, "--head-lr-mult must be positive"),
            (self.head_bias_lr_mult > 0, "--head-bias-lr-mult must be positive"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (0 < self.scale_range[0] <= self.scale_range[1], "--scale-range must be 0 < min <= max"),
            (self.save_every >= 1, "--save-every must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
        ]
        require(checks)
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale_range"] = list(self.scale_range)
        return data
