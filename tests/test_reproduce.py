"""`scripts/reproduce_voc.sh` end to end on examples/voc with tiny random models (real CLI stages in
subprocesses), a crash and the resuming rerun; `scripts/ablation_table.py` on hand-made reports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinymodels import TINY_CLIP_CONFIG, make_tiny_clip, save_tiny_clip

pytestmark = pytest.mark.timeout(420)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_voc.sh"
TABLE = REPO / "scripts" / "ablation_table.py"
TINY_DINO = {"embed_dim": 32, "depth": 2, "num_heads": 2}
LABELS = [
    "CLIP GradCAM seeds",
    "+ CMPA",
    "+ CLIP attention",
    "+ DINO attention",
    "+ full SGC",
    "+ CRF (SSR pseudo-labels)",
    "CLIP-ES: CAM + CAA",
    "CLIP-ES: CAM + CAA + CRF",
    "Segmenter (no CRF)",
    "Segmenter + CRF",
]
PAPER = {  # label: (P, R, mIoU) as printed, from METHOD.md
    "CLIP GradCAM seeds": ("-", "-", "58.6"),
    "+ CMPA": ("72.8", "84.6", "63.3"),
    "+ CLIP attention": ("85.2", "88.9", "74.6"),
    "+ DINO attention": ("84.3", "86.2", "76.3"),
    "+ full SGC": ("87.9", "89.1", "78.7"),
    "+ CRF (SSR pseudo-labels)": ("-", "-", "-"),
    "CLIP-ES: CAM + CAA": ("-", "-", "70.8"),
    "CLIP-ES: CAM + CAA + CRF": ("-", "-", "75.0"),
    "Segmenter (no CRF)": ("-", "-", "78.2"),
    "Segmenter + CRF": ("-", "-", "79.5"),
}
RUN_FOLDERS = (
    "seeds cmpa seeds-cmpa refine-clip refine-dino refine-sgc refine-crf refine-crf-argmax clip-es-caa "
    "clip-es-crf seeds-aug refine-aug seg pred pred-crf"
).split()


def _table_module():
    spec = importlib.util.spec_from_file_location("ablation_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from ssr_cli.models.dino import build_dino

    folder = tmp_path_factory.mktemp("models")
    arch = folder / "ssr-tiny-reproduce.json"
    arch.write_text(json.dumps(TINY_CLIP_CONFIG))
    clip = save_tiny_clip(make_tiny_clip(seed=7), folder / "clip.safetensors", "safetensors")
    dino_cfg = folder / "tiny-dino.json"
    dino_cfg.write_text(json.dumps({"model": "dino_vits16", "overrides": TINY_DINO}))
    dino = folder / "tiny-dino.pth"
    torch.save(build_dino("dino_vits16", seed=2, arch_overrides=TINY_DINO).state_dict(), dino)
    return {"arch": str(arch), "clip": str(clip), "dino_cfg": str(dino_cfg), "dino": str(dino)}


def _run(models: dict[str, str], runs: Path, examples_voc: Path, **env: str) -> subprocess.CompletedProcess:
    """The script on examples/voc: ablation rows on `val` (the split with a mask), CMPA and the
    segmenter on `train` (4 photos, labels from the XML), a few steps of each, small inputs."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SSR": f"{sys.executable} -m ssr_cli",
        "PYTHON": sys.executable,
        "TRAIN": "val",
        "TRAIN_AUG": "train",
        "VAL": "val",
        "CMPA_ARGS": "--size 64 --batch-size 2 --dim 16 --init-images 4",
        "SEG_ARGS": "--aspp-channels 16 --crop-size 48 --batch-size 2 --optimizer adamw",
        "PREDICT_ARGS": "--scales 1.0",
        **env,
    }
    args = ["--data", str(examples_voc), "--runs", str(runs), "--clip-arch", models["arch"],
            "--clip-weights", models["clip"], "--dino-model", models["dino_cfg"], "--dino-weights",
            models["dino"], "--backbone", "resnet10t", "--no-pretrained", "--cmpa-iters", "2",
            "--seg-iters", "2", "--workers", "0", "--device", "cpu"]  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env)


def _outputs(runs: Path) -> dict[str, int]:
    """mtime of every file the stages and the scoring wrote (minus manifests, rewritten on resume)."""
    files = {}
    for path in runs.rglob("*"):
        if path.is_file() and path.name != "manifest.json" and path.suffix != ".lock":
            files[str(path.relative_to(runs))] = path.stat().st_mtime_ns
    return files


