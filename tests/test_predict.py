"""``ssr predict``: label PNGs for a split or a folder, sharding, resume, flips, CRF, model files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import error_line, run_cli

from ssr_cli.data import read_image, read_mask
from ssr_cli.data.vocab import VOC_CLASSES
from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
from ssr_cli.seg.checkpoint import save_model_file
from ssr_cli.train.state import save_checkpoint

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 21-class VOC segmenter saved the way fit-seg saves its final model."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(
        num_classes=21, backbone="resnet10t", aspp_channels=16, class_names=("background", *VOC_CLASSES)
    )
    model = build_segmenter(cfg)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model_file(path, model.state_dict(), cfg)
    save_checkpoint(path.with_name("best.pt"), {"model": model.state_dict(), "model_config": cfg.to_dict()})
    return path


def test_predict_voc_examples_sharded_and_resumed(
    model_file: Path, examples_voc: Path, tmp_path: Path, capsys
):
    out = tmp_path / "pred"
    args = ["predict", "--model", model_file, "--data", examples_voc, "--split", "train", "--out", out,
            "--scales", "0.5,0.75", "--flip", "--device", "cpu", "-j", "0"]  # fmt: skip
    code, _, err = run_cli([*args, "--shard", "0/2"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "predict" and not manifest["completed"]
    ids = [
        line.strip() for line in (examples_voc / "ImageSets/Segmentation/train.txt").read_text().splitlines()
    ]
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == sorted(ids[0::2])
    code, _, err = run_cli([*args, "--shard", "1/2"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] and manifest["items_done"] == len(ids)
    for image_id in ids:
        labels = read_mask(out / "labels" / f"{image_id}.png")
        assert labels.shape == read_image(examples_voc / "JPEGImages" / f"{image_id}.jpg").shape[:2]
        assert labels.max() < 21

    # resume: only the missing item is computed again, and it comes out the same
    victim = out / "labels" / f"{ids[1]}.png"
    before = victim.read_bytes()
    victim.unlink()
    stamps = {i: (out / "labels" / f"{i}.png").stat().st_mtime_ns for i in ids if i != ids[1]}
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"1 of {len(ids)} images to do" in " ".join(err.split())
    assert victim.read_bytes() == before
    assert all((out / "labels" / f"{i}.png").stat().st_mtime_ns == t for i, t in stamps.items())

    code, _, err = run_cli([*args[:-4], "--scales", "1.0", "--device", "cpu", "-j", "0"], capsys)
    assert code == 1 and "--overwrite" in error_line(err)


def test_predict_folder_of_images_with_crf_and_checkpoint(
    model_file: Path, examples_voc: Path, tmp_path, capsys
):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(examples_voc / "JPEGImages" / "chelsea.jpg", images / "cat.jpg")
    shutil.copy(examples_voc / "JPEGImages" / "camera.jpg", images / "sub" / "camera.jpg")
    plain, crf = tmp_path / "plain", tmp_path / "crf"
    base = ["predict", "--images", images, "--device", "cpu", "-j", "1"]
    code, _, err = run_cli([*base, "--model", model_file, "--out", plain], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "--model", model_file.with_name("best.pt"), "--out", crf, "--crf"], capsys)
    assert code == 0, err
    for image_id in ("cat", "sub/camera"):
        a, b = read_mask(plain / "labels" / f"{image_id}.png"), read_mask(crf / "labels" / f"{image_id}.png")
        assert a.shape == b.shape
    assert json.loads((crf / "manifest.json").read_text())["config"]["crf"]["bilateral_sxy"] == 67.0
    # the checkpoint holds the same weights as the safetensors file: without CRF it predicts the same
    code, _, err = run_cli(
        [*base, "--model", model_file.with_name("best.pt"), "--out", tmp_path / "pt"], capsys
    )
    assert code == 0, err
    assert (tmp_path / "pt" / "labels" / "cat.png").read_bytes() == (
        plain / "labels" / "cat.png"
    ).read_bytes()


def test_bad_model_arguments_are_one_line_errors(examples_voc: Path, tmp_path: Path, capsys) -> None:
    base = [
        "predict",
        "--data",
        examples_voc,
        "--split",
        "val",
        "--out",
        tmp_path / "pred",
        "--device",
        "cpu",
    ]
    code, _, err = run_cli([*base, "--model", tmp_path / "missing"], capsys)
    assert code == 1 and "not found" in error_line(err)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "manifest.json").write_text(json.dumps({"stage": "fit-seg", "schema_version": 1}))
    code, _, err = run_cli([*base, "--model", unfinished], capsys)
    assert code == 1 and "last.pt" in error_line(err)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    code, _, err = run_cli([*base, "--model", tmp_path / "foreign.safetensors"], capsys)
    assert code == 1 and "no ssr segmenter config" in error_line(err)


def test_flip_averaging_is_mirror_equivariant(model_file: Path) -> None:
    from ssr_cli.seg.checkpoint import load_segmenter
    from ssr_cli.seg.infer import predict_probs

    model, cfg, _ = load_segmenter(model_file, torch.device("cpu"))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    probs = predict_probs(model, image, cfg.mean, cfg.std, scales=(0.8, 1.0), flip=True)
    assert probs.shape == (21, 37, 53)
    assert torch.allclose(probs.sum(0), torch.ones(37, 53), atol=1e-5)
    mirrored = predict_probs(model, image[:, ::-1].copy(), cfg.mean, cfg.std, scales=(0.8, 1.0), flip=True)
    assert torch.allclose(mirrored.flip(-1), probs, atol=1e-5)
    plain = predict_probs(model, image, cfg.mean, cfg.std, scales=(1.0,))
    plain_mirrored = predict_probs(model, image[:, ::-1].copy(), cfg.mean, cfg.std, scales=(1.0,))
    assert not torch.allclose(plain_mirrored.flip(-1), plain, atol=1e-5)  # without flips it is not


def test_dense_crf_snaps_noisy_probabilities_to_image_edges() -> None:
    from ssr_cli.refine.crf import dense_crf

    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 30, 30)
    image[:, 30:] = (30, 30, 200)
    truth = np.zeros((40, 60), np.int64)
    truth[:, 30:] = 1
    confident = np.where(truth == 1, 0.55, 0.45)
    noisy = np.where(rng.random(truth.shape) < 0.3, 1.0 - confident, confident)
    probs = np.stack([1.0 - noisy, noisy]).astype(np.float32)
    before = (probs.argmax(0) == truth).mean()
    refined = dense_crf(image, probs)
    assert refined.shape == probs.shape
    assert np.allclose(refined.sum(0), 1.0, atol=1e-3)
    after = (refined.argmax(0) == truth).mean()
    assert before < 0.8 and after > 0.99


def test_oversize_images(model_file: Path, examples_voc: Path, tmp_path: Path, capsys):
    """--max-side: error (one line, before any work), skip, downscale (labels at the image's size)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "chelsea"):
        shutil.copy(examples_voc / "JPEGImages" / f"{name}.jpg", images / f"{name}.jpg")
    base = ["predict", "--model", model_file, "--images", images, "--device", "cpu", "-j", "0"]
    code, _, err = run_cli([*base, "--out", tmp_path / "a", "--max-side", "400"], capsys)
    assert code == 1 and "astronaut.jpg" in error_line(err) and "--max-side 400" in err
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(
        [*base, "--out", tmp_path / "b", "--max-side", "480", "--oversize", "skip"], capsys
    )
    assert code == 0 and "skipping 1 image" in err, err
    assert sorted(p.name for p in (tmp_path / "b" / "labels").iterdir()) == ["chelsea.png"]
    out = tmp_path / "c"
    code, _, err = run_cli([*base, "--out", out, "--max-side", "256", "--oversize", "downscale"], capsys)
    assert code == 0, err
    for name in ("astronaut", "chelsea"):
        assert read_mask(out / "labels" / f"{name}.png").shape == read_image(images / f"{name}.jpg").shape[:2]
