"""CLIP architectures and how a weights file is fitted to one: ``register_arch`` (open_clip
names or model-config JSON files), the QuickGELU default, the supported-model check and
``fit_state_dict`` (OpenAI and open_clip layouts). Used by ``ssr_cli.models.clip.load_clip``.

Imports torch at the top and open_clip inside the functions: import this module lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssr_cli.errors import ConfigError, DataError, WeightsError
from ssr_cli.models.sources import openai_cfg
from ssr_cli.models.weights import state_dict_mismatch

#: entries of OpenAI's state dicts that are not parameters of an open_clip model
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    from open_clip.model import convert_to_custom_text_state_dict

    state = {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}
    if hasattr(model, "text") and "positional_embedding" in state:
        state = convert_to_custom_text_state_dict(state)  # OpenAI layout -> open_clip CustomTextCLIP
    target = model.state_dict()
    if "logit_scale" in state and state["logit_scale"].ndim != target["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(target["logit_scale"].shape)
    problem = state_dict_mismatch(target, state)
    if problem:
        raise WeightsError(
            f"the weights do not fit CLIP architecture {arch}: " + problem,
            path=path,
            hint="choose the architecture the file was trained with, or another file",
        )
    model.load_state_dict(state, strict=True)  # copies into the fp32 parameters (OpenAI files are fp16)


def default_quick_gelu(arch: str) -> bool:
    import open_clip

    if arch.endswith("-quickgelu"):
        return True
    if openai_cfg(arch):  # our default weights for OpenAI architecture names are OpenAI's (QuickGELU)
        return True
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))


def check_supported(model: torch.nn.Module, arch: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual: Any = getattr(model, "visual", None)
    ok = isinstance(visual, VisionTransformer) and visual.attn_pool is None
    ok = ok and all(
        isinstance(b, ResidualAttentionBlock)
        and isinstance(b.attn, torch.nn.MultiheadAttention)
        and b.attn._qkv_same_embed_dim  # one in_proj_weight: self_attention's layout
        and b.attn.bias_k is None
        and not b.attn.add_zero_attn
        and not hasattr(b, "ln_1_kv")
        for b in visual.transformer.resblocks
    )
    if not ok:
        raise ConfigError(
            f"CLIP architecture {arch} is not supported for CAMs",
            hint="use an open_clip ViT with standard attention blocks, e.g. ViT-B-16 or ViT-L-14",
        )


def register_arch(arch: str) -> str:
    """``arch`` is an open_clip model name, or a model-config JSON file (registered, then
    used by its file stem), e.g. a custom or tiny test architecture."""
    if not arch.endswith(".json"):
        return arch
    import open_clip

    path = Path(arch)
    if not path.is_file():
        raise DataError(
            "CLIP architecture config file not found",
            path=path,
            hint="pass an open_clip model name or an existing config JSON",
        )
    try:
        open_clip.add_model_config(path)
    except Exception as exc:
        raise DataError(
            f"unreadable CLIP architecture config ({type(exc).__name__})",
            path=path,
            hint="it must be an open_clip model config JSON",
        ) from None
    return path.stem
