"""Training checkpoints and final model files of the segmenter.

- ``checkpoints/last.pt`` (and ``best.pt``): ``ssr_cli.train.state.save_checkpoint`` of a dict with the
  iteration, model, optimizer, scheduler and AMP-scaler state dicts, the RNG
  states (python, numpy, torch, CUDA), the model and training configs and the
  run fingerprint. Only tensors and plain Python values, so they load with
  ``torch.load(weights_only=True)``. Written atomically: a file that exists is whole.
- ``model.safetensors``: the final weights; the metadata key ``ssr_segmenter_config``
  holds the :class:`SegmenterConfig` JSON needed to rebuild the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ssr_cli.artefacts import atomic_write, read_manifest
from ssr_cli.errors import WeightsError
from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
from ssr_cli.train.state import load_training_state

#: what a fit-seg checkpoint must hold, and what to do when it does not
CHECKPOINT_KEYS = ("model", "model_config")
CHECKPOINT_HINT = (
    "pass a checkpoint written by ssr fit-seg (RUN/checkpoints/last.pt), or start again with --overwrite"
)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A fit-seg checkpoint (``last.pt``, ``best.pt``) on the CPU."""
    return load_training_state(path, stage="fit-seg", keys=CHECKPOINT_KEYS, hint=CHECKPOINT_HINT)


CONFIG_KEY = "ssr_segmenter_config"
MODEL_FILE = "model.safetensors"


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], cfg: SegmenterConfig) -> Path:
    """Write the final weights as safetensors with the model config in the metadata."""
    from safetensors.torch import save_file

    from ssr_cli import __version__

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = {CONFIG_KEY: cfg.to_json(), "ssr_tool_version": __version__, "format": "pt"}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates files readable by the owner only

    return atomic_write(path, write)


def _resolve_model_path(path: Path) -> Path:
    if not path.is_dir():
        if not path.is_file():
            raise WeightsError("model not found", path=path, hint="pass a fit-seg run folder or a model file")
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    if (path / "manifest.json").is_file():
        stage = read_manifest(path).get("stage")
        if stage == "fit-seg":
            raise WeightsError(
                f"this fit-seg run has not finished: no {MODEL_FILE} yet",
                path=path,
                hint="resume it with --resume, or pass RUN/checkpoints/last.pt or best.pt",
            )
        raise WeightsError(f"this folder holds a '{stage}' run, not a fit-seg run", path=path)
    raise WeightsError(f"no {MODEL_FILE} here", path=path, hint="pass a fit-seg run folder or a model file")


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], SegmenterConfig, Path]:
    """(state dict, model config, file) of a fit-seg run folder, ``.safetensors`` or checkpoint ``.pt``."""
    file = _resolve_model_path(Path(path))
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"cannot read model file ({exc})", path=file) from None
        if CONFIG_KEY not in meta:
            raise WeightsError(
                "this safetensors file has no ssr segmenter config in its metadata",
                path=file,
                hint="pass the model.safetensors written by ssr fit-seg",
            )
        cfg = SegmenterConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        return state, cfg, file
    ckpt = load_checkpoint_file(file)
    return ckpt["model"], SegmenterConfig.from_dict(ckpt["model_config"]), file


def load_segmenter(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Any, Path]:
    """Rebuild a trained segmenter (eval mode, on ``device``) from a run folder or model file:
    (model, its config: ``SegmenterConfig``, or ``onestage.decoder.DecoderConfig`` for an
    ``ssr train`` run, whose model is frozen CLIP + the decoder; both have ``num_classes``,
    ``mean``, ``std`` and ``to_dict``, all that predict needs, file)."""
    from ssr_cli.onestage.decoder import is_ssr_model, load_ssr_segmenter

    if is_ssr_model(Path(path)):
        return load_ssr_segmenter(path, device)
    state, cfg, file = read_model_file(path)
    model = build_segmenter(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())[:200]
        raise WeightsError(f"weights do not fit the recorded model config ({text})", path=file) from None
    return model.to(device).eval(), cfg, file
