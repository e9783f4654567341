"""OS failures a user can fix are one-line errors naming the path (issue 10): a read-only file
system, a full disk (simulated with the process's real file size limit, RLIMIT_FSIZE, which
makes the kernel refuse writes with EFBIG like a full disk refuses them with ENOSPC), torch's
checkpoint writer. What was written before stays valid, and a rerun resumes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tinymodels import tiny_clip_for_cli

from ssr_cli.seg.synthetic import make_shapes_dataset

pytestmark = pytest.mark.timeout(300)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def ssr(*args: object, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssr_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        preexec_fn=None if limit is None else _limit_file_size(limit),
    )


def one_error_line(err: str) -> str:
    assert "internal error" not in err and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ssr: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    tiny = tiny_clip_for_cli(tmp_path_factory.mktemp("tinyclip"), seed=3)
    return ["--clip-arch", tiny["arch"], "--clip-weights", tiny["weights"]]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs /sys (Linux)")
def test_unwritable_output_folder(tiny, examples_voc):
    target = Path("/sys/ssr-cannot-write-here")
    res = ssr("make-seeds", "--data", examples_voc, "--split", "train", "--out", target, *tiny)
    line = one_error_line(res.stderr)
    assert res.returncode == 1 and str(target) in line and "folder you may write to" in line


def test_full_disk_during_make_seeds_then_resume(tmp_path, tiny, examples_voc):
    out = tmp_path / "seeds"
    args = ["make-seeds", "--data", examples_voc, "--split", "train", "--out", out, *tiny, "--workers", "1"]
    res = ssr(*args, limit=300_000)  # the manifest fits; a seed with attention (1.2 MB) does not
    line = one_error_line(res.stderr)
    assert res.returncode == 1 and "cams/" in line and ".npz" in line and "rerun the same command" in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    res = ssr(*args)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["completed"] is True
    for f in (out / "cams").glob("*.npz"):
        with np.load(f) as seed:
            assert seed["attn"].dtype == np.float16


def test_full_disk_while_fit_seg_saves_a_checkpoint(tmp_path):
    shapes = make_shapes_dataset(tmp_path / "shapes", {"train": 4}, size=(56, 72), seed=1)
    out = tmp_path / "seg"
    args = ["fit-seg", "--data", shapes, "--split", "train", "--pseudo", shapes / "masks", "--out", out]
    args += ["--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "16", "--crop-size", "48"]
    args += ["--batch-size", "2", "--device", "cpu", "--iters", "2", "--save-every", "1", "--workers", "0"]
    res = ssr(*args, limit=200_000)  # the resnet10t checkpoint is several MB
    line = one_error_line(res.stderr)
    assert res.returncode == 1 and "checkpoints" in line, line
    assert "inline_container" not in res.stderr and "PytorchStreamWriter" not in res.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
