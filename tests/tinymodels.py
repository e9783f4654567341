"""Tiny random models saved to real files, so tests run the real loading code.

CLIP: ``register_tiny_clip()`` registers the open_clip architecture ``ssr-tiny-vit``
(ViT: width 64, 3 blocks, 2 heads, patch 16, image 224 = 14x14 grid; text: width
32, 2 blocks, context 77, the real 49408-token BPE vocabulary; embedding 32;
QuickGELU like OpenAI's CLIP). ``tiny_clip_files(folder)`` writes one random
model in every weights format ``load_clip`` reads:

- ``openai-torchscript``: a TorchScript archive like OpenAI's ``ViT-B-16.pt``:
  the model scripted with ``torch.jit.script`` after OpenAI's mixed precision
  (fp16 conv/linear/attention/projection weights) and with OpenAI's extra
  ``input_resolution``/``context_length``/``vocab_size`` entries. open_clip's
  ``CLIP`` keeps OpenAI's parameter names, so ``torch.jit.load(f).state_dict()``
  has exactly the keys of OpenAI's archives;
- ``openai-state-dict``: the same content saved with ``torch.save`` (OpenAI's
  plain state-dict variant);
- ``openclip-pt``: an open_clip training checkpoint ``{"epoch", "state_dict"}``
  with DistributedDataParallel's ``module.`` prefixes;
- ``openclip-bin``: a plain open_clip state dict (``open_clip_pytorch_model.bin``);
- ``safetensors``: ``open_clip_model.safetensors``.

All weights are rounded to fp16-representable values first, so every format
holds exactly the same numbers. The logit scale stays at open_clip's initial
1/0.07: with random embeddings, OpenAI's 100 saturates the softmax and the
GradCAM gradients vanish.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path

TINY_CLIP = "ssr-tiny-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_FORMATS = ("openai-torchscript", "openai-state-dict", "openclip-pt", "openclip-bin", "safetensors")
_FILE_NAMES = {
    "openai-torchscript": "ViT-tiny-jit.pt",
    "openai-state-dict": "ViT-tiny-openai-sd.pt",
    "openclip-pt": "epoch_1.pt",
    "openclip-bin": "open_clip_pytorch_model.bin",
    "safetensors": "open_clip_model.safetensors",
}
_registered: dict[str, Path] = {}


def register_tiny_clip() -> str:
    """Register ``ssr-tiny-vit`` with open_clip (once per process); returns its name."""
    import open_clip

    if TINY_CLIP not in _registered:
        folder = Path(tempfile.mkdtemp(prefix="ssr-tiny-clip-"))
        config = folder / f"{TINY_CLIP}.json"
        config.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(config)
        _registered[TINY_CLIP] = config
    return TINY_CLIP


def make_tiny_clip(seed: int = 0):
    """A random ``ssr-tiny-vit`` open_clip model (fp32, eval) with fp16-representable weights."""
    import open_clip
    import torch

    register_tiny_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logging.disable(logging.WARNING)  # "initialized randomly" on the root logger
        try:
            model = open_clip.create_model(TINY_CLIP, pretrained=None, device="cpu")
        finally:
            logging.disable(logging.NOTSET)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model.eval()


def _openai_archive_module(model):
    """A copy in OpenAI's mixed precision with OpenAI's extra state-dict entries."""
    import torch
    from open_clip.model import convert_weights_to_lp

    twin = copy.deepcopy(model)
    del twin.context_length, twin.vocab_size  # plain ints in open_clip, tensors in OpenAI's archives
    twin.register_buffer("input_resolution", torch.tensor(224))
    twin.register_buffer("context_length", torch.tensor(77))
    twin.register_buffer("vocab_size", torch.tensor(49408))
    convert_weights_to_lp(twin, dtype=torch.float16)
    return twin


def save_tiny_clip(model, path: str | Path, fmt: str) -> Path:
    """Save ``model`` to ``path`` in weights format ``fmt`` (one of ``CLIP_FORMATS``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "openai-torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(_openai_archive_module(model))
            torch.jit.save(scripted, str(path))
    elif fmt == "openai-state-dict":
        torch.save(_openai_archive_module(model).state_dict(), path)
    elif fmt == "openclip-pt":
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "openclip-bin":
        torch.save(state, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {CLIP_FORMATS}")
    return path


def tiny_clip_files(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write one tiny random CLIP in every format into ``folder``; {format: path}."""
    folder = Path(folder)
    model = make_tiny_clip(seed)
    return {fmt: save_tiny_clip(model, folder / _FILE_NAMES[fmt], fmt) for fmt in CLIP_FORMATS}


def tiny_clip_for_cli(folder: Path, seed: int = 3) -> dict[str, str]:
    """The tiny CLIP as a user hands it over: ``arch`` (its open_clip config JSON, named after the
    architecture) and ``weights`` (a safetensors file) in ``folder``."""
    import json

    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    weights = save_tiny_clip(make_tiny_clip(seed=seed), folder / "tiny.safetensors", "safetensors")
    return {"arch": str(config), "weights": str(weights)}


def make_pets_project(root: Path, images: int, size: tuple[int, int] = (40, 56)) -> Path:
    """A tiny project in ``root``: the tiny CLIP (``tiny.json``, ``tiny.safetensors``) and a
    custom-layout dataset ``root/data`` of ``images`` random JPEGs ``p0..`` of ``size`` (h, w)
    labelled cat, dog, cat dog in turn (vocabulary ``pets``). Returns ``root``."""
    import numpy as np
    from PIL import Image

    (root / "tiny.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    save_tiny_clip(make_tiny_clip(seed=3), root / "tiny.safetensors", "safetensors")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "vocab.json").write_text(json.dumps({"name": "pets", "classes": ["cat", "dog"]}))
    rng = np.random.default_rng(0)
    lines = []
    for i in range(images):
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / "images" / f"p{i}.jpg")
        lines.append(f"p{i} {['cat', 'dog', 'cat dog'][i % 3]}")
    (data / "labels.txt").write_text("\n".join(lines) + "\n")
    return root
