"""Where each model's weights come from, without importing torch, open_clip or timm.

``ssr weights``, the missing-weights errors and the no-op rerun check of a complete run
must answer in well under a second, so the default models' facts are a table here
(checked against open_clip and timm by ``tests/test_weights_catalog.py``); only other
architectures fall back to asking open_clip or timm. ``models/clip.py`` and
``models/dino.py`` use these functions for their loading, so both see the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ssr_cli.errors import ConfigError
from ssr_cli.models.weights import WeightsSource, hf_hub_cached_files, resolve_weights, weights_cache_dir

CLIP_ENV_VAR = "SSR_CLIP_WEIGHTS"
DINO_ENV_VAR = "SSR_DINO_WEIGHTS"
_OPENAI = "https://openaipublic.azureedge.net/clip/models"

#: open_clip's "openai" pretrained configs (url, hf_hub) of the architectures with OpenAI weights
OPENAI_CLIP: dict[str, dict[str, str]] = {
    arch: {"url": f"{_OPENAI}/{sha}/{file}", "hf_hub": f"timm/{hub}.openai/"}
    for arch, sha, file, hub in [
        (
            "RN50",
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
            "RN50.pt",
            "resnet50_clip",
        ),
        (
            "RN50x4",
            "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
            "RN50x4.pt",
            "resnet50x4_clip",
        ),
        (
            "RN50x16",
            "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
            "RN50x16.pt",
            "resnet50x16_clip",
        ),
        (
            "RN50x64",
            "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
            "RN50x64.pt",
            "resnet50x64_clip",
        ),
        (
            "RN101",
            "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
            "RN101.pt",
            "resnet101_clip",
        ),
        (
            "ViT-B-16",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            "ViT-B-16.pt",
            "vit_base_patch16_clip_224",
        ),
        (
            "ViT-B-32",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            "ViT-B-32.pt",
            "vit_base_patch32_clip_224",
        ),
        (
            "ViT-L-14",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            "ViT-L-14.pt",
            "vit_large_patch14_clip_224",
        ),
        (
            "ViT-L-14-336",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            "ViT-L-14-336px.pt",
            "vit_large_patch14_clip_336",
        ),
    ]
}
OPENAI_CLIP.update({f"{arch}-quickgelu": cfg for arch, cfg in list(OPENAI_CLIP.items())})

#: timm backbones of the segmenter: name -> (hub repo of timm's default tag, file names)
TIMM_HUB: dict[str, tuple[str, list[str]]] = {
    name: (f"timm/{name}.{tag}", ["model.safetensors", "pytorch_model.bin"])
    for name, tag in [
        ("resnet10t", "c3_in1k"),
        ("resnet18", "a1_in1k"),
        ("resnet34", "a1_in1k"),
        ("resnet50", "a1_in1k"),
        ("resnet101", "a1h_in1k"),
        ("resnet152", "a1h_in1k"),
    ]
}

#: DINO short name -> (timm model name, file name of the original release)
DINO_MODELS: dict[str, tuple[str, str]] = {
    "dino_vitb16": ("vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth"),
    "dino_vits16": ("vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth"),
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
    "dinov2_vits14_reg4": ("vit_small_patch14_reg4_dinov2.lvd142m", "dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg4": ("vit_base_patch14_reg4_dinov2.lvd142m", "dinov2_vitb14_reg4_pretrain.pth"),
}


def openai_cfg(arch: str, *, known: bool = False) -> dict[str, Any]:
    """open_clip's ``openai`` pretrained config of ``arch`` ({} when it has none). ``known``: an
    architecture open_clip does not have is a one-line error (the usual names answer from the
    table, without importing open_clip)."""
    if arch in OPENAI_CLIP:
        return dict(OPENAI_CLIP[arch])
    if Path(arch).suffix == ".json":
        return {}  # an open_clip model-config file: no pretrained weights
    import open_clip

    if known and arch not in open_clip.list_models():
        raise ConfigError(
            f"unknown CLIP architecture {arch!r}", hint="use an open_clip model name such as ViT-B-16"
        )

    if "openai" in open_clip.list_pretrained_tags_by_model(arch):
        return dict(open_clip.get_pretrained_cfg(arch, "openai"))
    return {}


def clip_cache_candidates(arch: str) -> list[Path]:
    """Local files that may hold ``arch``'s default (OpenAI) weights, best first."""
    cfg = openai_cfg(arch)
    url_name = Path(cfg["url"]).name if cfg.get("url") else f"{arch}.pt"
    ours = weights_cache_dir("clip")
    names = list(dict.fromkeys([url_name, f"{arch}.pt", f"{arch}.safetensors"]))
    found = [ours / name for name in names]
    found.append(Path("~/.cache/clip").expanduser() / url_name)  # OpenAI's clip package, open_clip URLs
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = hub.rstrip("/"), ""
        if not hub.endswith("/"):
            repo_id, filename = hub.rsplit("/", 1)
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        found.extend(hf_hub_cached_files(repo_id, files))
    return found


