"""Backbone weights for the segmenter: where they come from and how they are checked.

Order (METHOD.md section 7, via ``ssr_cli.models.weights.resolve_weights``): an
explicit file (``--backbone-weights PATH``: a timm state dict as ``.pth``/``.pt``/
``.bin``, possibly wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``, or
``.safetensors``); ``$SSR_BACKBONE_WEIGHTS``; our cache and the local Hugging Face
hub cache of the backbone's default timm weights; a download when online.
``--no-pretrained`` skips all of them (random weights). A file that does not fit the architecture is
refused with the keys that are missing, never loaded half-way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ssr_cli.errors import WeightsError
from ssr_cli.models.weights import (
    WeightsSource,
    hf_hub_cached_files,
    load_failure,
    resolve_weights,
    weights_cache_dir,
)


def read_backbone_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a timm-format state dict from ``path`` (safetensors or torch pickle, CPU tensors)."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            "backbone weights file not found", path=path, hint="check the --backbone-weights path"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user problem
        what, hint = load_failure(exc, "backbone weights")
        raise WeightsError(what, path=path, hint=hint) from None
    if not isinstance(state, dict) or not state:
        raise WeightsError("the file holds no state dict", path=path, hint="pass timm backbone weights")
    return dict(state)


def check_state_dict(name: str, state: dict[str, Any], source: str) -> None:
    """Refuse ``state`` unless its tensors are exactly those of timm model ``name`` (classifier aside).

    The expected keys and shapes come from the model built on the ``meta`` device
    (no memory, no weights), so the check is cheap even for large backbones.
    """
    import timm
    import torch

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    pretrained_cfg: dict[str, Any] = dict(getattr(reference, "pretrained_cfg", None) or {})
    classifier = pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def is_classifier(key: str) -> bool:  # or a BatchNorm counter, absent from many checkpoints
        return key.endswith("num_batches_tracked") or any(
            key == c or key.startswith(c + ".") for c in classifier
        )

    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not is_classifier(k)}
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(
        k
        for k, shape in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != shape
    )
    extra = sorted(k for k in state if k not in expected and not is_classifier(k))
    if missing or wrong or extra:
        problem = []
        if missing:
            examples = ", ".join(missing[:3])
            problem.append(f"{len(missing)} of {len(expected)} tensors missing (e.g. {examples})")
        if wrong:
            problem.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        if extra:
            problem.append(f"{len(extra)} tensors the model does not have (e.g. {extra[0]})")
        raise WeightsError(
            f"these weights do not fit backbone {name!r}: {'; '.join(problem)}",
            path=source,
            hint="pass timm weights of the same architecture, or --no-pretrained",
        )


def hub_files(name: str) -> tuple[str | None, list[str]]:
    """(hub repo id, candidate file names) of ``name``'s default timm weights."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - a name without pretrained configs
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if cfg is None or not hub_id:
        return None, []
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return hub_id, names


def resolve_backbone_state(
    name: str, weights: str | Path | None = None, pretrained: bool = True
) -> tuple[dict[str, Any] | None, WeightsSource]:
    """Backbone weights for timm model ``name`` and where they came from.

    Order: ``weights`` (a file or folder; ``"random"`` = none), ``$SSR_BACKBONE_WEIGHTS``,
    our cache (``<ssr cache>/weights/backbone/<name>.safetensors|.pth``), the Hugging
    Face hub cache of timm's default tag, a download when online (see
    ``ssr_cli.models.weights``). ``pretrained=False`` (``--no-pretrained``) gives
    random weights. Returns ``(state_dict or None, source)``; the state dict has
    been checked against the architecture. Raises :class:`WeightsError`.
    """
    if not pretrained and weights is None:
        return None, WeightsSource(kind="backbone", name=name, path=None, origin="random")
    hub_id, hub_names = hub_files(name)
    ours = weights_cache_dir("backbone")
    candidates = [ours / f"{name}.safetensors", ours / f"{name}.pth"]
    if hub_id:
        candidates += hf_hub_cached_files(hub_id, hub_names)

    download = None
    if hub_id:

        def download() -> Path:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub_id, hub_names[0]))

    source = resolve_weights(
        "backbone",
        name,
        None if weights is None else str(weights),
        env_var="SSR_BACKBONE_WEIGHTS",
        cache_candidates=candidates,
        download=download,
    )
    if source.path is None:
        return None, source
    state = read_backbone_state_dict(source.path)
    check_state_dict(name, state, str(source.path))
    return state, source.with_sha256()
