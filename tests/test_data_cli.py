"""``ssr data check`` end to end: real photos, real VOC masks, real subprocess for one run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ssr_cli.cli import main
from ssr_cli.data import open_dataset

pytestmark = pytest.mark.timeout(120)

MASKS = Path(__file__).resolve().parent / "data" / "voc2012_val_masks"


def make_voc(root: Path, n: int = 4) -> tuple[Path, list[Path]]:
    """A VOC2012 folder: n real masks, each paired with a real photo resized to its size."""
    masks = sorted(MASKS.glob("*.png"))[:n]
    assert len(masks) == n, f"real VOC masks expected in {MASKS}"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    for index, mask in enumerate(masks):
        with Image.open(mask) as m:
            size = m.size
        Image.fromarray(photos[index % 4]).resize(size).save(root / "JPEGImages" / f"{mask.stem}.jpg")
        shutil.copy(mask, root / "SegmentationClass" / mask.name)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{m.stem}\n" for m in masks))
    return root, masks


def make_custom(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    Image.fromarray(skimage.data.chelsea()).save(root / "images" / "cat1.jpg")
    Image.fromarray(skimage.data.astronaut()).save(root / "images" / "person1.png")
    Image.fromarray(skimage.data.coffee()).save(root / "images" / "cup1.jpg")
    (root / "vocab.json").write_text(json.dumps({"name": "home", "classes": ["cat", "person", "coffee cup"]}))
    (root / "labels.txt").write_text("# home photos\ncat1 cat\nperson1 person\ncup1, coffee cup\n")
    return root


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_check_voc_via_subprocess(tmp_path):
    root, masks = make_voc(tmp_path / "VOC2012")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ssr_cli", "data", "check", "--data", str(root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["layout"] == "voc" and summary["split"] == "train" and summary["count"] == len(masks)
    assert summary["label_source"] == "mask" and summary["has_gt"] and summary["gt_count"] == len(masks)
    expected = np.zeros(21, int)
    for mask in masks:
        values = np.unique(np.asarray(Image.open(mask)))
        expected[values[(values > 0) & (values < 255)]] += 1
    assert [row["images"] for row in summary["classes"]] == expected[1:].tolist()
    assert "images per class" not in proc.stderr  # --json: only the JSON, on stdout


def test_check_custom_and_write_labels(tmp_path, capsys):
    root = make_custom(tmp_path / "home")
    out = tmp_path / "written" / "labels.txt"
    code, stdout, stderr = run_main(
        ["data", "check", "--data", str(root), "--write-labels", str(out)], capsys
    )
    assert code == 0, stderr
    assert "custom" in stdout and "coffee cup" in stdout  # the summary is the result: stdout
    assert "images per class" in stdout and "images per class" not in stderr
    for quiet in (["data", "check", "--quiet"], ["--quiet", "data", "check"]):  # both spellings
        code, stdout, stderr = run_main([*quiet, "--data", str(root)], capsys)
        assert code == 0, stderr
        assert "coffee cup" in stdout and stderr == ""
    text = out.read_text()
    assert "cup1 coffee_cup\n" in text
    again = open_dataset(root, labels=out)
    first = open_dataset(root)
    assert [i.labels for i in again.items] == [i.labels for i in first.items] == [(1,), (2,), (3,)]
    assert again.fingerprint() == first.fingerprint()


def test_bad_label_file_exits_1_with_one_line(tmp_path, capsys):
    root = make_custom(tmp_path / "home")
    (root / "labels.txt").write_text("cat1 cat\nperson1 person\ncup1 coffee cup\n")
    code, stdout, stderr = run_main(["data", "check", "--data", str(root), "--json"], capsys)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssr: error: ")
    assert f"{root / 'labels.txt'}:3:" in lines[0] and "'coffee'" in lines[0]


def test_decode_finds_truncated_image(tmp_path, capsys):
    root = make_custom(tmp_path / "home")
    image = root / "images" / "cat1.jpg"
    image.write_bytes(image.read_bytes()[:5000])
    code, _, stderr = run_main(["data", "check", "--data", str(root)], capsys)
    assert code == 0, stderr  # images are not decoded by default
    code, _, stderr = run_main(["data", "check", "--data", str(root), "--decode"], capsys)
    assert code == 1
    assert "1 of 3 images or masks failed to decode" in stderr and str(image) in stderr


def test_missing_split_lists_the_existing_ones(tmp_path, capsys):
    root, _ = make_voc(tmp_path / "VOC2012", n=2)
    code, _, stderr = run_main(["data", "check", "--data", str(root), "--split", "val"], capsys)
    assert code == 1
    assert "split 'val' not found" in stderr and "available splits: train" in stderr


def test_decode_reports_mask_values_that_eval_rejects(tmp_path, capsys):
    """Issue 10: values outside the vocabulary (and not 255) make `ssr eval` fail; the check says so."""
    from ssr_cli.data.images import write_label_png

    root = make_custom(tmp_path / "home")
    (root / "masks").mkdir()
    preds = tmp_path / "preds"
    for name, photo in (("cat1", skimage.data.chelsea()), ("person1", skimage.data.astronaut())):
        mask = np.zeros(photo.shape[:2], np.uint8)
        mask[10:40, 10:40] = 1
        mask[50:60, 50:60] = 255
        write_label_png(root / "masks" / f"{name}.png", mask)
        write_label_png(preds / f"{name}.png", np.zeros_like(mask))
    write_label_png(root / "masks" / "cup1.png", np.zeros(skimage.data.coffee().shape[:2], np.uint8))
    write_label_png(preds / "cup1.png", np.zeros(skimage.data.coffee().shape[:2], np.uint8))
    code, _, stderr = run_main(["eval", str(preds), "--data", str(root)], capsys)
    assert code == 0, stderr
    code, _, stderr = run_main(["data", "check", "--data", str(root), "--decode"], capsys)
    assert code == 0 and "all fine" in stderr, stderr  # 255 is fine
    bad = np.array(Image.open(root / "masks" / "cat1.png"))
    bad[100:110, 100:110] = 30  # the vocabulary has ids 0..3
    write_label_png(root / "masks" / "cat1.png", bad)
    code, _, stderr = run_main(["data", "check", "--data", str(root), "--decode"], capsys)
    assert code == 1 and "all fine" not in stderr
    assert str(root / "masks" / "cat1.png") in stderr and "value(s) 30" in stderr and "0..3" in stderr
    code, _, stderr = run_main(["eval", str(preds), "--data", str(root)], capsys)
    assert code == 1 and "cat1.png" in stderr  # what eval refuses, the check reports
