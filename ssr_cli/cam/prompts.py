"""Class and background text embeddings from a vocabulary, and their on-disk cache.

CLIP-ES (``zeroshot_classifier``): for each class, every template filled with the
class's prompt string is encoded, each embedding L2-normalised, the mean taken
and L2-normalised again. Background words go through the same templates.

Imports torch: import lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ssr_cli.models.clip import ClipModel


class PromptVocabulary(Protocol):
    """What this module reads from ``ssr_cli.data.vocab.Vocabulary``."""

    @property
    def prompts(self) -> tuple[str, ...]: ...
    @property
    def templates(self) -> tuple[str, ...]: ...
    @property
    def background(self) -> tuple[str, ...]: ...


def _fill(words: tuple[str, ...] | list[str], templates: tuple[str, ...] | list[str]) -> list[str]:
    return [template.format(word) for word in words for template in templates]


def text_embeddings(model: ClipModel, vocab: PromptVocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg [K, E], bg [B, E]): L2-normalised float32 embeddings on the model's device.

    Row k of ``fg`` is class id k+1; B may be 0. One batched text pass for all strings.
    """
    templates = tuple(vocab.templates)
    fg_words, bg_words = tuple(vocab.prompts), tuple(vocab.background)
    strings = _fill(fg_words, templates) + _fill(bg_words, templates)
    encoded = model.encode_text(strings)  # [(K + B) * T, E], each row normalised
    per_word = encoded.view(len(fg_words) + len(bg_words), len(templates), -1).mean(dim=1)
    per_word = torch.nn.functional.normalize(per_word, dim=-1)
    return per_word[: len(fg_words)].contiguous(), per_word[len(fg_words) :].contiguous()


def text_cache_key(model: ClipModel, vocab: PromptVocabulary) -> str:
    """Fingerprint of what the embeddings depend on: architecture, weights, prompts, templates, background."""
    from ssr_cli.artefacts import fingerprint

    source = model.weights_source
    weights = source.sha256 if not source.is_random else f"random:{model.seed}"
    return fingerprint(
        {
            "arch": model.arch,
            "quick_gelu": model.quick_gelu,
            "weights": weights,
            "prompts": list(vocab.prompts),
            "templates": list(vocab.templates),
            "background": list(vocab.background),
        }
    )


def save_text_cache(path: str | Path, fg: torch.Tensor, bg: torch.Tensor, key: str) -> Path:
    """Write fg/bg embeddings to a safetensors file (atomically) tagged with ``key``."""
    from safetensors.torch import save_file

    from ssr_cli.artefacts import atomic_write

    tensors = {"fg": fg.detach().float().cpu().contiguous(), "bg": bg.detach().float().cpu().contiguous()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"key": key}))


def load_text_cache(
    path: str | Path, key: str, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fg, bg) from ``path`` when it exists, reads and carries ``key``; otherwise None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta: dict[str, Any] = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            fg, bg = fh.get_tensor("fg"), fh.get_tensor("bg")
    except Exception:  # unreadable cache: recompute
        return None
    return fg.to(device), bg.to(device)


def cached_text_embeddings(
    model: ClipModel, vocab: PromptVocabulary, path: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``text_embeddings`` read from / written to ``path`` (no cache when None)."""
    if path is None:
        return text_embeddings(model, vocab)
    key = text_cache_key(model, vocab)
    cached = load_text_cache(path, key, model.device)
    if cached is not None:
        return cached
    fg, bg = text_embeddings(model, vocab)
    save_text_cache(path, fg, bg, key)
    return fg, bg
