"""Settings of ``ssr train-cmpa`` and the per-step seed (no torch import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ssr_cli.config_fields import ResultFields, require

CAM_SOURCES = ("heads", "clip")
POOLS = ("tokens", "projected")  # CAM-weighted mean of CLIP's patch tokens then ISA | of ISA(tokens)
TEXT_TARGETS = ("live", "snapshot")  # image features scored against live TSA text | the prototypes


@dataclass
class CmpaConfig(ResultFields):
    """Training settings; ``batch_size`` is per process. Fields after ``seed`` do not change results."""

    iters: int = 10000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    dim: int = 256
    hidden: int = 0  # 0: the same as dim
    head_init: str = "pca"
    init_images: int = 256
    protos_per_class: int = 1
    proto_every: int = 5000
    proto_ema: float = 0.0
    temperature: float = 0.05
    size: int = 448
    scale_range: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    jitter: float = 0.2
    cam_source: str = "heads"
    pool: str = "tokens"
    text_target: str = "live"
    precision: str = "fp32"
    seed: int = 0
    workers: int = 2
    save_every: int = 500
    log_every: int = 10
    check_sync_every: int = 0
    tensorboard: bool = False  # also TensorBoard event files in RUN/tensorboard/

    def __post_init__(self) -> None:
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        self.hidden = self.hidden or self.dim
        checks = [
            (self.iters >= 0, "--iters must be at least 0"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr >= 0, "--lr must not be negative"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.dim >= 1 and self.hidden >= 1, "--dim and --hidden must be at least 1"),
            (self.init_images >= 1, "--init-images must be at least 1"),
            (self.protos_per_class >= 1, "--protos-per-class must be at least 1"),
            (self.proto_every >= 1, "--proto-every must be at least 1"),
            (0 <= self.proto_ema < 1, "--proto-ema must be in [0, 1) (0: off)"),
            (self.size >= 16, "--size must be at least 16"),
            (0 < self.scale_range[0] <= self.scale_range[1], "--scale-range must be 0 < min <= max"),
            (0 <= self.jitter < 1, "--jitter must be in [0, 1)"),
            (self.head_init in ("pca", "random"), "--head-init must be pca or random"),
            (self.cam_source in CAM_SOURCES, f"--cam-source must be one of {', '.join(CAM_SOURCES)}"),
            (self.pool in POOLS, f"--pool must be one of {', '.join(POOLS)}"),
            (self.text_target in TEXT_TARGETS, f"--text-target must be one of {', '.join(TEXT_TARGETS)}"),
            (self.save_every >= 1 and self.log_every >= 1, "--save-every and --log-every must be at least 1"),
        ]
        require(checks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale_range"] = list(self.scale_range)
        return data
