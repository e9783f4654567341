"""The segmentation decoder of single-stage SSR and the model ``ssr predict`` runs.

Decoder (WeCLIP-style, our reading): frozen CLIP's patch tokens from several blocks of the
image tower (default: every block), each through its own LayerNorm + linear projection to
``dim`` channels, concatenated, fused by a 1x1 convolution, then ``convs`` 3x3 convolutions
(GroupNorm + ReLU: no running statistics, so ranks stay identical under DDP), a 1x1 classifier
to ``num_classes`` logits (background + K classes) on the patch grid, upsampled bilinearly to
the input size. Only the decoder trains; CLIP stays frozen.

:class:`SsrSegmenter` (frozen CLIP + decoder) takes any image size: the image is resized to
the next multiple of the patch size, and the logits come back at the input size.

Imports torch: import lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.errors import WeightsError
from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD

MODEL_FILE = "model.safetensors"
CONFIG_KEY = "ssr_train_config"


@dataclass
class DecoderConfig:
    """Everything needed to rebuild the decoder and the CLIP it reads (no weights)."""

    num_classes: int
    width: int  # CLIP's token width
    layers: tuple[int, ...]  # block indices (0-based) whose output tokens the decoder reads
    dim: int = 256
    convs: int = 2
    class_names: tuple[str, ...] = field(default_factory=tuple)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    clip: dict[str, Any] = field(default_factory=dict)  # arch, arch option, weights path, identity

    def __post_init__(self) -> None:
        self.layers = tuple(int(v) for v in self.layers)
        self.class_names = tuple(self.class_names)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("layers", "class_names", "mean", "std"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        return cls(**data)


def resolve_layers(requested: Sequence[int], blocks: int) -> tuple[int, ...]:
    """Block indices (negative ones from the end) -> sorted distinct 0-based ones; () = all blocks."""
    from ssr_cli.errors import ConfigError

    if not requested:
        return tuple(range(blocks))
    if any(not -blocks <= b < blocks for b in requested):
        raise ConfigError(f"--decoder-layers {list(requested)} are outside CLIP's {blocks} blocks")
    return tuple(sorted({b % blocks for b in requested}))


class SegDecoder(nn.Module):
    """``forward(tokens: list of [N, h*w, width], grid) -> logits [N, num_classes, h, w]``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.width) for _ in cfg.layers)
        self.projs = nn.ModuleList(nn.Linear(cfg.width, d) for _ in cfg.layers)
        groups = max(1, min(32, d // 8))
        self.fuse = nn.Sequential(
            nn.Conv2d(d * len(cfg.layers), d, 1, bias=False), nn.GroupNorm(groups, d), nn.ReLU(inplace=True)
        )
        self.convs = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(d, d, 3, padding=1, bias=False), nn.GroupNorm(groups, d), nn.ReLU(inplace=True)
                )
                for _ in range(cfg.convs)
            ]
        )
        self.classifier = nn.Conv2d(d, cfg.num_classes, 1)

    def forward(self, tokens: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        parts = []
        for x, norm, proj in zip(tokens, self.norms, self.projs, strict=True):
            y = proj(norm(x.float()))  # [N, hw, d]
            parts.append(y.transpose(1, 2).reshape(y.shape[0], -1, h, w))
        z = self.convs(self.fuse(torch.cat(parts, dim=1)))
        return self.classifier(z)


@contextlib.contextmanager
def capture_blocks(clip: Any, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the output tokens of CLIP's blocks ``layers`` (except the last block) during a forward.

    Block i's output is block i+1's input, which reaches block i+1's ``ln_1`` as its first
    argument: a forward pre-hook there reads it, whatever code runs the blocks. Tokens are
    stored as given (NLD or LND); :func:`layer_tokens` puts them in order.
    """
    found: dict[int, torch.Tensor] = {}
    handles = []
    last = len(clip.blocks) - 1
    for i in layers:
        if i < last:

            def hook(module: nn.Module, args: tuple, i: int = i) -> None:
                found[i] = args[0].detach()

            handles.append(clip.blocks[i + 1].ln_1.register_forward_pre_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def layer_tokens(
    found: dict[int, torch.Tensor], post: torch.Tensor, layers: Sequence[int], last: int
) -> list[torch.Tensor]:
    """The patch tokens [N, h*w, width] of each block in ``layers`` (CLS dropped); the last block's
    come from ``post`` (the tokens after ``ln_post``, [N, 1+h*w, width])."""
    length = post.shape[1]
    out = []
    for i in layers:
        x = post if i == last else found[i]
        if x.shape[1] != length:  # LND
            x = x.transpose(0, 1)
        out.append(x[:, 1:].detach())
    return out


class SsrSegmenter(nn.Module):
    """Frozen CLIP + trained decoder: ``forward(x [N, 3, H, W] CLIP-normalised) -> logits
    [N, num_classes, H, W]``. CLIP is a plain attribute (not a submodule): ``train()`` and
    ``parameters()`` concern the decoder only."""

    def __init__(self, clip: Any, decoder: SegDecoder, precision: str = "fp32") -> None:
        super().__init__()
        self.clip = clip
        self.decoder = decoder
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.clip.resized_size(h, w)
        xin = (
            x if (ph, pw) == (h, w) else F.interpolate(x, size=(ph, pw), mode="bilinear", align_corners=False)
        )
        layers = self.decoder.cfg.layers
        last = len(self.clip.blocks) - 1
        with torch.no_grad(), capture_blocks(self.clip, layers) as found:
            tokens = self.clip.image_tokens(xin, grad_last_block=False, precision=self.precision)
        grid = tokens.grid
        logits = self.decoder(layer_tokens(found, tokens.post, layers, last), grid)
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)


def save_model_file(path: Path, decoder: SegDecoder, extra: dict[str, Any]) -> Path:
    """The decoder's weights as safetensors; metadata: the :class:`DecoderConfig` and ``extra``."""
    from safetensors.torch import save_file

    from ssr_cli import __version__
    from ssr_cli.artefacts import atomic_write

    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in decoder.state_dict().items()}
    meta = {"decoder": decoder.cfg.to_dict(), **extra}
    metadata = {CONFIG_KEY: json.dumps(meta, sort_keys=True), "ssr_tool_version": __version__, "format": "pt"}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)

    return atomic_write(Path(path), write)


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(decoder state dict, metadata) of a ``model.safetensors`` written by ``ssr train``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(CONFIG_KEY)
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"cannot read the model file ({type(exc).__name__})", path=path) from None
    if raw is None:
        raise WeightsError("not a model of ssr train (no ssr config in its metadata)", path=path)
    return state, json.loads(raw)


