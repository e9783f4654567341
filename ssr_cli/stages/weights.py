"""``ssr weights``: where each model's weights would load from now, and importing files into the cache.

Reuses the resolution code of ``ssr_cli.models`` (``weights``, ``clip``, ``dino``,
``backbone_weights``): the status looks at exactly the files the loaders look at
(environment variable, our cache, other tools' caches) and never downloads; a
download is only reported as possible when the hub is reachable (``is_offline``:
``HF_HUB_OFFLINE=1``/``SSR_OFFLINE=1`` answer at once, else a 2 s connect probe, made
at most once and only when some model has no local file).

``add_weights`` checks a file's SHA-256 where an official value is known (OpenAI's CLIP
archives) before reading it, then loads it into the architecture on the CPU, then copies it
atomically into ``weights_cache_dir(kind)`` under the first file name the resolver
looks for there.

torch, open_clip and timm are imported inside the functions.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssr_cli.errors import ConfigError, WeightsError
from ssr_cli.models.sources import openai_cfg
from ssr_cli.models.weights import file_sha256_cached, is_offline, sniff_format, weights_cache_dir

KINDS = ("clip", "dino", "backbone")
DEFAULT_NAMES = {"clip": "ViT-B-16", "dino": "dino_vitb16", "backbone": "resnet101"}
ENV_VARS = {"clip": "SSR_CLIP_WEIGHTS", "dino": "SSR_DINO_WEIGHTS", "backbone": "SSR_BACKBONE_WEIGHTS"}
FLAGS = {"clip": "--clip-weights", "dino": "--dino-weights", "backbone": "--backbone-weights"}
NAME_FLAGS = {"clip": "--clip-arch", "dino": "--dino-model", "backbone": "--backbone"}
USED_BY = {"clip": "make-seeds, train-cmpa, refine", "dino": "refine", "backbone": "fit-seg"}
#: (kind, model) -> (format of the official file, its SHA-256, what it is). OpenAI's
#: other CLIP archives are read from the SHA-256 in open_clip's download URL.
KNOWN_SHA256: dict[tuple[str, str], tuple[str, str, str]] = {
    ("clip", "ViT-B-16"): (
        "torchscript",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "OpenAI's ViT-B-16.pt",
    ),
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown weights kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")


def _backbone_hub(name: str) -> tuple[str | None, list[str]]:
    from ssr_cli.models.sources import timm_hub

    return timm_hub(name)


def _dino_url(original: str) -> str:
    """The original release URL of a DINO / DINOv2 ``*_pretrain.pth`` file."""
    if original.startswith("dinov2_"):
        folder = "_".join(original.split("_")[:2])  # dinov2_vits14(_reg4)_pretrain.pth -> dinov2_vits14
        return f"https://dl.fbaipublicfiles.com/dinov2/{folder}/{original}"
    return f"https://dl.fbaipublicfiles.com/dino/{original[: -len('.pth')]}/{original}"


def _candidates(kind: str, name: str) -> tuple[str, list[Path], bool, str]:
    """(canonical name, cache candidates best first, a download exists, the official file's URL)."""
    if kind == "clip":
        from ssr_cli.models.sources import clip_cache_candidates

        cfg = openai_cfg(name, known=True)
        return name, clip_cache_candidates(name), bool(cfg), str(cfg.get("url", ""))
    if kind == "dino":
        from ssr_cli.models.sources import DINO_MODELS, dino_cache_candidates, resolve_dino_name

        short, _timm_name = resolve_dino_name(name)
        return short, dino_cache_candidates(short), True, _dino_url(DINO_MODELS[short][1])
    hub_id, hub_names = _backbone_hub(name)
    ours = weights_cache_dir("backbone")
    # the same candidates as ssr_cli.models.backbone_weights.resolve_backbone_state
    candidates = [ours / f"{name}.safetensors", ours / f"{name}.pth"]
    if hub_id:
        from ssr_cli.models.weights import hf_hub_cached_files

        candidates += hf_hub_cached_files(hub_id, hub_names)
    url = f"https://huggingface.co/{hub_id}/resolve/main/{hub_names[0]}" if hub_id else ""
    return name, candidates, bool(hub_id), url


def _source(kind: str, name: str) -> Any:
    """The loaders' own resolution (``WeightsSource``); only called when it cannot download."""
    if kind == "clip":
        from ssr_cli.models.sources import clip_weights_source

        return clip_weights_source(name, None)
    if kind == "dino":
        from ssr_cli.models.sources import dino_weights_source

        return dino_weights_source(name, None)
    from ssr_cli.models.weights import resolve_weights

    _cand_name, candidates, _dl, _where = _candidates(kind, name)
    return resolve_weights(
        "backbone", name, None, env_var=ENV_VARS[kind], cache_candidates=candidates, download=None
    )


def _our_names(kind: str, candidates: list[Path]) -> list[str]:
    ours = weights_cache_dir(kind)
    return list(dict.fromkeys(p.name for p in candidates if p.parent == ours))


def model_status(kind: str, name: str, offline: Callable[[], bool] = is_offline) -> dict[str, Any]:
    """Where ``kind`` model ``name`` would load its weights from now (no download, no loading).

    ``origin``: ``env``, ``random`` (the env var says ``random``), ``cache``,
    ``download`` (nothing local, the hub is reachable), ``missing`` or ``error``
    (the env var names no usable file). ``action`` says what to do.
    """
    _check_kind(kind)
    name, candidates, can_download, where = _candidates(kind, name)
    env_var = ENV_VARS[kind]
    expected = _our_names(kind, candidates)
    name_opt = "" if name == DEFAULT_NAMES[kind] else f" --name {name}"
    file_name = where.rsplit("/", 1)[-1] if where else expected[0]
    add_cmd = f"ssr weights add {kind} ~/Downloads/{file_name}{name_opt}"
    get = f"download {where}, then " if where else f"get the {name} weights, then "
    row: dict[str, Any] = {
        "kind": kind,
        "model": name,
        "origin": "missing",
        "path": None,
        "env_var": env_var,
        "flag": FLAGS[kind],
        "used_by": USED_BY[kind],
        "cache_dir": str(weights_cache_dir(kind)),
        "expected": expected,
        "searched": [str(p) for p in candidates],
        "action": f"{get}{add_cmd} (or pass {FLAGS[kind]} PATH, or set {env_var})",
    }
    if os.environ.get(env_var, "").strip():
        try:
            source = _source(kind, name)
        except WeightsError as exc:
            row.update(origin="error", action=f"fix or unset ${env_var}: {exc.one_line()}")
            return row
        path = None if source.path is None else str(source.path)
        row.update(origin=source.origin, path=path, action=f"nothing (set by ${env_var})")
        return row
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        row.update(origin="cache", path=str(found), action="nothing")
    elif can_download and not offline():
        row.update(origin="download", action=f"nothing: downloaded on first use (for offline use: {add_cmd})")
    elif not can_download:
        row["action"] = f"no official download: {add_cmd} (or pass {FLAGS[kind]} PATH, or set {env_var})"
    return row


def weights_status(
    clip_arch: str = "ViT-B-16", dino: str = "dino_vitb16", backbone: str = "resnet101"
) -> list[dict[str, Any]]:
    """One ``model_status`` row per model the pipeline uses (CLIP, DINO, segmenter backbone).

    The hub is probed at most once, and only when some model has no local file.
    """
    memo: list[bool] = []

    def offline() -> bool:
        if not memo:
            memo.append(is_offline())
        return memo[0]

    names = {"clip": clip_arch, "dino": dino, "backbone": backbone}
    return [model_status(kind, names[kind], offline) for kind in KINDS]


def official_sha256(kind: str, name: str) -> tuple[str, str, str] | None:
    """(format, SHA-256, description) of the official file of ``name``, where known."""
    if (kind, name) in KNOWN_SHA256:
        return KNOWN_SHA256[(kind, name)]
    if kind == "clip":
        try:
            url = str(openai_cfg(name, known=True).get("url", ""))
        except ConfigError:
            return None
        parts = url.split("/")
        if len(parts) >= 2 and _HEX64.match(parts[-2]):  # OpenAI's URLs: .../<sha256>/<name>.pt
            return "torchscript", parts[-2], f"OpenAI's {parts[-1]}"
    return None


def check_sha256(kind: str, name: str, sha256: str, fmt: str, *, path: str | Path, force: bool) -> str:
    """Compare a file's SHA-256 with the official value of its format, where known.

    Returns ``verified``, ``unknown`` (no official value for this model and format) or
    ``mismatch-forced``; raises ``WeightsError`` on a mismatch unless ``force``.
    """
    known = official_sha256(kind, name)
    if known is None or known[0] != fmt:
        return "unknown"
    if sha256 == known[1]:
        return "verified"
    if force:
        return "mismatch-forced"
    raise WeightsError(
        f"SHA-256 {sha256[:12]}... is not that of {known[2]} ({known[1][:12]}...)",
        path=path,
        hint="the download is corrupted or another file: download it again; "
        "for fine-tuned or converted weights add --force",
    )


def _check_loads(kind: str, name: str, path: Path) -> None:
    """Load ``path`` into the architecture on the CPU; WeightsError naming the file when it does not fit."""
    if kind == "clip":
        from ssr_cli.models.clip import load_clip

        load_clip(name, path, device="cpu")
    elif kind == "dino":
        from ssr_cli.models.dino import load_dino

        load_dino(name, str(path), device="cpu")
    else:
        from ssr_cli.models.backbone_weights import resolve_backbone_state

        resolve_backbone_state(name, path, pretrained=True)


def _destination(kind: str, candidates: list[Path], fmt: str) -> tuple[Path, list[Path]]:
    """(cache file to write, the other files of this model in our cache)."""
    ours = weights_cache_dir(kind)
    own = [p for p in candidates if p.parent == ours]
    want_st = fmt == "safetensors"
    index = next((i for i, p in enumerate(own) if (p.suffix == ".safetensors") == want_st), 0)
    return own[index], [p for p in own if p.is_file() and p != own[index]]


def add_weights(
    kind: str, path: str | Path, *, name: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Check a weights file and copy it into our cache where the loaders look for it.

    Checks, in order: the file exists; its SHA-256 matches the official value
    where one is known (``force`` accepts a mismatch, e.g. fine-tuned weights); it loads
    into model ``name`` (default: the pipeline's model of ``kind``) on the CPU. The
    copy is atomic; a cached file of this model that would be picked first or would be
    overwritten with other content (any other file of this model there) is only replaced with
    ``force``, which removes the others. Returns what was
    done (``destination``, ``sha256``, ``sha256_check``, ``status`` of the model after).
    """
    _check_kind(kind)
    name = DEFAULT_NAMES[kind] if name is None else name
    name, candidates, _dl, _where = _candidates(kind, name)
    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsError(f"{kind} weights file not found", path=src, hint="check the path")
    fmt = sniff_format(src)
    sha256 = file_sha256_cached(src)
    sha_check = check_sha256(kind, name, sha256, fmt, path=src, force=force)  # before loading anything
    _check_loads(kind, name, src)
    dest, others = _destination(kind, candidates, fmt)
    result: dict[str, Any] = {
        "kind": kind,
        "model": name,
        "source": str(src),
        "format": fmt,
        "sha256": sha256,
        "sha256_check": sha_check,
        "destination": str(dest),
        "copied": False,
        "removed": [],
    }
    same = dest.is_file() and file_sha256_cached(dest) == sha256
    replaced = list(others) + ([dest] if dest.is_file() and not same else [])
    if replaced and not force:
        raise WeightsError(
            f"{kind} weights for {name} are already cached with other content",
            path=replaced[0],
            hint="add --force to replace them",
        )
    if not same:
        from ssr_cli.artefacts import atomic_write

        if dest.resolve() != src.resolve():
            atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
            result["copied"] = True
    for old in others:  # one file per model: the resolver could pick an old one first
        old.unlink(missing_ok=True)
        result["removed"].append(str(old))
    result["status"] = model_status(kind, name, offline=lambda: True)
    return result
