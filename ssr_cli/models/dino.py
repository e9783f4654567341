"""Frozen DINO / DINOv2 ViTs (timm) for SGC's spatial affinity: weights, preprocessing, attention.

Models (``--dino-model``): ``dino_vitb16`` (default, DINO ViT-B/16, the CLIP grid),
``dino_vits16``, ``dinov2_vits14``, ``dinov2_vitb14`` and the 4-register DINOv2
variants ``dinov2_vits14_reg4``, ``dinov2_vitb14_reg4``; a timm model name of one
of these is accepted too. Each is built with timm (``pretrained=False``,
``num_classes=0``, ``dynamic_img_size=True``: timm then resamples the positional
embedding bicubically to each input's grid, as DINO's own ``interpolate_pos_encoding``
does) and loaded from, in order (``ssr_cli.models.weights.resolve_weights``):
``--dino-weights PATH`` or ``random``; ``$SSR_DINO_WEIGHTS``; local caches (ours,
torch hub's ``checkpoints/`` where DINO's own loader puts ``dino_vitbase16_pretrain.pth``,
the Hugging Face hub cache of the timm weights); a download of the timm weights
when online.

Formats: the original ``.pth`` files of facebookresearch/dino and dinov2 (plain
state dicts with keys ``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ...; full training checkpoints ``{"teacher": ...}``
with ``backbone.``/``module.`` prefixes and DINO-head keys), timm state dicts
(``.pth``/``.bin``, optionally under ``state_dict``/``model``) and ``.safetensors``.
Torch files are read with ``weights_only=True``; the format is sniffed from the content.

Layouts: images NCHW, ImageNet-normalised (DINO and DINOv2 were trained with the
ImageNet mean/std, not CLIP's); attention ``[N, h*w, h*w]`` with row-major grids,
the CLS and register tokens dropped.

Imports torch and timm: import this module lazily (inside command bodies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.errors import ConfigError, WeightsError
from ssr_cli.models.attention import Blocks, block_indices
from ssr_cli.models.sources import DINO_MODELS as DINO_MODELS  # re-exported
from ssr_cli.models.sources import dino_cache_candidates as dino_cache_candidates  # re-exported
from ssr_cli.models.sources import dino_weights_source, resolve_dino_name
from ssr_cli.models.weights import (
    WeightsSource,
    load_failure,
    state_dict_mismatch,
    torch_load,
)
from ssr_cli.runtime import autocast

ENV_VAR = "SSR_DINO_WEIGHTS"
DEFAULT_MODEL = "dino_vitb16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPERS = ("teacher", "state_dict", "model", "student")
_PREFIXES = ("module.", "backbone.")


def read_dino_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a DINO/DINOv2/timm weights file into a flat backbone state dict (CPU tensors).

    Unwraps ``teacher``/``state_dict``/``model``/``student``, strips ``module.`` and
    ``backbone.`` prefixes, drops DINO-head keys (``head.*``). WeightsError names the
    file when it cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        is_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 28
        if is_safetensors:
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch_load(path, "DINO weights")
    except WeightsError:
        raise
    except Exception as exc:
        what, hint = load_failure(exc, "DINO weights")
        raise WeightsError(what, path=path, hint=hint) from None
    for key in _WRAPPERS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict):
        raise WeightsError(f"not a state dict (a {type(raw).__name__})", path=path)
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) or k.startswith("head.") for k in state):
            state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _fit(model: Any, state: dict[str, torch.Tensor], path: Path, short: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(dict(state), model)
    except Exception as exc:  # odd shapes make timm's converters fail
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(f"these weights do not fit DINO model {short} ({first})", path=path) from exc
    target = model.state_dict()
    problem = state_dict_mismatch(target, state)
    if problem:
        raise WeightsError(
            f"these weights do not fit DINO model {short}: " + problem,
            path=path,
            hint="choose the --dino-model the file was trained as, or another file",
        )
    model.load_state_dict(state, strict=True)


def timm_block_attention(attn: Any, tokens: torch.Tensor, average_heads: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm ``Attention`` module, recomputed in fp32.

    ``tokens``: ``[N, L, D]`` (NLD), the input of ``attn`` (the block's ``norm1``
    output). Returns ``[N, L, L]`` (head-averaged) or ``[N, heads, L, L]``.
    """
    n, length, _ = tokens.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        qkv = torch.nn.functional.linear(
            tokens.float(), attn.qkv.weight.float(), None if attn.qkv.bias is None else attn.qkv.bias.float()
        )
        qkv = qkv.reshape(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
    return probs.mean(dim=1) if average_heads else probs


def _check_supported(model: Any, short: str) -> None:
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    ok = isinstance(model, VisionTransformer) and all(
        isinstance(b, Block) and isinstance(b.attn, Attention) for b in model.blocks
    )
    if not ok:
        raise ConfigError(
            f"DINO model {short} has no standard ViT attention blocks", hint="use a listed model"
        )


def dino_attention(
    model: Any, x: torch.Tensor, blocks: Blocks = (-1,), precision: str = "fp32"
) -> torch.Tensor:
    """``[N, 3, H, W]`` (ImageNet-normalised, H and W multiples of the patch size) ->
    ``[N, h*w, h*w]``: patch-to-patch attention, averaged over heads and ``blocks``.

    The CLS and register tokens (timm's ``num_prefix_tokens``) are dropped; rows are
    not re-normalised. Each chosen block's attention is recomputed in fp32 from the
    input of its attention module (its ``norm1`` output, caught with a forward
    pre-hook) and its ``qkv`` weights; the forward itself runs under ``precision``
    (``fp32``, ``bf16`` or ``fp16`` autocast). No gradients.
    """
    wanted = block_indices(blocks, len(model.blocks), "DINO attention")
    p = model.patch_embed.patch_size[0]
    if x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    caught: dict[int, torch.Tensor] = {}
    handles = []
    for i in wanted:

        def hook(module: torch.nn.Module, args: tuple, i: int = i) -> None:
            caught[i] = timm_block_attention(module, args[0])

        handles.append(model.blocks[i].attn.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    ctx = autocast(device, precision)
    try:
        with torch.no_grad(), ctx:
            # the blocks after the last one wanted are not needed: stop there
            model.forward_intermediates(
                x.to(device), indices=[wanted[-1]], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )
    finally:
        for h in handles:
            h.remove()
    prefix = model.num_prefix_tokens
    attn = torch.stack([caught[i][:, prefix:, prefix:] for i in wanted]).mean(dim=0)
    return attn.float()


def dino_resized_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Network input size: each side rounded UP to a multiple of the patch size (as CLIP-ES does)."""
    return (
        max(patch_size, int(math.ceil(height / patch_size) * patch_size)),
        max(patch_size, int(math.ceil(width / patch_size) * patch_size)),
    )


def preprocess(image: np.ndarray, patch_size: int, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """HxWx3 uint8 RGB -> ``[3, H', W']`` float32, ImageNet mean/std (DINO's normalisation).

    PIL bicubic resize to ``grid_hw * patch_size`` when a grid is given (e.g. CLIP's
    16-pixel grid for a patch-14 DINOv2, so no attention resampling is needed),
    else to :func:`dino_resized_size` (the sides rounded up to the patch size).
    """
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if grid_hw is not None:
        out_h, out_w = grid_hw[0] * patch_size, grid_hw[1] * patch_size
    else:
        out_h, out_w = dino_resized_size(image.shape[0], image.shape[1], patch_size)
    pil = Image.fromarray(image)
    if (out_w, out_h) != pil.size:
        pil = pil.resize((out_w, out_h), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


@dataclass
class DinoModel:
    """A frozen timm DINO ViT and where its weights came from."""

    model: Any  # a timm VisionTransformer
    name: str
    timm_name: str
    source: WeightsSource

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def is_random(self) -> bool:
        return self.source.is_random

    def describe(self) -> dict[str, Any]:
        """For manifests: model names, patch size and the weights' origin/path/sha256."""
        return {"model": self.name, "timm_name": self.timm_name, "patch_size": self.patch_size} | {
            "weights": self.source.describe()
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resized_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """The network input size: ``scale`` x each side rounded UP to the patch size."""
        return dino_resized_size(round(scale * height), round(scale * width), self.patch_size)

    def preprocess(
        self, image: np.ndarray, scale: float = 1.0, *, grid_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """See :func:`preprocess` (``scale`` resizes the image first when no grid is given)."""
        if grid_hw is None and scale != 1.0:
            h, w = self.resized_size(image.shape[0], image.shape[1], scale)
            grid_hw = (h // self.patch_size, w // self.patch_size)
        return preprocess(image, self.patch_size, grid_hw)

    def attention(self, x: torch.Tensor, blocks: Blocks = (-1,), precision: str = "fp32") -> torch.Tensor:
        """See :func:`dino_attention`; returns ``[N, h*w, h*w]`` float32."""
        return dino_attention(self.model, x, blocks, precision)

    def grid_attention(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        grid_hw: tuple[int, int],
        blocks: Blocks = (-1,),
        precision: str = "fp32",
        resample: bool = True,
    ) -> torch.Tensor:
        """Images' attention on another model's patch grid (CLIP's): ``[N, gh*gw, gh*gw]`` (one
        image, an ``ndarray``: ``[gh*gw, gh*gw]``).

        With the same patch size (DINO ViT-B/16 and CLIP ViT-B/16), or ``resample=False``,
        the images are resized to ``grid_hw * patch_size`` so the grids coincide (one batch).
        Otherwise (DINOv2, patch 14) each runs at its own grid (sides rounded up to 14) and the
        attention is resampled to ``grid_hw``
        (:func:`ssr_cli.refine.affinity.resample_attention`, rows sum to 1).
        """
        from ssr_cli.refine.affinity import resample_attention

        single = isinstance(images, np.ndarray)
        batch: list[np.ndarray] = [images] if isinstance(images, np.ndarray) else list(images)
        if self.patch_size == 16 or not resample:
            x = torch.stack([self.preprocess(im, grid_hw=grid_hw) for im in batch]).to(self.device)
            out = self.attention(x, blocks, precision)
        else:
            parts = []
            for im in batch:
                x = self.preprocess(im)[None].to(self.device)
                own = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
                parts.append(resample_attention(self.attention(x, blocks, precision)[0], own, grid_hw))
            out = torch.stack(parts)
        return out[0] if single else out


def build_dino(name: str = DEFAULT_MODEL, seed: int = 0, arch_overrides: dict[str, Any] | None = None) -> Any:
    """The timm architecture of ``name`` with random weights (seeded), no classifier, dynamic size.

    ``arch_overrides``: extra ``timm.create_model`` arguments (e.g. ``embed_dim``,
    ``depth``, ``num_heads`` for a tiny model in tests).
    """
    import timm

    _short, timm_name = resolve_dino_name(name)
    kwargs = {"num_classes": 0, "dynamic_img_size": True} | dict(arch_overrides or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(timm_name, pretrained=False, **kwargs)


def load_dino(
    name: str = DEFAULT_MODEL,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    arch_overrides: dict[str, Any] | None = None,
) -> DinoModel:
    """Build DINO model ``name`` and load its weights; frozen, eval mode, on ``device``.

    ``weights``: a file or folder, ``"random"`` (random init from ``seed``, recorded
    as random), or None (``$SSR_DINO_WEIGHTS``, local caches, download when online;
    offline with nothing local raises WeightsError at once). ``arch_overrides``: see
    :func:`build_dino` (the weights must then fit the changed architecture).
    """
    short, timm_name = resolve_dino_name(name)
    source = dino_weights_source(short, weights)
    model = build_dino(short, seed=seed, arch_overrides=arch_overrides)
    _check_supported(model, short)
    if source.path is not None:
        _fit(model, read_dino_state_dict(source.path), source.path, short)
        source = source.with_sha256()
    model.eval().requires_grad_(False)
    model.to(torch.device(device))
    return DinoModel(model=model, name=short, timm_name=timm_name, source=source)
