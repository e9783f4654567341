"""`ssr train` (single-stage SSR) on the proving ground with the committed tiny CLIP and DINO:
the loss falls, predict and eval run on the trained run, SIGKILL + --resume reproduces the loss
curve, torchrun ends with equal weights on both ranks; and the parts (decoder, online masks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import kill_when, ssr_one_thread

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LAUNCH = "import ssr_cli.cli.train_cmd\nfrom ssr_cli.cli import main\nmain()\n"
MODEL_ARGS = [
    "--clip-arch", str(MODELS / "ssr-tiny-clip.json"), "--clip-weights", str(MODELS / "tiny_clip.pt"),
    "--dino-model", str(MODELS / "ssr-tiny-dino.json"), "--dino-weights", str(MODELS / "tiny_dino.pth"),
]  # fmt: skip
SMALL = ["--size", "64", "--batch-size", "2", "--dim", "16", "--decoder-dim", "16", "--workers", "1",
         "--init-images", "8", "--seg-lr", "2e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """16 synthetic images (12 train, 4 val) and a launcher script for subprocesses."""
    from ssr_cli.data.synth import generate

    folder = tmp_path_factory.mktemp("ssr-train")
    for _ in generate(folder / "data", 16, seed=31, size_range=(64, 96), val_fraction=0.25):
        pass
    launcher = folder / "ssr_launch.py"
    launcher.write_text(LAUNCH)
    return {"data": folder / "data", "launcher": launcher}


def _cli(world: dict[str, Path], *args: str, command: str = "train") -> list[str]:
    return [sys.executable, str(world["launcher"]), command, *args]


def _main(capsys, args: list[str]) -> tuple[int, str, str]:
    """The real CLI in this process, single-threaded: (exit code, stdout, stderr)."""
    return ssr_one_thread(capsys, args)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _train_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(world["data"]), "--split", "train", "--out", str(out), *MODEL_ARGS, *SMALL,
            *extra]  # fmt: skip


def test_loss_falls_then_predict_and_eval_run_on_the_run(tmp_path, world, capsys):
    run = tmp_path / "run"
    args = _train_args(world, run, "--iters", "60", "--proto-every", "30", "--log-every", "1", "--val-split",
                       "val", "--val-every", "30", "--save-every", "30", "--lr", "1e-3")  # fmt: skip
    code, out, err = _main(capsys, args)
    assert code == 0, err
    assert "model.safetensors" in out and "best val mIoU" in out
    log = _log(run)
    train = [r for r in log if r["type"] == "train"]
    assert [r["iter"] for r in train] == list(range(1, 61))
    for key, factor in (("loss", 0.6), ("loss_proto", 0.6), ("loss_seg", 0.9)):  # L_SSR and both terms fall
        curve = [r[key] for r in train]
        assert sum(curve[-10:]) / 10 < factor * sum(curve[:10]) / 10, (key, curve)
    assert all(0.0 < r["pseudo_fg"] < 1.0 for r in train)  # the masks hold background and objects
    assert [r["iter"] for r in log if r["type"] == "val"] == [30, 60]
    assert [r["iter"] for r in log if r["type"] == "prototypes"] == [0, 30]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["completed"] and manifest["stage"] == "train"
    summary = manifest["summary"]
    assert set(summary["time_share"]) == {"data", "clip", "pseudo", "forward", "update"}
    assert 0 < summary["pseudo_share"] < 1 and summary["seconds_per_iter"] > 0
    assert summary["best"]["iteration"] in (30, 60)
    for name in ("model.safetensors", "heads.safetensors", "prototypes.safetensors", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    # the same command again: nothing to do
    code, _, err = _main(capsys, args)
    assert code == 0 and "nothing to do" in err

    pred = tmp_path / "pred"
    val = ["--data", str(world["data"]), "--split", "val", "--workers", "0"]
    code, _, err = _main(capsys, ["predict", "--model", str(run), *val, "--out", str(pred), "--scales",
                                  "0.75,1.0", "--flip"])  # fmt: skip
    assert code == 0, err
    assert len(list((pred / "labels").glob("*.png"))) == 4
    assert json.loads((pred / "manifest.json").read_text())["upstream"]["train"] == manifest["fingerprint"]
    code, out, err = _main(
        capsys, ["eval", str(pred), "--data", str(world["data"]), "--split", "val", "--json"]
    )
    assert code == 0, err
    assert 0.0 <= json.loads(out)["summary"]["miou"] <= 1.0
    # its CMPA heads serve make-seeds as a train-cmpa run's do (CAMs in the projected space)
    seeds = tmp_path / "seeds"
    code, _, err = _main(capsys, ["make-seeds", *val, "--out", str(seeds), "--cmpa", str(run),
                                  *MODEL_ARGS[:4], "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    seeds_manifest = json.loads((seeds / "manifest.json").read_text())
    assert seeds_manifest["upstream"]["cmpa"] == manifest["fingerprint"]
    assert len(list((seeds / "cams").glob("*.npz"))) == 4
    # its best checkpoint predicts too, with the CRF
    best = run / "checkpoints" / "best.pt"
    code, _, err = _main(capsys, ["predict", "--model", str(best), *val, "--out", str(tmp_path / "pred-crf"),
                                  "--crf"])  # fmt: skip
    assert code == 0, err


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, world, capsys):
    from safetensors.torch import load_file

    common = ["--iters", "24", "--proto-every", "10", "--proto-ema", "0.5", "--log-every", "1",
              "--save-every", "3"]  # fmt: skip
    whole = tmp_path / "whole"
    code, _, err = _main(capsys, _train_args(world, whole, *common))
    assert code == 0, err

    killed = tmp_path / "killed"
    kill_when(
        _cli(world, *_train_args(world, killed, *common)[1:]),
        ENV,
        (killed / "checkpoints" / "last.pt").exists,
        timeout=150,
    )
    assert json.loads((killed / "manifest.json").read_text())["completed"] is False, "the kill came too late"

    code, _, err = _main(capsys, _train_args(world, killed, *common))
    assert code != 0 and "--resume" in err  # an interrupted run is not overwritten silently
    code, _, err = _main(capsys, _train_args(world, killed, *common, "--resume"))
    assert code == 0, err
    resumed_at = int(err.split("resuming")[1].split("at iteration")[1].split()[0])
    assert 3 <= resumed_at < 24
    keys = ("loss", "loss_proto", "loss_seg", "temperature", "pseudo_fg")
    a = [(r["iter"], *(r[k] for k in keys)) for r in _log(whole) if r["type"] == "train"]
    b = [(r["iter"], *(r[k] for k in keys)) for r in _log(killed) if r["type"] == "train"]
    assert [r[0] for r in a] == list(range(1, 25)) and [r[0] for r in b] == [r[0] for r in a]
    for ra, rb in zip(a, b, strict=True):
        assert all(abs(x - y) <= 1e-6 for x, y in zip(ra[1:], rb[1:], strict=True)), (ra, rb)
    assert [r["iter"] for r in _log(killed) if r["type"] == "prototypes"] == [0, 10, 20]
    for name in ("model.safetensors", "heads.safetensors"):
        wa, wb = load_file(str(whole / name)), load_file(str(killed / name))
        assert all(float((wa[k] - wb[k]).abs().max()) <= 1e-6 for k in wa), name
    assert [p.name for p in killed.rglob("*") if ".tmp-" in p.name] == []


def test_torchrun_two_cpu_processes_end_with_equal_weights(tmp_path, world):
    out = tmp_path / "ddp"
    args = _train_args(world, out, "--iters", "4", "--proto-every", "3", "--log-every", "1", "--save-every",
                       "2", "--check-sync-every", "2", "--device", "cpu", "--val-split", "val",
                       "--val-every", "2")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(world["launcher"]), *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=250)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] and manifest["config"]["world_size"] == 2
    log = _log(out)
    syncs = [r["sync"] for r in log if r["type"] == "sync"]
    assert len(syncs) == 2 and all(len(s["weights"]) == 2 and len(set(s["weights"])) == 1 for s in syncs)
    assert any(len(set(s["rank_losses"])) == 2 for s in syncs)  # the ranks trained on different images
    digests = manifest["summary"]["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and digests[0] != syncs[0]["weights"][0]
    assert [r["iter"] for r in log if r["type"] == "val"] == [2, 4]


# ----------------------------------------------------------------------------- parts


def test_capture_blocks_reads_each_blocks_output():
    import torch

    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.onestage.decoder import capture_blocks, layer_tokens

    clip = load_clip(register_arch(str(MODELS / "ssr-tiny-clip.json")), "random", "cpu")
    x = torch.randn(2, 3, 48, 64)
    layers = tuple(range(len(clip.blocks)))
    with torch.no_grad(), capture_blocks(clip, layers) as found:
        tokens = clip.image_tokens(x, grad_last_block=False)
    got = layer_tokens(found, tokens.post, layers, len(clip.blocks) - 1)
    with torch.no_grad():  # the blocks one by one
        h = clip.embed(x)
        for i in range(len(clip.blocks) - 1):
            h = clip.run_block(i, h)
            assert torch.allclose(got[i], h[:, 1:], atol=1e-5), i
    assert torch.equal(got[-1], tokens.post[:, 1:]) and got[0].shape == (2, 12, clip.width)
    assert all(not b.ln_1._forward_pre_hooks for b in clip.blocks)  # the hooks are gone


def test_decoder_and_segmenter_shapes():
    import torch

    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.onestage.decoder import DecoderConfig, SegDecoder, SsrSegmenter, resolve_layers

    clip = load_clip(register_arch(str(MODELS / "ssr-tiny-clip.json")), "random", "cpu")
    assert resolve_layers((), 4) == (0, 1, 2, 3) and resolve_layers((-1, 1, 3), 4) == (1, 3)
    cfg = DecoderConfig(num_classes=5, width=clip.width, layers=(1, 3), dim=16, convs=1)
    decoder = SegDecoder(cfg)
    seg = SsrSegmenter(clip, decoder)
    assert [p for p in seg.parameters()] == [p for p in decoder.parameters()]  # CLIP is not trained
    logits = seg(torch.randn(1, 3, 50, 70))  # any size: resized to the patch grid and back
    assert logits.shape == (1, 5, 50, 70)


def test_pseudo_masks_label_only_present_classes():
    import numpy as np
    import torch

    from ssr_cli.onestage.config import REGION_CELLS, SsrConfig
    from ssr_cli.onestage.pseudo import pseudo_masks

    cams = [torch.zeros(2, 4, 4), torch.zeros(0, 4, 4)]
    cams[0][0, :2, :2] = 1.0  # class 3 top-left
    cams[0][1, 2:, 2:] = 1.0  # class 6 bottom-right
    regions = np.zeros((4 * REGION_CELLS, 4 * REGION_CELLS), np.uint16)
    regions[: 2 * REGION_CELLS, : 2 * REGION_CELLS] = 1
    regions[2 * REGION_CELLS :, 2 * REGION_CELLS :] = 2
    cfg = SsrConfig(affinity="none")
    labels = pseudo_masks(cams, [[2, 5], []], torch.eye(16).expand(2, 16, 16), [(regions, 3), (regions, 3)],
                          [False, False], cfg)  # fmt: skip
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.long
    assert set(labels[0].unique().tolist()) == {0, 3, 6} and labels[1].unique().tolist() == [0]
    assert int(labels[0, 0, 0]) == 3 and int(labels[0, -1, -1]) == 6 and int(labels[0, 0, -1]) == 0
    boxed = pseudo_masks(cams[:1], [[2, 5]], torch.eye(16)[None], None, [False], SsrConfig(mask="box"))
    assert torch.equal(boxed[0], labels[0])  # CLIP-ES's boxes keep each class's own square here
    strict = pseudo_masks(cams[:1], [[2, 5]], None, None, [False], SsrConfig(conf_thresh=0.99))
    assert 255 in strict.unique().tolist()  # the blurred borders are ignored


def test_config_refuses_bad_settings():
    from ssr_cli.errors import ConfigError
    from ssr_cli.onestage.config import SsrConfig

    assert SsrConfig().gamma == 0.1 and SsrConfig().affinity_weights == (0.4, 0.6)
    for bad in ({"gamma": -1}, {"affinity": "dino"}, {"mask": "boxes"}, {"conf_thresh": 2.0}):
        with pytest.raises(ConfigError):
            SsrConfig(**bad)


def test_dino_blocks_read_as_refine_reads_them():
    """`ssr train --dino-blocks` follows refine's rule: one positive N = the last N blocks, else
    block indices; the online pseudo-masks then average the same blocks refine would."""
    import torch

    from ssr_cli.models.attention import parse_blocks
    from ssr_cli.onestage.config import SsrConfig
    from ssr_cli.onestage.pseudo import dino_grid_attention
    from ssr_cli.refine.sources import load_dino_model

    assert parse_blocks("2", "--dino-blocks") == 2 and parse_blocks("-1", "--dino-blocks") == (-1,)
    assert SsrConfig(dino_blocks=2).to_dict()["dino_blocks"] == 2
    assert SsrConfig().to_dict()["dino_blocks"] == [-1]  # the default run's settings are unchanged
    dino, _ = load_dino_model(
        str(MODELS / "ssr-tiny-dino.json"), str(MODELS / "tiny_dino.pth"), torch.device("cpu")
    )
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        last_two = dino_grid_attention(dino, x, (4, 5), 2, "fp32")
        assert torch.allclose(last_two, dino_grid_attention(dino, x, (4, 5), (-2, -1), "fp32"))
        assert not torch.allclose(last_two, dino_grid_attention(dino, x, (4, 5), (2,), "fp32"))