def _parse(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:8] == ["Row", "Split", "P", "R", "mIoU", "Paper P", "Paper R", "Paper mIoU"]
    assert set(lines[1]) <= set("|-: ")
    return {
        cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])
    }


def test_reproduce_crash_then_resume_prints_the_table(tmp_path, models, examples_voc):
    runs = tmp_path / "runs"
    # 1. a run that "crashes" at the first predict (a bad option): every earlier stage is done
    crashed = _run(models, runs, examples_voc, PREDICT_ARGS="--scales 1.0 --no-such-option")
    assert crashed.returncode != 0
    assert "no-such-option" in crashed.stderr and "| Row |" not in crashed.stdout
    assert (runs / "seg" / "model.safetensors").is_file() and not (runs / "ablation.md").exists()
    for row in ("cam", "cmpa", "clip_attn", "dino_attn", "sgc", "crf", "clip_es_caa", "clip_es_crf"):
        report = json.loads((runs / "scores" / f"{row}.json").read_text())
        assert 0.0 <= report["summary"]["miou"] <= 1.0
    assert not (runs / "scores" / "seg_val.json").exists()
    before = _outputs(runs)

    # 2. the same command again: finished stages skip, nothing they wrote changes, the rest runs
    resumed = _run(models, runs, examples_voc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    err = resumed.stderr
    assert len(re.findall(r"make-seeds: \d+ images in shard \S+, (\d+) already done", err)) == 3
    assert re.findall(r"refine: \d+ images in shard \S+, 0 already done", err) == []
    assert len(re.findall(r"refine: (\d+) images in shard \S+, \1 already done", err)) == 8
    assert "train-cmpa:" in err and "already holds these trained heads" in err
    assert "fit-seg:" in err and "already holds this trained model" in err
    assert err.count("already done (") == 8  # the scores of the 8 finished rows are reused
    after = _outputs(runs)
    assert {k: after[k] for k in before} == before
    assert {"scores/seg_val.json", "scores/seg_val_crf.json"} <= set(after) - set(before)
    assert any(k.startswith("pred-crf/labels/") for k in after)
    assert all((runs / name / "manifest.json").is_file() for name in RUN_FOLDERS)

    # 3. the table: every row, our P/R/mIoU and the paper's
    table = resumed.stdout
    assert (runs / "ablation.md").read_text() == table
    rows = _parse(table)
    assert list(rows) == LABELS
    for label, cells in rows.items():
        assert cells[0] == ("val"), label
        assert tuple(cells[4:7]) == PAPER[label], label
        for value in cells[1:4]:
            assert value == "n/a" or 0.0 <= float(value) <= 100.0, (label, value)
    for key, label in (("cmpa", "+ CMPA"), ("sgc", "+ full SGC"), ("seg_val", "Segmenter (no CRF)")):
        summary = json.loads((runs / "scores" / f"{key}.json").read_text())["summary"]
        assert rows[label][3] == f"{100 * summary['miou']:.1f}"


def test_table_from_reports_and_bad_report(tmp_path, capsys):
    table_mod = _table_module()
    scores = tmp_path / "scores"
    scores.mkdir()
    report = {"summary": {"mprecision": 0.8791, "mrecall": 0.5, "miou": 0.7871, "images": 1464, "missing": 0},
              "bg_rule": {"alpha": 2.0}}  # fmt: skip
    (scores / "sgc.json").write_text(json.dumps(report))
    undefined = {"summary": {"mprecision": None, "mrecall": 0.0, "miou": 0.0, "images": 1}}
    (scores / "seg_val.json").write_text(json.dumps(undefined))
    assert table_mod.main([str(scores), "--train-split", "train", "--out", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == printed
    rows = _parse(printed)
    assert list(rows) == LABELS
    assert rows["+ full SGC"][:7] == ["train", "87.9", "50.0", "78.7", "87.9", "89.1", "78.7"]
    assert rows["+ full SGC"][7] == "bg alpha 2, 1464 images"
    assert rows["Segmenter (no CRF)"][:4] == ["val", "n/a", "0.0", "0.0"]
    assert rows["+ CMPA"][:4] == ["train", "not run", "not run", "not run"]

    (scores / "crf.json").write_text(json.dumps({"summary": {"miou": 0.5}}))
    with pytest.raises(SystemExit, match=r"crf\.json: not an `ssr eval` report"):
        table_mod.load_scores(scores)
    with pytest.raises(SystemExit, match="no such folder"):
        table_mod.load_scores(tmp_path / "missing")
