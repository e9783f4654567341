"""Stale inputs and broken items on resume (issue 10): an image replaced by another of the same
size changes the dataset fingerprint; a garbage item file is redone, not counted as done."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from clirun import ssr
from PIL import Image
from tinymodels import tiny_clip_for_cli

import ssr_cli.cli.refine_cmd  # noqa: F401  (registers `refine`)
from ssr_cli.data import open_dataset

pytestmark = pytest.mark.timeout(300)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "voc" / "JPEGImages"


def make_data(root: Path) -> Path:
    """A custom dataset of two uncompressed BMP photos: same-size replacements are easy to make."""
    (root / "images").mkdir(parents=True)
    for name in ("chelsea", "astronaut"):
        with Image.open(EXAMPLES / f"{name}.jpg") as im:
            im.convert("RGB").resize((96, 64)).save(root / "images" / f"{name}.bmp")
    (root / "labels.txt").write_text("chelsea cat\nastronaut person\n")
    return root


def replace_same_size(path: Path) -> None:
    """Another picture in the same number of bytes (BMP pixels inverted), with a new mtime."""
    data = bytearray(path.read_bytes())
    size = len(data)
    data[54:] = bytes(255 - b for b in data[54:])  # the pixel array after the 54-byte header
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> list[object]:
    tiny = tiny_clip_for_cli(tmp_path_factory.mktemp("clip"), seed=7)
    return [
        "--clip-arch",
        tiny["arch"],
        "--clip-weights",
        tiny["weights"],
        "--workers",
        "1",
        "--vocab",
        "voc",
    ]


def test_fingerprint_sees_a_same_size_replacement(tmp_path):
    data = make_data(tmp_path / "data")
    before = open_dataset(data, vocab="voc").fingerprint()
    assert open_dataset(data, vocab="voc").fingerprint() == before  # stable
    replace_same_size(data / "images" / "chelsea.bmp")
    assert open_dataset(data, vocab="voc").fingerprint() != before


def test_make_seeds_refuses_to_resume_over_a_replaced_image(tmp_path, capsys, clip):
    data = make_data(tmp_path / "data")
    args = ["make-seeds", "--data", data, "--out", tmp_path / "seeds", *clip]
    code, _, err = ssr(capsys, *args)
    assert code == 0, err
    replace_same_size(data / "images" / "astronaut.bmp")
    code, _, err = ssr(capsys, *args)
    assert code == 1 and "inputs.dataset" in err and "--overwrite" in err, err


def test_garbage_items_are_redone_on_resume(tmp_path, capsys, clip):
    data = make_data(tmp_path / "data")
    seeds = tmp_path / "seeds"
    args = ["make-seeds", "--data", data, "--out", seeds, *clip]
    assert ssr(capsys, *args)[0] == 0
    good = (seeds / "cams" / "chelsea.npz").read_bytes()
    for garbage in (b"not a zip at all", good[: len(good) // 2]):
        (seeds / "cams" / "chelsea.npz").write_bytes(garbage)
        code, _, err = ssr(capsys, *args)
        assert code == 0 and "cannot be read and will be redone" in err, err
        with np.load(seeds / "cams" / "chelsea.npz") as seed, np.load(good_file(tmp_path, good)) as ref:
            assert all(np.array_equal(seed[k], ref[k]) for k in ref.files)

    out = tmp_path / "refine"
    refine = ["refine", "--seeds", seeds, "--out", out, "--affinity", "none", "--mask", "box"]
    refine += ["--no-crf", "--workers", "0"]
    assert ssr(capsys, *refine)[0] == 0
    label = (out / "labels" / "astronaut.png").read_bytes()
    for garbage in (b"\x89PNG\r\n\x1a\n garbage", label[:-20]):
        (out / "labels" / "astronaut.png").write_bytes(garbage)
        code, _, err = ssr(capsys, *refine)
        assert code == 0 and "will be redone" in err, err
        assert (out / "labels" / "astronaut.png").read_bytes() == label
    assert json.loads((out / "manifest.json").read_text())["completed"] is True

    with_cams = [*refine[:4], tmp_path / "refine-cams", *refine[5:], "--save-cams"]
    assert ssr(capsys, *with_cams)[0] == 0
    cams = tmp_path / "refine-cams" / "cams" / "astronaut.npz"
    kept = cams.read_bytes()
    cams.write_bytes(b"garbage")  # the label is fine, its refined CAMs are not
    code, _, err = ssr(capsys, *with_cams)
    assert code == 0 and "will be redone" in err, err
    assert cams.read_bytes() == kept


def good_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "reference.npz"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "change",
    [
        {"cams": np.full((1, 4, 6), np.nan, np.float16)},
        {"cams": np.zeros((4, 6), np.float16)},
        {"class_ids": np.array([999], np.int16)},
        {"class_ids": np.array([1.5], np.float32)},
        {"image_hw": np.array([-5, 3], np.int32)},
    ],
    ids=["nan", "2d", "class-999", "class-float", "hw-negative"],
)
def test_malformed_seeds_are_one_line_errors_and_redone(tmp_path, capsys, clip, change):
    """A well-formed npz with wrong contents: refine names the file; make-seeds redoes it on resume."""
    data = make_data(tmp_path / "data")
    seeds = tmp_path / "seeds"
    args = ["make-seeds", "--data", data, "--out", seeds, *clip, "--no-save-attn"]
    assert ssr(capsys, *args)[0] == 0
    path = seeds / "cams" / "chelsea.npz"
    with np.load(path) as seed:
        arrays = {k: seed[k] for k in seed.files}
    np.savez(path, **{**arrays, **change})
    refine = ["refine", "--seeds", seeds, "--out", tmp_path / "r", "--affinity", "none", "--mask", "box"]
    code, _, err = ssr(capsys, *refine, "--no-crf", "--workers", "0")
    assert code == 1 and err.count("ssr: error:") == 1 and str(path) in err and "malformed seed" in err, err
    code, _, err = ssr(capsys, *args)
    assert code == 0 and "will be redone" in err, err
    with np.load(path) as seed:
        assert all(np.array_equal(seed[k], arrays[k]) for k in arrays)
