"""No noise before the one-line errors (issue 10): library warnings are held back, and torch's
weights-only refusal is replaced by our own one-line explanation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from tinymodels import make_tiny_clip, save_tiny_clip

from ssr_cli.cli import app
from ssr_cli.errors import DataError

pytestmark = pytest.mark.timeout(180)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    pickled = folder / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload()}, pickled)
    archive = save_tiny_clip(make_tiny_clip(), folder / "archive.pt", "openai-torchscript")
    return {"pickled": pickled, "archive": archive}


@pytest.mark.parametrize(
    "kind, which",  # a clean TorchScript archive is valid CLIP weights
    [
        ("clip", "pickled"),
        ("dino", "pickled"),
        ("backbone", "pickled"),
        ("dino", "archive"),
        ("backbone", "archive"),
    ],
)
def test_refused_files_are_one_line_without_torch_advice(files, kind, which, tmp_path):
    env_cache = {"SSR_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "ssr_cli", "weights", "add", kind, str(files[which]), "--force"],
        capture_output=True,
        text=True,
        env={**ENV, **env_cache},
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssr: error:"), res.stderr
    assert "weights_only" not in res.stderr and "Warning" not in res.stderr
    assert str(files[which]) in lines[0]
    assert ("objects besides tensors" if which == "pickled" else "TorchScript archive") in lines[0]


@app.command("_test-warns-then-fails", hidden=True)
def _warns_then_fails(fail: bool = True) -> None:
    warnings.warn(
        "Palette images with Transparency expressed in bytes should be converted", UserWarning, stacklevel=1
    )
    warnings.warn("some library is deprecated", FutureWarning, stacklevel=1)
    logging.getLogger("timm.models").warning("Unexpected keys (head.fc) found while loading")
    if fail:
        raise DataError("bad input", path="x.png", hint="fix it")


def run(capsys, *args: str) -> tuple[int, str]:
    code, _, err = run_cli(list(args), capsys)
    return code, err


def test_library_warnings_are_held_back_before_an_error(capsys, monkeypatch):
    monkeypatch.delenv("SSR_DEBUG", raising=False)
    code, err = run(capsys, "_test-warns-then-fails")
    assert code == 1 and err == "ssr: error: x.png: bad input (fix it)\n"
    code, err = run(capsys, "_test-warns-then-fails", "--no-fail")  # success: shown after, one line each
    assert code == 0 and err.count("\n") == 3 and "UserWarning: Palette images" in err
    assert "timm.models: Unexpected keys" in err