def _run_stage(folder: Path) -> str | None:
    from ssr_cli.artefacts import read_manifest

    if not (folder / "manifest.json").is_file():
        return None
    try:
        return str(read_manifest(folder).get("stage"))
    except Exception:  # noqa: BLE001 - not ours to judge here: the fit-seg path reports it
        return None


def is_ssr_model(path: Path) -> bool:
    """Whether ``path`` is an ``ssr train`` run folder, its ``model.safetensors`` or one of its
    checkpoints (``RUN/checkpoints/best.pt`` / ``last.pt``)."""
    if path.is_dir():
        return _run_stage(path) == "train"
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return _run_stage(path.parent.parent) == "train"
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return CONFIG_KEY in (fh.metadata() or {})
    except Exception:  # noqa: BLE001
        return False


def load_ssr_segmenter(path: str | Path, device: torch.device) -> tuple[SsrSegmenter, DecoderConfig, Path]:
    """Frozen CLIP + decoder (eval mode, on ``device``) from a ``train`` run folder or its model file.

    The CLIP is the run's (architecture and weights file from the metadata; the weights'
    SHA-256 must still match)."""
    from ssr_cli.artefacts import read_manifest
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.models.cmpa import clip_identity

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        stage = read_manifest(path).get("stage") if (path / "manifest.json").is_file() else None
        hint = "resume it with ssr train ... --resume" if stage == "train" else "pass an ssr train run folder"
        raise WeightsError(f"no {MODEL_FILE} here: the run has not finished", path=path, hint=hint)
    if file.suffix == ".pt":
        from ssr_cli.train.state import load_training_state

        hint = "pass an ssr train run folder or its checkpoints/best.pt"
        ckpt = load_training_state(file, stage="train", keys=("decoder", "decoder_config"), hint=hint)
        state, cfg = ckpt["decoder"], DecoderConfig.from_dict(ckpt["decoder_config"])
    else:
        state, meta = read_model_file(file)
        cfg = DecoderConfig.from_dict(meta["decoder"])
    clip_rec = cfg.clip
    arch = register_arch(str(clip_rec.get("arch_option") or clip_rec["arch"]))
    weights = clip_rec.get("weights_path")
    clip = load_clip(arch, weights, device, seed=int(clip_rec.get("seed", 0)))
    if clip_identity(clip) != clip_rec.get("identity"):
        raise WeightsError(
            "the CLIP weights found now are not the ones this decoder was trained on",
            path=file,
            hint="put the run's CLIP weights file back (see its manifest), or retrain",
        )
    decoder = SegDecoder(cfg)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())[:200]
        raise WeightsError(f"weights do not fit the recorded decoder config ({text})", path=file) from None
    model = SsrSegmenter(clip, decoder.to(device))
    return model.eval(), cfg, file
