"""Huge images (issue 10): --max-side / --oversize error|skip|downscale in make-seeds and refine,
with a real 12000x9000 JPEG (past PIL's decompression-bomb warning threshold)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from clirun import ssr
from PIL import Image
from tinymodels import tiny_clip_for_cli

import ssr_cli.cli.refine_cmd  # noqa: F401  (registers `refine`)

pytestmark = pytest.mark.timeout(300)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "voc" / "JPEGImages"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oversize")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.jpg", data / "images" / "cat.jpg")
    big = np.empty((9000, 12000, 3), np.uint8)  # 108 MP: stripes every 40 px, written channel by channel
    big[..., 0] = ((np.arange(12000) // 40) % 256).astype(np.uint8)[None, :]
    big[..., 1] = ((np.arange(9000) // 40) % 256).astype(np.uint8)[:, None]
    big[..., 2] = 90
    Image.fromarray(big).save(data / "images" / "big.jpg", quality=60)
    (data / "labels.txt").write_text("cat cat\nbig person, dog\n")
    clip = tiny_clip_for_cli(root, seed=4)
    return {"data": data, "arch": Path(clip["arch"]), "weights": Path(clip["weights"]), "root": root}


def seeds_args(world: dict[str, Path], out: Path, *extra: object) -> list[object]:
    args: list[object] = ["make-seeds", "--data", world["data"], "--vocab", "voc", "--out", out]
    args += ["--clip-arch", world["arch"], "--clip-weights", world["weights"], "--no-save-attn"]
    return [*args, "--workers", "1", *extra]


def test_default_is_a_one_line_error_before_any_work(world, capsys, tmp_path):
    out = tmp_path / "seeds"
    code, _, err = ssr(capsys, *seeds_args(world, out))
    assert code == 1, err
    assert err.strip().count("\n") == 0 and "DecompressionBomb" not in err
    assert "big.jpg" in err and "12000x9000" in err and "--max-side 1024" in err and "--oversize" in err
    assert not out.exists()  # nothing was started


def test_skip_leaves_the_image_out_with_a_notice(world, capsys, tmp_path):
    out = tmp_path / "seeds"
    code, _, err = ssr(capsys, *seeds_args(world, out, "--oversize", "skip"))
    assert code == 0, err
    assert "skipping 1 image" in err and "big.jpg" in err and "DecompressionBomb" not in err
    assert sorted(p.stem for p in (out / "cams").iterdir()) == ["cat"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] and manifest["item_count"] == 1
    assert manifest["fingerprint_basis"]["config"]["oversize"]["ids"] == ["big"]


def test_downscale_then_refine_keeps_the_original_size(world, capsys, tmp_path):
    from ssr_cli.artefacts.seeds import load_seed

    seeds = tmp_path / "seeds"
    code, _, err = ssr(capsys, *seeds_args(world, seeds, "--oversize", "downscale", "--max-side", "512"))
    assert code == 0, err
    assert "DecompressionBomb" not in err
    big = load_seed(seeds / "cams" / "big.npz")
    assert tuple(big["image_hw"]) == (9000, 12000) and big["cams"].shape == (2, 24, 32)  # 384x512 input
    cat = load_seed(seeds / "cams" / "cat.npz")
    assert tuple(cat["image_hw"]) == (300, 451)  # below the limit: untouched
    out = tmp_path / "refine"
    args = ["refine", "--seeds", seeds, "--out", out, "--affinity", "none", "--mask", "box", "--no-crf"]
    code, _, err = ssr(capsys, *args, "--workers", "0", "--save-cams")  # --oversize: the seeds' choice
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own label file: PIL warns about its size here, not ssr
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(out / "labels" / "big.png") as im:
            assert im.size == (12000, 9000) and im.mode == "P"
    assert tuple(load_seed(out / "cams" / "big.npz")["image_hw"]) == (9000, 12000)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint_basis"]["config"]["oversize"]["oversize"] == "downscale"
    code, _, err = ssr(capsys, *args, "--out", tmp_path / "r2", "--oversize", "error")
    assert code == 1 and "big.jpg" in err and "--max-side 512" in err


def test_sizes_past_pils_hard_limit_are_read_from_the_header(tmp_path, recwarn):
    """15000x12500 (187 MP) makes PIL refuse even to open the file: we still read its size."""
    from ssr_cli.data.size_limit import SizeLimit, image_size, plan_sizes
    from ssr_cli.errors import DataError

    path = tmp_path / "huge.png"
    Image.new("1", (15000, 12500)).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert image_size(path) == (12500, 15000)
    with pytest.raises(DataError, match="15000x12500"):
        plan_sizes(["huge"], [path], SizeLimit(), stage="test")
    plan = plan_sizes(["huge"], [path], SizeLimit(oversize="skip"), stage="test")
    assert list(plan.skipped) == ["huge"]
    with pytest.raises(DataError, match="too large to decode safely, even to downscale"):
        plan_sizes(["huge"], [path], SizeLimit(oversize="downscale"), stage="test")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
