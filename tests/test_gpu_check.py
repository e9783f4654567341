"""``scripts/gpu_check.sh --device cpu``: the GPU check runs end to end on the CPU (issue 16).

The same script, with tiny sizes and the tiny architectures of examples/models in place of
ViT-B/16: every step must run and succeed, and every figure must be present and finite.
Real subprocesses, real ssr commands, real torchrun.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CPU_STEPS = [
    "environment", "data", "seeds_fp32", "seeds_bf16", "cam_compare", "seeds_throughput", "refine_voc",
    "tiny_train_cmpa", "tiny_make_seeds", "tiny_refine", "tiny_fit_seg_bf16", "tiny_predict", "tiny_eval",
    "torchrun_train_cmpa", "torchrun_fit_seg", "torchrun_ddp",
]  # fmt: skip
# figures that are None on the CPU (GPU-only) or when nothing went wrong
NONE_OK = {
    "bf16_supported",
    "peak_gpu_mb",
    "best_peak_gpu_mb",
    "grad_scaler_scale",
    "out_of_memory_at",
    "first_malformed",
}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _numbers(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a figures tree as (path, value)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _numbers(v, f"{path}[{i}]")]
    return [(path, value)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_mode_runs_every_step(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--device", "cpu", "--models", "tiny", "--images", "12",
            "--voc-images", "4", "--compare-images", "2", "--batch-sizes", "1,2", "--seg-iters", "2",
            "--cmpa-iters", "2", "--time-limit", "360"]  # fmt: skip
    proc = _run(args, timeout=390)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["all_ok"] is True and doc["device"] == "cpu"
    assert [s["name"] for s in doc["steps"]] == CPU_STEPS
    for step in doc["steps"]:
        assert step["status"] == "ok", step
        assert math.isfinite(step["seconds"]) and step["seconds"] >= 0
        for path, value in _numbers(step["figures"], step["name"]):
            if value is None:
                assert path.rsplit(".", 1)[-1] in NONE_OK, f"{path} is missing"
            elif isinstance(value, float):
                assert math.isfinite(value), f"{path} = {value}"
    fig = {s["name"]: s["figures"] for s in doc["steps"]}

    env = doc["environment"]
    assert env["torch"] and env["missing_packages"] == [] and "open_clip_torch" in env["packages"]
    assert fig["data"] == {"world_images": 12, "voc_images": 4, "voc_size": "500x375", "compare_images": 2}
    for p in ("fp32", "bf16"):
        assert fig[f"seeds_{p}"]["items"] == 2 and fig[f"seeds_{p}"]["images_per_s"] > 0
    bf16 = fig["cam_compare"]["bf16_vs_fp32"]
    assert (
        bf16["images"] == 2 and bf16["maps"] >= 2 and bf16["nonfinite_maps"] == bf16["malformed_files"] == 0
    )
    assert 0.99 < bf16["pearson_mean"] <= 1.0 and 0.9 < bf16["label_agreement_mean"] <= 1.0
    runs = fig["seeds_throughput"]["runs"]
    assert [r["batch_size"] for r in runs] == [1, 2] and all(r["images"] == 4 for r in runs)
    assert all(r["images_per_s"] > 0 for r in runs) and fig["seeds_throughput"]["best_vs_batch1"] > 0
    assert fig["refine_voc"]["items"] == 2
    assert fig["tiny_fit_seg_bf16"]["iterations"] == 2 and 0 <= fig["tiny_fit_seg_bf16"]["val_miou"] <= 1
    assert all(0 <= fig["tiny_eval"][k] <= 1 for k in ("seeds_miou", "refine_miou", "predict_miou"))
    assert fig["torchrun_ddp"]["backend"] == "gloo" and fig["torchrun_ddp"]["all_gather_ok"] is True
    goals = doc["summary"]["goals"]
    assert goals["bf16_cam_correlation"]["measured"] == bf16["pearson_mean"]
    assert all(g["met"] is None for g in goals.values())  # GPU goals are not judged on the CPU

    md = (out / "gpu_check.md").read_text()
    assert "| step | status |" in md and "| torchrun_ddp | ok |" in md and "| bf16 |" in md
    assert md in proc.stdout  # the table is printed too
    assert not work.exists()  # the work folder is removed without --keep


@pytest.mark.timeout(120)
def test_stops_cleanly_at_its_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = _run(["--out", str(out), "--device", "cpu", "--models", "tiny", "--time-limit", "12"], timeout=100)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert elapsed < 12 + 20  # the limit, plus interpreter start-up and removing the work folder
    doc = json.loads((out / "gpu_check.json").read_text())
    statuses = [s["status"] for s in doc["steps"]]
    assert len(statuses) == len(CPU_STEPS) and set(statuses) <= {"ok", "failed", "skipped"}
    assert "skipped" in statuses and doc["all_ok"] is False
    assert any("time limit" in s.get("error", "") for s in doc["steps"])


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    proc = _run(["--out", str(tmp_path), "--device", "tpu"], timeout=60)
    assert proc.returncode == 2 and "--device 'tpu'" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run(["--out", str(blocker / "out"), "--device", "cpu"], timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("gpu_check: error: cannot create")