def clip_weights_source(arch: str, weights: str | Path | None) -> WeightsSource:
    """Resolve ``--clip-weights`` (None, a path, a folder or ``random``) for ``arch``."""
    cfg = openai_cfg(arch)
    download = None
    host = "huggingface.co"
    if cfg:

        def download() -> Path:
            from open_clip.pretrained import download_pretrained

            return Path(download_pretrained(cfg))

        if not cfg.get("hf_hub") and cfg.get("url"):
            from urllib.parse import urlparse

            host = urlparse(cfg["url"]).hostname or host
    return resolve_weights(
        "clip",
        arch,
        weights,
        env_var=CLIP_ENV_VAR,
        cache_candidates=clip_cache_candidates(arch),
        download=download,
        host=host,
    )


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: $TORCH_HOME/hub, else the XDG cache."""
    home = os.environ.get("TORCH_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def resolve_dino_name(name: str) -> tuple[str, str]:
    """``(short name, timm name)`` for a short name or a timm name; ConfigError otherwise."""
    if name in DINO_MODELS:
        return name, DINO_MODELS[name][0]
    for short, (timm_name, _) in DINO_MODELS.items():
        if name in (timm_name, timm_name.split(".")[0]):
            return short, timm_name
    raise ConfigError(f"unknown DINO model {name!r}", hint=f"use one of {', '.join(DINO_MODELS)}")


def dino_cache_candidates(name: str) -> list[Path]:
    """Local files that may hold ``name``'s weights, best first."""
    short, timm_name = resolve_dino_name(name)
    original = DINO_MODELS[short][1]
    ours = weights_cache_dir("dino")
    found = [ours / original, ours / f"{timm_name}.safetensors", ours / f"{short}.safetensors"]
    found.append(torch_hub_dir() / "checkpoints" / original)
    found.extend(hf_hub_cached_files(f"timm/{timm_name}", ["model.safetensors", "pytorch_model.bin"]))
    return found


def dino_weights_source(name: str, weights: str | None) -> WeightsSource:
    """Resolve ``--dino-weights`` (None, a file, a folder or ``random``) for model ``name``."""
    short, timm_name = resolve_dino_name(name)

    def download() -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(f"timm/{timm_name}", "model.safetensors"))

    return resolve_weights(
        "dino",
        short,
        weights,
        env_var=DINO_ENV_VAR,
        cache_candidates=dino_cache_candidates(short),
        download=download,
    )


def timm_hub(name: str) -> tuple[str | None, list[str]]:
    """(hub repo of timm's default tag, file names) of backbone ``name``; timm only for others."""
    if name in TIMM_HUB:
        repo, files = TIMM_HUB[name]
        return repo, list(files)
    import timm

    from ssr_cli.models.backbone_weights import hub_files

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm backbone {name!r}", hint="use a timm model name such as resnet101")
    return hub_files(name)
