"""The settings of ``ssr refine`` and of the dense CRF, with every default in one place: the
CLI's options take their defaults from these dataclasses, the stage and the workers read them.

Pure Python (no numpy, no torch), so that the CLI can import it at no cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ssr_cli.errors import ConfigError

DEFAULT_MAX_SIDE = 1024  # ssr_cli.data.size_limit's (a test checks they agree)

MASKS = ("none", "box", "sgc")
BOX_STYLES = ("clip-es", "full")
#: SSR's fusion weights of the CLIP and DINO attention (the paper's 0.4 : 0.6)
AFFINITY_WEIGHTS = (0.4, 0.6)
AFFINITIES = ("none", "clip", "dino", "clip+dino")
#: where the CLIP attention comes from: the seeds when they hold it, else recomputed (auto)
CLIP_ATTENTION = ("auto", "seeds", "recompute")
#: CLIP-ES's box threshold relative to the CAM's max: 0.4 for VOC, 0.7 for COCO.
BOX_THRESH = {"coco": 0.7}
BOX_THRESH_DEFAULT = 0.4  # the one home of this number (refine.affinity, refine.pipeline)

SLIC_ALGORITHMS = ("SLIC", "SLICO", "MSLIC")
REGION_MODES = ("connected", "cluster")
CRF_IMAGES = ("rgb", "clip-es")


@dataclass(frozen=True)
class CRFParams:
    """The dense CRF's settings, CLIP-ES's (also DeepLab's) as defaults: a Gaussian kernel
    (smoothness), a bilateral kernel (appearance), mean-field iterations. The one home of these
    numbers: refine (``--crf-*``) and predict (``--crf``) both use them."""

    iters: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: ``CRFParams()`` as a dict (the keys of refine's manifest and of ``dense_crf``'s keywords)
CRF_DEFAULTS = CRFParams().to_dict()


@dataclass
class SGCParams:
    """SGC settings (defaults and their reasons: the module docstring)."""

    slic_algorithm: str = "SLICO"
    region_size: int = 16
    ruler: float = 10.0
    iterations: int = 10
    n_clusters: int = 8
    region_mode: str = "connected"
    high_conf: float = 0.5
    region_thresh: float = 0.3
    patch_fraction: float = 0.5
    seed: int = 0

    def check(self) -> None:
        for name in ("high_conf", "region_thresh", "patch_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"SGC {name.replace('_', ' ')} must be in [0, 1], got {value}")
        if self.region_mode not in REGION_MODES:
            raise ConfigError(
                f"unknown SGC region mode {self.region_mode!r}", hint=f"use one of {REGION_MODES}"
            )


@dataclass
class RefineConfig:
    """Settings of ``ssr refine`` (the CLI's options; defaults = the full SSR method)."""

    affinity: str = "clip+dino"
    affinity_weights: tuple[float, float] = AFFINITY_WEIGHTS  # CLIP, DINO
    mask: str = "sgc"
    clip_blocks: int | tuple[int, ...] = 8  # an int n: the last n blocks; a tuple: block indices
    clip_attention: str = "auto"  # auto | seeds (required) | recompute (always run CLIP)
    clip_arch: str | None = None  # None: the seeds' architecture
    clip_weights: str | None = None  # None: the seeds' weights file
    dino_model: str = "dino_vitb16"
    dino_weights: str | None = None
    dino_blocks: int | tuple[int, ...] = (-1,)  # as clip_blocks (models/attention.py)
    box_thresh: float | None = None  # None: 0.4, or 0.7 for the COCO vocabulary
    box_style: str = "clip-es"
    sgc: SGCParams = field(default_factory=SGCParams)
    bg_alpha: float = 1.0
    crf: bool = True
    crf_params: dict[str, Any] = field(default_factory=lambda: dict(CRF_DEFAULTS))  # + "image": rgb | clip-es
    conf_thresh: float | None = None  # None: 0.95 with the CRF, no threshold without
    save_cams: bool = False
    precision: str = "auto"
    batch_size: int = 1
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    max_side: int = DEFAULT_MAX_SIDE  # longer image side; larger images: see oversize
    oversize: str = "error"  # error | skip | downscale (ssr_cli.data.size_limit)

    def sources(self) -> list[str]:
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"--affinity {self.affinity!r} is not one of {', '.join(AFFINITIES)}")
        return [] if self.affinity == "none" else self.affinity.split("+")

    def check(self) -> None:
        from ssr_cli.data.size_limit import SizeLimit

        self.sources()
        SizeLimit(self.max_side, self.oversize).check()
        if self.mask not in MASKS:
            raise ConfigError(f"--mask {self.mask!r} is not one of {', '.join(MASKS)}")
        if self.clip_attention not in CLIP_ATTENTION:
            raise ConfigError(
                f"--clip-attention {self.clip_attention!r} is not one of {', '.join(CLIP_ATTENTION)}"
            )
        if self.box_style not in BOX_STYLES:
            raise ConfigError(f"--box-style {self.box_style!r} is not one of {', '.join(BOX_STYLES)}")
        if (
            len(self.affinity_weights) != 2
            or min(self.affinity_weights) < 0
            or sum(self.affinity_weights) <= 0
        ):
            weights = ",".join(f"{w:g}" for w in self.affinity_weights)
            raise ConfigError(
                f"--affinity-weights {weights} must be two weights >= 0 for CLIP,DINO, not both 0",
                hint="e.g. --affinity-weights 0.4,0.6",
            )
        for name, value in (("--box-thresh", self.box_thresh), ("--conf-thresh", self.conf_thresh)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.bg_alpha <= 0 or self.batch_size < 1:
            raise ConfigError("--bg-alpha must be > 0 and --batch-size >= 1")
        for name, blocks in (("--clip-blocks", self.clip_blocks), ("--dino-blocks", self.dino_blocks)):
            if (isinstance(blocks, int) and blocks < 1) or (not isinstance(blocks, int) and not blocks):
                raise ConfigError(f"{name} must name at least one block (a count >= 1 or block indices)")
        if self.crf and int(self.crf_params.get("iters", 1)) < 1:
            raise ConfigError("--crf-iters must be at least 1")
        if self.crf_params.get("image", "rgb") not in CRF_IMAGES:
            raise ConfigError(f"--crf-image must be one of {', '.join(CRF_IMAGES)}")
        self.sgc.check()
