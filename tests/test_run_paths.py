"""Run folders work from any directory and after the project moved (issue 15 item 1).

Manifests record each input's absolute path plus the path relative to the run folder; the
report and refine open the recorded dataset and vocabulary from there, never falling back to
VOC's class names; a dataset that cannot be found is a warning, an error with --strict.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clirun import run_cli
from PIL import Image
from tinymodels import tiny_clip_for_cli

import ssr_cli.cli.report_cmd  # noqa: F401  (registers the command)
from ssr_cli.artefacts.paths import locate_inputs, recorded_path

pytestmark = pytest.mark.timeout(300)


def test_locate_inputs_records_absolute_and_run_relative(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "mydata").mkdir(parents=True)
    inputs = locate_inputs({"dataset": {"root": "proj/mydata", "fingerprint": "f"}, "n": 3}, "proj/runs/x")
    info = inputs["dataset"]
    assert info["root"] == str(tmp_path.resolve() / "proj" / "mydata") and info["fingerprint"] == "f"
    assert info["root_from_run"] == os.path.join("..", "..", "mydata") and inputs["n"] == 3
    run = tmp_path / "proj" / "runs" / "x"
    assert recorded_path(info, run) == tmp_path.resolve() / "proj" / "mydata"
    shutil.move(tmp_path / "proj", tmp_path / "moved")  # the project moved as a whole
    assert recorded_path(info, tmp_path / "moved" / "runs" / "x") == tmp_path.resolve() / "moved" / "mydata"
    assert recorded_path(info, run) is None
    # an older manifest: the root as typed, found from the run folder's parent
    assert recorded_path({"root": "mydata"}, tmp_path / "moved" / "x") == (tmp_path / "moved" / "mydata")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tinyclip")
    return tiny_clip_for_cli(folder)


def _own_photos(root: Path) -> list[str]:
    """Five photos of 'cat' and 'dog' in the custom layout; masks for three of them."""
    rng = np.random.default_rng(0)
    ids = [f"photo{i}" for i in range(5)]
    (root / "images").mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({"name": "pets", "classes": ["cat", "dog"]}))
    lines = []
    for i, image_id in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            root / "images" / f"{image_id}.jpg"
        )
        cls = 1 + i % 2
        lines.append(f"{image_id} {['cat', 'dog'][cls - 1]}")
        if i < 3:
            mask = np.zeros((48, 64), np.uint8)
            mask[10:40, 12:50] = cls
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask, mode="P").save(root / "masks" / f"{image_id}.png")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return ids


def test_runs_work_from_anywhere_and_after_a_move(tmp_path: Path, tiny, monkeypatch, capsys) -> None:
    proj = tmp_path / "proj"
    ids = _own_photos(proj / "mydata")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(proj)  # paths typed relative, as a new user does
    clip = ["--clip-arch", tiny["arch"], "--clip-weights", tiny["weights"], "--device", "cpu"]
    code, _, err = run_cli(["make-seeds", "--data", "mydata", "--out", "runs/seeds", *clip, "-q"], capsys)
    assert code == 0, err
    seeds = json.loads((proj / "runs" / "seeds" / "manifest.json").read_text())["inputs"]["dataset"]
    assert seeds["root"] == str((proj / "mydata").resolve())
    assert seeds["root_from_run"] == os.path.join("..", "..", "mydata")
    assert seeds["vocab_spec"]["classes"] == ["cat", "dog"]

    monkeypatch.chdir(elsewhere)  # refine without --data, from another directory
    fast = ["--affinity", "clip", "--mask", "none", "--no-crf", "--workers", "0", "--device", "cpu"]
    fast += ["--clip-arch", tiny["arch"], "--clip-weights", tiny["weights"], "-q"]
    code, _, err = run_cli(
        ["refine", "--seeds", proj / "runs/seeds", "--out", proj / "runs/refine", *fast], capsys
    )
    assert code == 0, err

    shutil.move(proj, tmp_path / "moved")  # the whole project moves
    moved = tmp_path / "moved"
    runs = [moved / "runs" / "seeds", moved / "runs" / "refine"]
    code, _, err = run_cli(["report", *runs, "--out", tmp_path / "rep", "--strict"], capsys)
    assert code == 0, err
    assert "warning" not in err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["class_names"] == ["background", "cat", "dog"]  # never VOC's names
    assert report["photos_from"] == "run manifests" and report["images_scored"] == 3  # 3 of 5 masks
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "photo (not found)" not in page and "aeroplane" not in page
    assert sorted(r["id"] for r in report["rows"]) == ids

    # eval of the moved run from elsewhere, with partial masks
    scoring = ["eval", runs[1], "--data", moved / "mydata", "--json", "-o", tmp_path / "m.json"]
    code, stdout, err = run_cli(scoring, capsys)
    assert code == 0, err
    assert json.loads(stdout)["summary"]["images"] == 3 and json.loads(stdout)["summary"]["no_gt"] == 2

    # eval without --data: the ground truth of the dataset the run recorded, from anywhere
    code, stdout, err = run_cli(["eval", runs[1], "--json", "-o", tmp_path / "m2.json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["summary"]["images"] == 3 and str(moved / "mydata") in " ".join(err.split())
    assert json.loads(stdout)["classes"][2]["name"] == "dog"

    # the dataset is gone: a warning naming the places looked in; --strict makes it an error
    shutil.rmtree(moved / "mydata")
    code, _, err = run_cli(["report", *runs, "--out", tmp_path / "rep2"], capsys)
    assert code == 0, err
    text = " ".join(err.split())
    assert "warning:" in text and "the dataset this run was made on is not found" in text
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["class_names"][1:] == ["cat", "dog"]
    code, stdout, err = run_cli(["report", *runs, "--out", tmp_path / "rep3", "--strict"], capsys)
    assert code == 1 and stdout == ""
    lines = [line for line in err.splitlines() if line.startswith("ssr: error:")]
    assert len(lines) == 1 and "manifest.json" in lines[0] and "--data" in lines[0]
