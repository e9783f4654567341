"""Frozen open_clip ViT for CAMs: weights loading, CLIP-ES preprocessing, tokens, attention.

Layouts: images are NCHW float tensors (CLIP-normalised); token tensors are NLD
(batch, 1 + h*w tokens with the CLS token first, width) whatever layout the
installed open_clip runs its transformer in; grids are (h, w) = (H/p, W/p) for
patch size p (16 for ViT-B/16).

Weight formats (METHOD.md section 7): OpenAI's ``ViT-B-16.pt`` as a TorchScript
archive (its tensors read without running it: ``models/torchscript_archive.py``;
never ``torch.jit.load``, which runs the archive's code) or as a plain state dict;
open_clip checkpoints ``.pt``, ``.pth``, ``.bin`` (optionally ``{"state_dict": ...}``
with ``module.`` prefixes); ``.safetensors``. Everything except TorchScript is read
with ``torch.load(weights_only=True)`` or safetensors. The format is sniffed from the
content, not the suffix.

Imports torch and open_clip: import this module lazily (inside command bodies).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.errors import ArtefactError, ConfigError
from ssr_cli.models.attention import Blocks, block_indices
from ssr_cli.models.clip_arch import check_supported, default_quick_gelu, fit_state_dict
from ssr_cli.models.clip_arch import register_arch as register_arch  # re-exported
from ssr_cli.models.sources import clip_cache_candidates as clip_cache_candidates  # re-exported
from ssr_cli.models.sources import clip_weights_source
from ssr_cli.models.vit_blocks import block_attention as block_attention  # re-exported
from ssr_cli.models.vit_blocks import block_forward, self_attention
from ssr_cli.models.weights import (
    WeightsSource,
    read_state_dict,
)

DEFAULT_ARCH = "ViT-B-16"
ENV_VAR = "SSR_CLIP_WEIGHTS"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ImageTokens:
    """What one forward pass of the image tower leaves for GradCAM and the affinity.

    - ``pre``: [N, 1+h*w, D] input of the last block (computed without grad).
    - ``ln1``: [N, 1+h*w, D] output of the last block's ``ln_1`` (the GradCAM
      target, CLS token first); a leaf that requires grad when asked for.
    - ``post``: [N, 1+h*w, D] tokens after the last block and ``ln_post``.
    - ``embedding``: [N, E] mean of the patch tokens of ``post`` (CLS excluded),
      then ``proj``; not L2-normalised. A function of ``ln1``.
    - ``grid``: (h, w).
    - ``attn``: [N, h*w, h*w] head- and block-averaged patch attention, or None.
    """

    pre: torch.Tensor
    ln1: torch.Tensor
    post: torch.Tensor
    embedding: torch.Tensor
    grid: tuple[int, int]
    attn: torch.Tensor | None = None


@dataclass
class TrunkTokens:
    """``ClipModel.trunk_tokens``: what GradCAM needs (``ImageTokens`` without the last block).

    ``pre``, ``ln1``, ``grid`` and ``attn`` as in ``ImageTokens`` (``ln1`` without grad).
    """

    pre: torch.Tensor
    ln1: torch.Tensor
    grid: tuple[int, int]
    attn: torch.Tensor | None = None


# ----------------------------------------------------------------------------- weights


def load_clip(
    arch: str = DEFAULT_ARCH,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    quick_gelu: bool | None = None,
    seed: int = 0,
) -> ClipModel:
    """Build open_clip ``arch`` and load its weights; frozen, eval mode, on ``device``.

    ``weights``: a file or folder, ``"random"`` (random init from ``seed``, for
    smoke runs), or None (``$SSR_CLIP_WEIGHTS``, local caches, download when
    online). ``quick_gelu`` None: True for OpenAI architecture names (ViT-B-16,
    ...) and ``-quickgelu`` names, which is what OpenAI's weights need.
    """
    import open_clip

    if arch not in open_clip.list_models():
        raise ConfigError(
            f"unknown CLIP architecture {arch!r}", hint="use an open_clip model name such as ViT-B-16"
        )
    source = clip_weights_source(arch, weights)
    use_quick_gelu = default_quick_gelu(arch) if quick_gelu is None else quick_gelu
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip logs "initialized randomly" on the root logger
        try:
            model = open_clip.create_model(
                arch,
                pretrained=None,
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
                device="cpu",
                quick_gelu=use_quick_gelu,
            )
        finally:
            logging.disable(previous)
    check_supported(model, arch)
    if source.path is not None:
        state, _fmt = read_state_dict(source.path, kind="CLIP")
        fit_state_dict(model, state, source.path, arch)
        source = source.with_sha256()
    model.eval().requires_grad_(False)
    model.to(torch.device(device))
    return ClipModel(model, arch=arch, source=source, quick_gelu=use_quick_gelu, seed=seed)


# ----------------------------------------------------------------------------- model


class ClipModel:
    """A frozen open_clip model with what CAMs need. ``model`` is the open_clip module."""

    def __init__(
        self, model: torch.nn.Module, *, arch: str, source: WeightsSource, quick_gelu: bool, seed: int = 0
    ) -> None:
        import open_clip

        self.model: Any = model  # open_clip CLIP (typed Any: its submodules are dynamic for mypy)
        self.arch = arch
        self.weights_source = source
        self.quick_gelu = quick_gelu
        self.seed = seed  # what random weights were drawn from
        visual: Any = self.model.visual
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.output_dim)
        self.blocks: Any = visual.transformer.resblocks
        self._batch_first = bool(getattr(visual.transformer, "batch_first", False))
        self._pos_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self.tokenizer = open_clip.get_tokenizer(arch)

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def is_random(self) -> bool:
        return self.weights_source.is_random

    @property
    def logit_scale(self) -> float:
        """exp(learned logit scale): 100 for OpenAI's weights."""
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    def describe(self) -> dict[str, Any]:
        """For manifests: architecture, QuickGELU, weights origin/path/sha256."""
        info = {"arch": self.arch, "quick_gelu": self.quick_gelu, "weights": self.weights_source.describe()}
        if self.is_random:
            info["seed"] = self.seed
        return info

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        from ssr_cli.runtime import autocast

        return autocast(self.device, precision)

    # -- preprocessing --------------------------------------------------------------

    def resized_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """CLIP-ES's network input size: ceil(scale * side / p) * p on each side."""
        p = self.patch_size
        return (
            max(p, int(math.ceil(scale * int(height) / p) * p)),
            max(p, int(math.ceil(scale * int(width) / p) * p)),
        )

    def preprocess(
        self, image: np.ndarray, scale: float = 1.0, *, grid_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, H', W'] float32 (CPU), as CLIP-ES prepares it.

        PIL bicubic resize to ``resized_size`` (H', W' multiples of the patch
        size, rounded UP as CLIP-ES does), or to ``grid_hw`` patches, then /255 and CLIP mean/std.
        """
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        if grid_hw is not None:
            out_h, out_w = grid_hw[0] * self.patch_size, grid_hw[1] * self.patch_size
        else:
            out_h, out_w = self.resized_size(image.shape[0], image.shape[1], scale)
        pil = Image.fromarray(image)
        if (out_w, out_h) != pil.size:
            pil = pil.resize((out_w, out_h), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (tensor - mean) / std

    # -- image tower ----------------------------------------------------------------

    def pos_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h*grid_w, D]: the learned grid bilinearly resized, CLS position kept."""
        if (grid_h, grid_w) == self.native_grid:
            return self.model.visual.positional_embedding
        key = (grid_h, grid_w, str(self.device))
        if key not in self._pos_cache:
            pos = self.model.visual.positional_embedding.detach().float()
            gh, gw = self.native_grid
            grid = pos[1:].reshape(gh, gw, -1).permute(2, 0, 1).unsqueeze(0)
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
            grid = grid[0].permute(1, 2, 0).reshape(grid_h * grid_w, -1)
            self._pos_cache[key] = torch.cat([pos[:1], grid], dim=0)
        return self._pos_cache[key]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1+h*w, D] tokens entering the first block (after ``ln_pre``)."""
        visual = self.model.visual
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {self.patch_size}")
        x = visual.conv1(x.to(self.device))
        n, width, grid_h, grid_w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, width).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding(grid_h, grid_w).to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One whole block on NLD tokens (handles transformers that run LND)."""
        block = self.blocks[index]
        if self._batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def last_block(self, pre: torch.Tensor, ln1: torch.Tensor) -> torch.Tensor:
        """The last block written so that its ``ln_1`` output is an input: [N, L, D] -> [N, L, D]."""
        block = self.blocks[-1]
        out, _ = self_attention(block.attn, ln1)
        x = pre + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def pool(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-block output [N, L, D] -> (``ln_post`` tokens [N, L, D], embedding [N, E]).

        The embedding is the mean of the patch tokens (CLS excluded) then ``proj``.
        """
        visual = self.model.visual
        post = visual.ln_post(out)
        pooled = post[:, 1:].mean(dim=1)
        return post, (pooled @ visual.proj if visual.proj is not None else pooled)

    def patch_embeddings(self, tokens: ImageTokens) -> torch.Tensor:
        """[N, h*w, E]: every patch token of ``tokens.post`` through ``proj`` (row-major grid), in
        ``proj``'s dtype (float32): the tokens of a bf16/fp16 pass are cast up first, as this runs
        outside autocast (the first GPU run of train-cmpa failed on that mix)."""
        proj = self.model.visual.proj
        patches = tokens.post[:, 1:]
        return patches.to(proj.dtype) @ proj if proj is not None else patches

    def _block_indices(self, blocks: Blocks) -> list[int]:
        """An int n = the last min(n, L) blocks (CLIP-ES's ``[-8:]``); a sequence = those indices."""
        return block_indices(blocks, len(self.blocks))

    def trunk(
        self, x: torch.Tensor, *, attn_blocks: int | Sequence[int] | None = None, precision: str = "fp32"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All blocks but the last, without grad: [N, 3, H, W] -> (pre, ln1, attn).

        ``pre`` [N, 1+h*w, D] enters the last block, ``ln1`` is its ``ln_1`` output;
        ``attn`` [N, h*w, h*w] is the patch attention averaged over heads and
        ``attn_blocks`` (an int n: the last n blocks; or block indices; None: not computed).

        The blocks run written out (``block_forward``) whether or not ``attn`` is asked for,
        so the tokens are the same either way; a block's attention is the softmax its forward
        computes anyway. Only the last block's is recomputed from ``ln1`` (its q and k).
        """
        wanted = self._block_indices(attn_blocks) if attn_blocks is not None else []
        attn_sum: torch.Tensor | None = None
        with self.autocast(precision), torch.no_grad():
            h = self.embed(x)
            for i in range(len(self.blocks) - 1):
                h, a = block_forward(self.blocks[i], h, need_probs=i in wanted)
                if a is not None:
                    attn_sum = a if attn_sum is None else attn_sum + a
            ln1 = self.blocks[-1].ln_1(h)
            if len(self.blocks) - 1 in wanted:
                a = block_attention(self.blocks[-1], ln1)
                attn_sum = a if attn_sum is None else attn_sum + a
        attn = None if attn_sum is None else (attn_sum / len(wanted))[:, 1:, 1:]
        return h, ln1, attn

    def trunk_tokens(
        self, x: torch.Tensor, *, attn_blocks: int | Sequence[int] | None = None, precision: str = "fp32"
    ) -> TrunkTokens:
        """``trunk`` as ``TrunkTokens`` (for ``gradcam``, which runs the last block itself)."""
        pre, ln1, attn = self.trunk(x, attn_blocks=attn_blocks, precision=precision)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return TrunkTokens(pre=pre, ln1=ln1, grid=grid, attn=attn)

    def image_tokens(
        self,
        x: torch.Tensor,
        grad_last_block: bool = True,
        *,
        attn_blocks: int | Sequence[int] | None = None,
        precision: str = "fp32",
    ) -> ImageTokens:
        """Run the image tower on [N, 3, H, W]; see ``ImageTokens`` for the outputs.

        The first L-1 blocks run under ``torch.no_grad``. With ``grad_last_block``
        the last block builds a graph from ``ln1`` (a leaf requiring grad) to
        ``embedding``. ``attn_blocks`` (8 = the last 8, or indices) also returns their
        head-averaged patch-to-patch attention, averaged over the blocks.
        """
        pre, ln1, attn = self.trunk(x, attn_blocks=attn_blocks, precision=precision)
        ln1 = ln1.detach().requires_grad_(grad_last_block)
        with self.autocast(precision), torch.set_grad_enabled(grad_last_block):
            post, embedding = self.pool(self.last_block(pre, ln1))
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return ImageTokens(pre=pre, ln1=ln1, post=post, embedding=embedding, grid=grid, attn=attn)

    def attention(
        self, x: torch.Tensor, blocks: int | Sequence[int] = 8, precision: str = "fp32"
    ) -> torch.Tensor:
        """[N, 3, H, W] -> [N, h*w, h*w]: patch-to-patch attention (CLS dropped), averaged over
        heads and ``blocks`` (CLIP-ES: the last 8). Rows are not re-normalised."""
        _, _, attn = self.trunk(x, attn_blocks=blocks, precision=precision)
        assert attn is not None
        return attn.float()

    def grid_attention(
        self,
        images: Sequence[np.ndarray],
        grid_hw: tuple[int, int],
        blocks: Blocks = 8,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Images of one size -> [N, gh*gw, gh*gw]: ``attention`` of each at its own CLIP-ES size,
        which must be the patch grid ``grid_hw`` (the CAMs' grid); a one-line error otherwise."""
        x = torch.stack([self.preprocess(im) for im in images])
        own = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if own != tuple(grid_hw):
            raise ArtefactError(
                f"the grid {tuple(grid_hw)} is not CLIP's {own} for an image of {images[0].shape[:2]}"
            )
        return self.attention(x.to(self.device), blocks=blocks, precision=precision)

    # -- text tower -----------------------------------------------------------------

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[len(texts), E] L2-normalised float32 text embeddings (batched, no grad, fp32)."""
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if not chunks:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(chunks, dim=0)
