"""The scripts that made the committed tiny models still run (a few steps each, in a subprocess)
and write weights that the real loading paths accept. They are not run to convergence here:
the committed weights are what the quality tests use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: object) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_tiny_dino_runs_and_saves_loadable_weights(tmp_path: Path) -> None:
    import torch

    from ssr_cli.refine.sources import load_dino_model

    out = _run("train_tiny_dino.py", "--out", tmp_path, "--steps", 2, "--batch-size", 4, "--local-crops", 2,
               "--out-dim", 64, "--log-every", 1, "--eval-every", 2, "--threads", 1)  # fmt: skip
    assert "step     2  attention on own object" in out and "correspondence" in out
    model, _ = load_dino_model(
        str(tmp_path / "ssr-tiny-dino.json"), str(tmp_path / "tiny_dino.pth"), torch.device("cpu")
    )
    assert model is not None


def test_train_tiny_clip_runs_with_both_losses_and_evaluates(tmp_path: Path) -> None:
    out = _run("train_tiny_clip.py", "--out", tmp_path, "--steps", 2, "--batch-size", 4, "--pairs", 2,
               "--log-every", 1, "--eval-every", 2, "--eval-images", 4, "--threads", 1)  # fmt: skip
    assert "correspondence" in out and "held-out seeds mIoU" in out  # the eval loads it via make-seeds
    assert (tmp_path / "tiny_clip.pt").stat().st_size > 1_000_000
