"""Training checkpoints: atomic ``torch.save`` of plain values and tensors (they load with
``torch.load(weights_only=True)``, so no code runs) and every global RNG state, so that
``--resume`` continues exactly. Shared by train-cmpa, fit-seg and train.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.artefacts import atomic_write
from ssr_cli.errors import WeightsError


def rng_states() -> dict[str, Any]:
    """Every global RNG state as weights_only-loadable values."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": np_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` recorded."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(states["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def restore_training(state: dict[str, Any], *, optimizer: Any, scaler: Any, scheduler: Any = None) -> int:
    """Continue from checkpoint ``state``: load the optimizer, the scheduler (if any) and the AMP
    scaler, restore every RNG state; returns the iteration to resume at."""
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return int(state["iteration"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path``."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, *, stage: str, keys: tuple[str, ...], hint: str) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``: no code
    runs), on the CPU; it must be a dict holding ``keys``, else a one-line error naming ``path``
    with ``hint``, as when it cannot be read."""
    from ssr_cli.models.weights import load_failure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        what, _hint = load_failure(exc, "checkpoint")
        raise WeightsError(what, path=path, hint=hint) from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise WeightsError(f"not an ssr {stage} checkpoint", path=path, hint=hint)
    return state


#: the salt of each stage's step seeds (a constant per stage keeps its seeds as they were)
STEP_SALT = {"fit-seg": 0x70C4, "train-cmpa": 0xC3BA, "train": 0x55A1}


def step_seed(seed: int, iteration: int, rank: int, stage: str = "fit-seg") -> int:
    """torch's seed for one training step: a pure function of (seed, iteration, rank), so that a
    resumed run draws what an uninterrupted one drew."""
    return int(np.random.default_rng([seed, STEP_SALT[stage], iteration, rank]).integers(0, 2**62))
