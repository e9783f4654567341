"""DeepLab-style segmenter: an ASPP head (DeepLabV3), ASPP + low-level decoder (DeepLabV3+) or
DeepLabV2's ASPP of summed dilated classifiers, on any timm backbone created with
``features_only=True``.

Tensors are NCHW throughout. ``Segmenter.forward`` takes a normalised image batch
``(N, 3, H, W)`` float and returns logits ``(N, K, H, W)`` at the input size.

The architecture is data: :class:`SegmenterConfig` holds everything needed to
rebuild the model (it is stored in the safetensors metadata and the checkpoints),
so ``build_segmenter(config)`` plus a state dict gives back the trained model.

Imports torch and timm: only import this module inside command bodies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.errors import ConfigError

HEADS = ("deeplabv3plus", "aspp", "deeplabv2")
DEEPLABV2_RATES = (6, 12, 18, 24)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a segmenter (no weights).

    ``head``: ``deeplabv3plus`` (ASPP + decoder on the stride-4 features), ``aspp``
    (DeepLabV3: ASPP on the last features only) or ``deeplabv2`` (four dilated 3x3
    convolutions straight to the classes, summed; ``aspp_channels``, ``low_level_channels``
    and ``dropout`` unused). ``aspp_rates``: ``None`` picks (6, 12, 18) at output stride
    16 and (12, 24, 36) at 8, and DeepLabV2's (6, 12, 18, 24) for ``deeplabv2`` at any
    stride. ``mean``/``std``: the input normalisation of the backbone (RGB in 0..1).
    """

    num_classes: int
    backbone: str = "resnet101"
    output_stride: int = 16
    head: str = "deeplabv3plus"
    aspp_channels: int = 256
    aspp_rates: tuple[int, ...] | None = None
    low_level_channels: int = 48
    dropout: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"a segmenter needs at least 2 classes, got {self.num_classes}")
        if self.output_stride not in (8, 16, 32):
            raise ConfigError(
                f"--output-stride {self.output_stride} is not supported", hint="use 8, 16 or 32"
            )
        if self.head not in HEADS:
            raise ConfigError(f"--head {self.head!r} is not known", hint=f"use one of {', '.join(HEADS)}")
        if self.aspp_rates is None and self.head == "deeplabv2":
            self.aspp_rates = DEEPLABV2_RATES
        elif self.aspp_rates is None:
            self.aspp_rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[self.output_stride]
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.class_names = tuple(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**kwargs)  # type: ignore[arg-type]


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def upsample_aligned(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling (N, C, h, w) -> (N, C, *size) that puts feature (i, j) on pixel
    (factor * i, factor * j).

    That is where the output of a stride-2 convolution or pooling with padding k // 2
    is centred, so for convolutional stems (ResNets) stride-``factor`` features land
    on the pixels they were computed at (``align_corners=False`` would shift them by
    (factor - 1) / 2 pixels; DeepLab's 321 = 4 * 80 + 1 crops served the same end).
    Patchify stems (ConvNeXt) are centred (factor - 1) / 2 pixels further; training
    absorbs such a constant offset. Beyond the last feature row/column the edge
    values are repeated.
    """
    h, w = x.shape[2:]
    height, width = int(size[0]), int(size[1])
    full = (factor * (h - 1) + 1, factor * (w - 1) + 1)
    if (h, w) != full:
        x = F.interpolate(x, size=full, mode="bilinear", align_corners=True)
    pad_h, pad_w = max(0, height - full[0]), max(0, width - full[1])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x[:, :, :height, :width]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: (N, Cin, h, w) -> (N, C, h, w).

    Branches: 1x1 conv, one 3x3 conv per rate, image pooling. The pooling branch
    has no BatchNorm, so batches of one image (per process) still train.
    """

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)])
        self.branches.extend(_conv_bn_relu(cin, cout, 3, r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([*outs, pooled], dim=1))


class DeepLabHead(nn.Module):
    """ASPP (+ DeepLabV3+ decoder): [low (N,C0,h0,w0), last (N,C1,h1,w1)] -> logits (N,K,h,w).

    The logits are at the low-level resolution with the decoder (stride 4), at the
    last features' resolution without it.
    """

    def __init__(self, cfg: SegmenterConfig, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        c = cfg.aspp_channels
        self.aspp = ASPP(channels[-1], c, cfg.aspp_rates or (), cfg.dropout)
        self.use_decoder = cfg.head == "deeplabv3plus"
        self.factor = strides[-1] // strides[0]
        if self.use_decoder:
            self.reduce = _conv_bn_relu(channels[0], cfg.low_level_channels, 1)
            self.fuse = nn.Sequential(
                _conv_bn_relu(c + cfg.low_level_channels, c, 3),
                _conv_bn_relu(c, c, 3),
            )
        self.classifier = nn.Conv2d(c, cfg.num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(feats[-1])
        if self.use_decoder:
            low = self.reduce(feats[0])
            x = upsample_aligned(x, self.factor, low.shape[2:])
            x = self.fuse(torch.cat([x, low], dim=1))
        return self.classifier(x)


class DeepLabV2Head(nn.Module):
    """DeepLabV2's ASPP: [..., last (N,C,h,w)] -> logits (N,K,h,w).

    One dilated 3x3 convolution (with bias) per rate maps the last features straight to
    the classes; the branch outputs are summed. Weights start from N(0, 0.01), biases
    at 0, as in DeepLabV2.
    """

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            assert isinstance(conv, nn.Conv2d)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


class Segmenter(nn.Module):
    """Backbone (timm, features_only) + DeepLab head. forward: (N,3,H,W) -> logits (N,K,H,W)."""

    def __init__(
        self, cfg: SegmenterConfig, backbone: nn.Module, channels: Sequence[int], strides: Sequence[int]
    ):
        super().__init__()
        self.config = cfg
        self.backbone = backbone
        self.head: nn.Module
        if cfg.head == "deeplabv2":
            self.head = DeepLabV2Head(channels[-1], cfg.num_classes, cfg.aspp_rates or DEEPLABV2_RATES)
        else:
            self.head = DeepLabHead(cfg, channels, strides)
        self.logit_stride = int(strides[0] if cfg.head == "deeplabv3plus" else strides[-1])
        self.bn_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return upsample_aligned(logits, self.logit_stride, x.shape[2:])

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters)."""
        return list(self.backbone.parameters()), list(self.head.parameters())

    def parameter_kinds(self) -> list[tuple[str, str, nn.Parameter]]:
        """(part, kind, parameter) of every parameter that trains (``requires_grad``).

        part: ``backbone`` or ``head``; kind: ``norm`` (weight or bias of a normalisation
        layer), ``bias`` (any other bias) or ``weight``. The optimizer's learning-rate and
        weight-decay groups are built from these (``ssr_cli.seg.train``).
        """
        out: list[tuple[str, str, nn.Parameter]] = []
        for part, module in (("backbone", self.backbone), ("head", self.head)):
            for sub in module.modules():
                for name, param in sub.named_parameters(recurse=False):
                    if not param.requires_grad:
                        continue
                    kind = "norm" if isinstance(sub, NORM_TYPES) else ("bias" if name == "bias" else "weight")
                    out.append((part, kind, param))
        return out

    def freeze_batchnorm(self) -> None:
        """Freeze every BatchNorm: running statistics fixed (eval mode, kept by ``train()``)
        and affine parameters without gradients, as DeepLabV2 trains."""
        self.bn_frozen = True
        for sub in self.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                for param in sub.parameters(recurse=False):
                    param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.bn_frozen:
            for sub in self.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()
        return self


def create_backbone(
    name: str, output_stride: int, pretrained_state: dict[str, Any] | None = None
) -> tuple[nn.Module, list[int], list[int]]:
    """A timm ``features_only`` backbone with its low-level (stride 4) and last feature maps.

    ``pretrained_state``: a timm-format state dict of the full model (classifier keys
    allowed) loaded before the features wrapper is built, or ``None`` for random
    weights. Returns (module returning the NCHW maps [low, last] (just [last] when the
    backbone has a single level), their channels, their strides).
    """
    import timm

    base_kwargs: dict[str, Any] = {"features_only": True}
    if output_stride != 32:
        base_kwargs["output_stride"] = output_stride
    try:
        with torch.device("meta"):  # only the feature layout is needed here
            probe = timm.create_model(name, pretrained=False, **base_kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(
                f"--backbone {name!r} is not a timm model",
                hint="see timm.list_models(), e.g. resnet101, resnet50, convnext_tiny",
            ) from None
        raise
    except (TypeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"--backbone {name!r} cannot be built with output stride {output_stride} ({exc})",
            hint="try --output-stride 32 or a ResNet/ConvNeXt backbone",
        ) from None
    probe_info: Any = probe.feature_info
    reductions = probe_info.reduction()
    low = next((i for i, r in enumerate(reductions) if r >= 4), 0)
    last = len(reductions) - 1
    out_indices = (low, last) if low != last else (last,)
    kwargs = dict(base_kwargs, out_indices=out_indices)
    if pretrained_state is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": pretrained_state}, **kwargs
        )
    info: Any = model.feature_info
    channels = list(info.channels())  # one entry when low == last
    strides = [min(r, output_stride) for r in info.reduction()]
    return model, channels, strides


def backbone_normalisation(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The input mean/std (RGB, 0..1) the backbone's default pretrained weights expect."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tags: fall back to ImageNet statistics
        cfg = None
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


def build_segmenter(cfg: SegmenterConfig, pretrained_state: dict[str, Any] | None = None) -> Segmenter:
    """Build the segmenter described by ``cfg``.

    ``pretrained_state``: backbone weights (timm format, see ``backbone_weights.py``)
    or ``None`` for random initialisation (also when a full trained state dict is
    loaded afterwards).
    """
    backbone, channels, strides = create_backbone(cfg.backbone, cfg.output_stride, pretrained_state)
    return Segmenter(cfg, backbone, channels, strides)
