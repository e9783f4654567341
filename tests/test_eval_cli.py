"""``ssr eval`` end to end on real VOC masks, run folders, and the error paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clirun import error_line, run_cli
from PIL import Image

pytestmark = pytest.mark.timeout(60)

VOC_MASKS = Path(__file__).resolve().parent / "data" / "voc2012_val_masks"
VOC_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


def save_png(path: Path, labels: np.ndarray) -> None:
    """A palette PNG written with PIL directly (independent of ssr_cli.data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    image.putpalette([(i * 37) % 256 for i in range(768)])
    image.save(path)


def load_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def corrupt(gt: np.ndarray, i: int) -> np.ndarray:
    """A deterministic, imperfect prediction derived from a GT mask."""
    pred = np.roll(gt, shift=((i % 5 - 2) * 4, (i % 7 - 3) * 3), axis=(0, 1)).copy()
    pred[pred == 255] = 0  # the void band becomes background
    classes = [c for c in np.unique(gt) if c not in (0, 255)]
    if classes and i % 3 == 0:
        c = classes[0]
        pred[pred == c] = (c + i) % 20 + 1  # relabel one class
    h, w = pred.shape
    pred[h // 4 : h // 4 + 30, w // 3 : w // 3 + 50] = 255  # uncertain block
    pred[h // 2 : h // 2 + 20, :40] = 0  # background block
    pred[-10:, -60:] = (i * 5) % 21  # a stripe of some class (also classes absent from the GT)
    return pred


def reference_scores(gts: list[np.ndarray], preds: list[np.ndarray], mode: str) -> dict:
    """Per-class boolean masks summed over all images (no confusion matrix)."""
    tp = np.zeros(21)
    gt_n = np.zeros(21)
    pred_n = np.zeros(21)
    for gt, pred in zip(gts, preds, strict=True):
        valid = gt != 255
        p = np.where(pred == 255, 0, pred) if mode == "background" else pred  # "wrong": 255 matches nothing
        for c in range(21):
            g_c = (gt == c) & valid
            p_c = (p == c) & valid
            tp[c] += np.logical_and(g_c, p_c).sum()
            gt_n[c] += g_c.sum()
            pred_n[c] += p_c.sum()
    present = gt_n > 0
    iou = tp[present] / (gt_n[present] + pred_n[present] - tp[present])
    prec = [tp[c] / pred_n[c] for c in range(21) if present[c] and pred_n[c] > 0]
    rec = tp[present] / gt_n[present]
    valid_total = sum(int((g != 255).sum()) for g in gts)
    return {
        "miou": float(iou.mean()),
        "mprecision": float(np.mean(prec)),
        "mrecall": float(rec.mean()),
        "pixel_accuracy": float(tp.sum() / valid_total),
        "iou": {c: float(tp[c] / (gt_n[c] + pred_n[c] - tp[c])) for c in range(21) if present[c]},
        "present": int(present.sum()),
    }


@pytest.fixture(scope="module")
def voc_pred(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    files = sorted(VOC_MASKS.glob("*.png"))
    assert len(files) == 24
    folder = tmp_path_factory.mktemp("voc_pred")
    gts, preds = [], []
    for i, f in enumerate(files):
        gt = load_png(f)
        pred = corrupt(gt, i)
        save_png(folder / f.name, pred)
        gts.append(gt)
        preds.append(pred)
    return folder, gts, preds


@pytest.mark.parametrize("mode", ["background", "wrong"])
def test_real_voc_masks_match_independent_computation(voc_pred, mode, capsys, tmp_path) -> None:
    folder, gts, preds = voc_pred
    out = tmp_path / f"metrics_{mode}.json"
    code, stdout, err = run_cli(
        ["eval", folder, "--gt", VOC_MASKS, "--pred-ignore", mode, "--json", "--out", out, "-j", "2"], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    ref = reference_scores(gts, preds, mode)
    summary = report["summary"]
    for key in ("miou", "mprecision", "mrecall", "pixel_accuracy"):
        assert summary[key] == pytest.approx(ref[key], abs=1e-9), key
    assert summary["images"] == 24 and summary["missing"] == 0
    assert summary["classes_present"] == ref["present"]
    for row in report["classes"]:
        if row["present"]:
            assert row["iou"] == pytest.approx(ref["iou"][row["id"]], abs=1e-9)
    assert [r["name"] for r in report["classes"]] == VOC_NAMES
    assert 0.2 < summary["miou"] < 0.95  # the corruption is imperfect, not destructive
    assert json.loads(out.read_text()) == report
    assert len(report["confusion_matrix"]) == 21
    assert len(report["confusion_matrix"][0]) == (22 if mode == "wrong" else 21)


def test_workers_do_not_change_results(voc_pred, capsys, tmp_path) -> None:
    folder = voc_pred[0]
    matrices = []
    for workers in (0, 1, 3):
        code, stdout, err = run_cli(
            ["eval", folder, "--gt", VOC_MASKS, "--json", "-j", workers, "-o", tmp_path / "m.json"], capsys
        )
        assert code == 0, err
        matrices.append(json.loads(stdout)["confusion_matrix"])
    assert matrices[0] == matrices[1] == matrices[2]


def test_perfect_prediction_and_table(tmp_path, capsys) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(VOC_MASKS, pred)
    code, stdout, err = run_cli(["eval", pred, "--gt", VOC_MASKS], capsys)
    assert code == 0, err
    assert "mIoU" in stdout and "100.00" in stdout and "aeroplane" in stdout
    report = json.loads((pred / "metrics.json").read_text())  # default: PRED/metrics.json
    assert report["summary"]["miou"] == 1.0
    assert report["summary"]["pixel_accuracy"] == 1.0


def _tiny_gt(root: Path) -> Path:
    gt = root / "gt"
    save_png(gt / "a.png", np.array([[0, 1], [1, 255]]))
    save_png(gt / "sub" / "b.png", np.array([[2, 2, 0], [0, 0, 255]]))
    return gt


def test_missing_prediction_is_one_line_error(tmp_path, capsys) -> None:
    gt = _tiny_gt(tmp_path)
    pred = tmp_path / "pred"
    save_png(pred / "a.png", np.array([[0, 1], [1, 1]]))
    code, stdout, err = run_cli(["eval", pred, "--gt", gt, "--num-classes", 3], capsys)
    assert code == 1
    line = error_line(err, last=True)
    assert str(pred / "sub" / "b.png") in line and "1 of 2" in line
    assert stdout == ""

    code, stdout, err = run_cli(
        ["eval", pred, "--gt", gt, "--num-classes", 3, "--allow-missing", "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["summary"]["images"] == 1 and report["summary"]["missing"] == 1
    assert report["missing_ids"] == ["sub/b"]
    assert report["classes"][1]["name"] == "class 1"
    assert report["summary"]["miou"] == pytest.approx((1.0 + 1.0) / 2)


def test_size_mismatch_and_bad_values(tmp_path, capsys) -> None:
    gt = _tiny_gt(tmp_path)
    pred = tmp_path / "pred"
    save_png(pred / "a.png", np.array([[0, 1, 1], [1, 1, 1]]))
    save_png(pred / "sub" / "b.png", np.array([[2, 2, 0], [0, 0, 0]]))
    code, _, err = run_cli(["eval", pred, "--gt", gt, "--num-classes", 3, "-j", 1], capsys)
    assert code == 1
    line = error_line(err, last=True)
    assert str(pred / "a.png") in line and str(gt / "a.png") in line and "3x2" in line and "2x2" in line

    save_png(pred / "a.png", np.array([[0, 1], [1, 7]]))
    code, _, err = run_cli(["eval", pred, "--gt", gt, "--num-classes", 3], capsys)
    assert code == 1
    line = error_line(err, last=True)
    assert line.startswith(f"ssr: error: {pred / 'a.png'}: prediction has value 7")

    # the same file is valid with more classes (voc default)
    code, _, err = run_cli(["eval", pred, "--gt", gt, "-o", tmp_path / "m.json"], capsys)
    assert code == 0, err


def test_bad_option_values(tmp_path, capsys) -> None:
    gt = _tiny_gt(tmp_path)
    code, _, err = run_cli(["eval", tmp_path / "nope", "--gt", gt], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli(["eval", gt], capsys)
    assert code == 1 and "--gt" in err
    code, _, err = run_cli(["eval", gt, "--gt", gt, "--vocab", "coco", "--num-classes", 21], capsys)
    assert code == 1 and "81 classes" in error_line(err, last=True)
    code, _, err = run_cli(["eval", gt, "--gt", gt, "--split", "val"], capsys)
    assert code == 1 and "--split needs --data" in error_line(err, last=True)
    code, _, err = run_cli(["eval", gt, "--gt", gt, "--pred-ignore", "maybe"], capsys)
    assert code != 0 and "'maybe' is not one of" in err


def _run_folder(root: Path, stage: str, item_dir: str, suffix: str, items: dict[str, np.ndarray]) -> str:
    from ssr_cli.artefacts import RunFolder

    run = RunFolder.open(
        root,
        stage=stage,
        item_dir=item_dir,
        item_suffix=suffix,
        config={"x": 1},
        result_config={"x": 1},
        ids=list(items),
    )
    for item_id, labels in items.items():
        run.write_item(item_id, lambda tmp, labels=labels: save_png_file(tmp, labels))
    run.finish(list(items))
    return run.manifest["fingerprint"]


def save_png_file(path: Path, labels: np.ndarray) -> None:
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    image.putpalette([(i * 37) % 256 for i in range(768)])  # without a palette PIL may remap indices
    image.save(path, format="PNG")


def test_run_folder_with_manifest(tmp_path, capsys) -> None:
    gt = _tiny_gt(tmp_path)
    items = {"a": np.array([[0, 1], [0, 0]]), "sub/b": np.array([[2, 2, 0], [0, 0, 0]])}
    fp = _run_folder(tmp_path / "refine", "refine", "labels", ".png", items)
    code, stdout, err = run_cli(
        ["eval", tmp_path / "refine", "--gt", gt, "--num-classes", 3, "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["pred"]["kind"] == "run" and report["pred"]["stage"] == "refine"
    assert report["pred"]["fingerprint"] == fp
    assert report["summary"]["images"] == 2
    rows = report["classes"]
    assert rows[1]["recall"] == pytest.approx(1 / 2) and rows[1]["precision"] == 1.0
    assert (tmp_path / "refine" / "metrics.json").is_file()

    _run_folder(tmp_path / "seeds", "seeds", "cams", ".npz", {})
    code, _, err = run_cli(["eval", tmp_path / "seeds", "--gt", gt], capsys)
    assert code == 1 and ".npz" in err and "missing" in err  # an empty seeds run: no CAMs yet

    _run_folder(tmp_path / "fit", "fit-seg", "checkpoints", ".pt", {})
    code, _, err = run_cli(["eval", tmp_path / "fit", "--gt", gt], capsys)
    assert code == 1 and "no label maps" in err


def test_subprocess_json(voc_pred, tmp_path) -> None:
    folder = voc_pred[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSR_QUIET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ssr_cli", "eval", str(folder), "--gt", str(VOC_MASKS), "--json",
         "--out", str(tmp_path / "m.json")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["summary"]["images"] == 24
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == report["summary"]


def test_dataset_split_gt(voc_pred, tmp_path, capsys) -> None:
    """--data uses the split's ids and GT masks; results equal those of --gt on the same files."""
    folder, _, _ = voc_pred
    voc = tmp_path / "VOC2012"
    ids = sorted(p.stem for p in VOC_MASKS.glob("*.png"))[::4]
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    pred = tmp_path / "pred"
    pred.mkdir()
    for image_id in ids:
        Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        shutil.copy(VOC_MASKS / f"{image_id}.png", voc / "SegmentationClass")
        shutil.copy(folder / f"{image_id}.png", pred)
    code, stdout, err = run_cli(["eval", pred, "--data", voc, "--split", "val", "--json"], capsys)
    assert code == 0, err
    by_data = json.loads(stdout)
    assert by_data["gt"]["source"] == "dataset" and by_data["gt"]["dataset"]["split"] == "val"
    assert by_data["summary"]["images"] == len(ids) == 6
    code, stdout, err = run_cli(
        ["eval", pred, "--gt", voc / "SegmentationClass", "--json", "-o", tmp_path / "m.json"], capsys
    )
    assert code == 0, err
    assert json.loads(stdout)["confusion_matrix"] == by_data["confusion_matrix"]

    (pred / f"{ids[2]}.png").unlink()
    code, _, err = run_cli(["eval", pred, "--data", voc, "--split", "val"], capsys)
    assert code == 1 and str(pred / f"{ids[2]}.png") in error_line(err, last=True)


def _custom_dataset(root: Path, masks_for: int) -> tuple[Path, list[str]]:
    """A custom-layout dataset of 6 images; only the first ``masks_for`` have a mask."""
    ids = [f"img{i}" for i in range(6)]
    (root / "images").mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({"name": "pets", "classes": ["cat", "dog"]}))
    lines = []
    rng = np.random.default_rng(3)
    for i, image_id in enumerate(ids):
        Image.new("RGB", (6, 5)).save(root / "images" / f"{image_id}.jpg")
        mask = rng.integers(0, 3, size=(5, 6))
        names = {1: "cat", 2: "dog"}
        lines.append(f"{image_id} " + " ".join(names[c] for c in sorted(set(mask.ravel().tolist()) - {0})))
        if i < masks_for:
            save_png(root / "masks" / f"{image_id}.png", mask)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root, ids


def test_partial_ground_truth_scores_images_with_masks(tmp_path, capsys) -> None:
    """masks/ for 4 of 6 images: eval scores those 4 and says 2 were left out (issue 15)."""
    data, ids = _custom_dataset(tmp_path / "mydata", masks_for=4)
    pred = tmp_path / "pred"
    for i, image_id in enumerate(ids):  # predictions for all 6
        gt_file = data / "masks" / f"{image_id}.png"
        base = load_png(gt_file) if gt_file.is_file() else np.zeros((5, 6), dtype=np.uint8)
        save_png(pred / f"{image_id}.png", np.roll(base, i, axis=1))
    code, stdout, err = run_cli(["eval", pred, "--data", data, "--json", "-o", tmp_path / "m.json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["summary"]["images"] == 4 and report["summary"]["no_gt"] == 2
    assert report["summary"]["images_total"] == 6 and report["no_gt_ids"] == ["img4", "img5"]
    assert "scored 4 of 6 images" in err and "2 have no ground truth" in err
    assert [row["name"] for row in report["classes"]] == ["background", "cat", "dog"]
    # the same matrix as scoring the 4 masks directly
    code, stdout, err = run_cli(
        ["eval", pred, "--gt", data / "masks", "--vocab", data / "vocab.json", "--json", "--allow-missing",
         "-o", tmp_path / "m2.json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["confusion_matrix"] == report["confusion_matrix"]
    # the table says how many were scored
    code, stdout, err = run_cli(["eval", pred, "--data", data, "-o", tmp_path / "m.json"], capsys)
    assert code == 0, err
    assert "4 images scored of 6 (2 without ground truth left out)" in " ".join(stdout.split())
    # a prediction missing for an image without ground truth does not matter
    (pred / "img5.png").unlink()
    code, stdout, err = run_cli(["eval", pred, "--data", data, "--json", "-o", tmp_path / "m.json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["summary"]["missing"] == 0


def test_no_ground_truth_at_all_is_one_line_error(tmp_path, capsys) -> None:
    data, _ = _custom_dataset(tmp_path / "mydata", masks_for=0)
    pred = tmp_path / "pred"
    save_png(pred / "img0.png", np.zeros((5, 6)))
    code, stdout, err = run_cli(["eval", pred, "--data", data], capsys)
    assert code == 1 and stdout == ""
    assert "none of the 6 images" in error_line(err, last=True)
