"""``ssr fit-seg`` end to end: overfitting, exact kill-and-resume, torchrun DDP, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clirun import error_line, run_cli

from ssr_cli.seg.synthetic import make_shapes_dataset

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

TINY = [
    "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "16", "--crop-size", "48",
    "--batch-size", "2", "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3",
]  # fmt: skip


def sub_env(**extra: str) -> dict[str, str]:
    """One compute thread per process: steady speed on a shared, busy CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSR_QUIET="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for record in read_log(run):
        if "loss" in record:
            assert record["iter"] not in out, f"iteration {record['iter']} logged twice"
            out[record["iter"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), {"train": 6, "val": 3}, size=(56, 72), seed=1
    )


def base_args(shapes: Path, out: Path) -> list:
    return ["fit-seg", "--data", shapes, "--split", "train", "--pseudo", shapes / "masks", "--out", out]


@pytest.mark.timeout(400)
def test_overfits_shapes_then_predict_and_eval(shapes: Path, tmp_path: Path, capsys) -> None:
    """Trained on exact masks of 6 images, the segmenter must reach mIoU > 0.9 on them."""
    run = tmp_path / "seg"
    args = [
        *base_args(shapes, run), "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "32",
        "--output-stride", "8", "--crop-size", "64", "--batch-size", "4", "--iters", "100",
        "--optimizer", "adamw", "--lr", "2e-3", "--scale-range", "1,1", "--device", "cpu", "--workers", "0",
        "--val-split", "val", "--val-every", "50", "--log-every", "10", "--seed", "0",
    ]  # fmt: skip
    started = time.perf_counter()
    code, out, err = run_cli(args, capsys)
    seconds = time.perf_counter() - started
    assert code == 0, err
    assert "model.safetensors" in out
    log = read_log(run)
    assert [r["iter"] for r in log if "val_miou" in r] == [50, 100]
    assert {r["type"] for r in log} == {"train", "val"}  # log.jsonl records say what they are
    assert [r["iter"] for r in log if r["type"] == "val"] == [50, 100]
    val = [r for r in log if r["type"] == "val"][-1]  # fractions in JSON, % with the sign for people
    assert f"validation mIoU {100 * val['val_miou']:.2f} %" in err and "validating on 3 images" in err
    assert " % at iteration" in out
    flat = " ".join(err.split())  # once, at the start, on the CPU: the measured cost of the run
    assert flat.count("fit-seg on the CPU:") == 1 and "the remaining 97 iterations take about" in flat
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == "fit-seg" and manifest["completed"] is True
    first, last = losses(run)[10], losses(run)[100]
    assert last < 0.5 * first

    code, _, err = run_cli(["predict", "--model", run, "--data", shapes, "--split", "train",
                            "--out", tmp_path / "pred", "--device", "cpu", "-j", "0"], capsys)  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        ["eval", tmp_path / "pred", "--data", shapes, "--split", "train", "--json"], capsys
    )
    assert code == 0, err
    miou = json.loads(out)["summary"]["miou"]
    print(f"overfit: mIoU {miou:.3f} on the training images; training took {seconds:.1f} s")
    assert miou > 0.9


def test_kill_and_resume_equals_uninterrupted_run(shapes: Path, tmp_path: Path, capsys) -> None:
    common = [*TINY, "--iters", "32", "--save-every", "8", "--log-every", "1", "--seed", "3"]
    cmd = [sys.executable, "-m", "ssr_cli"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run([*cmd, *map(str, base_args(shapes, whole)), *common, "-j", "0"],
                          env=sub_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr

    # the interrupted run uses a data-loader worker: the sample stream must not depend on it
    proc = subprocess.Popen([*cmd, *map(str, base_args(shapes, broken)), *common, "-j", "1"], env=sub_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    checkpoint = broken / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 200
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert checkpoint.exists(), proc.stderr.read() if proc.stderr else ""
    assert not (broken / "model.safetensors").exists(), "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"]
    assert 8 <= killed_at < 32

    # the folder now holds an interrupted run: refused without --resume, and --resume refuses other --iters
    code, _, err = run_cli([*base_args(shapes, broken), *common, "-j", "1"], capsys)
    assert code == 1 and "--resume" in error_line(err)
    changed = [*base_args(shapes, broken), *common, "-j", "1", "--resume", "--iters", "40"]
    code, _, err = run_cli(changed, capsys)
    assert code == 1 and "--iters 40" in error_line(err) and "32" in error_line(err)

    resumed = subprocess.run([*cmd, *map(str, base_args(shapes, broken)), *common, "-j", "1", "--resume"],
                             env=sub_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    expected, got = losses(whole), losses(broken)
    assert sorted(got) == list(range(1, 33)) == sorted(expected)
    for iteration in range(killed_at + 1, 33):
        assert abs(got[iteration] - expected[iteration]) <= 1e-6, (
            iteration,
            got[iteration],
            expected[iteration],
        )
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    manifest = json.loads((broken / "manifest.json").read_text())
    assert manifest["completed"] and manifest["summary"]["resumed_from"] == killed_at


def test_torchrun_two_processes_agree_on_weights(shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    args = [*base_args(shapes, run), *TINY, "--iters", "3", "--log-every", "1", "--check-sync-every", "1",
            "--accum", "2", "--val-split", "val", "--workers", "0"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssr_cli", *map(str, args)]  # fmt: skip
    done = subprocess.run(cmd, env=sub_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    syncs = [r for r in read_log(run) if "sync" in r]
    assert [r["iter"] for r in syncs] == [1, 2, 3]
    for record in syncs:
        digests = record["sync"]["weights"]
        assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept the ranks identical
    assert len({r["sync"]["weights"][0] for r in syncs}) == 3  # and the weights did change every step
    rank_losses = [r["sync"]["rank_losses"] for r in syncs]
    assert any(a != b for a, b in rank_losses)  # the ranks saw different images
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2 and manifest["completed"]
    assert any("val_miou" in r for r in read_log(run))
    assert (run / "model.safetensors").is_file()


def test_same_settings_skip_other_settings_refused_overwrite_replaces(
    shapes: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "seg"
    args = [*base_args(shapes, run), *TINY, "--iters", "2", "-j", "0"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "nothing to do" in " ".join(err.split())
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp
    code, _, err = run_cli([*args, "--lr", "5e-4"], capsys)
    line = error_line(err)
    assert code == 1 and "--overwrite" in line and "train.lr" in line
    code, _, err = run_cli([*args, "--lr", "5e-4", "--overwrite"], capsys)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["train"]["lr"] == 5e-4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli([*base_args(shapes, tmp_path / "other"), *TINY, "--iters", "2"], capsys)
    assert code == 1 and "not empty" in error_line(err)


def test_pseudo_labels_from_a_refine_run_folder(shapes: Path, tmp_path: Path, capsys) -> None:
    """A run folder's manifest gives the label folder, the upstream fingerprint and the split."""
    import shutil

    from ssr_cli.artefacts import RunFolder
    from ssr_cli.data import open_dataset

    dataset = open_dataset(shapes, split="train", labels="none")
    refine = RunFolder.open(tmp_path / "refine", stage="refine", item_dir="labels", item_suffix=".png",
                            config={}, result_config={"crf": True}, inputs={"dataset": dataset.describe()},
                            ids=dataset.ids)  # fmt: skip
    for image_id in dataset.ids[:-1]:  # one image left without a pseudo-label
        refine.write_item(image_id, lambda tmp, i=image_id: shutil.copy(shapes / "masks" / f"{i}.png", tmp))
    manifest = refine.finish(dataset.ids)
    run = tmp_path / "seg"
    args = ["fit-seg", "--data", shapes, "--pseudo", tmp_path / "refine", "--out", run, *TINY, "--iters", "2",
            "--precision", "bf16", "--accum", "2", "-j", "0"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    text = " ".join(err.split())  # rich may wrap long lines
    assert "is not complete" in text and "1 of 6 images have no pseudo-label" in text
    written = json.loads((run / "manifest.json").read_text())
    assert written["upstream"]["pseudo"] == manifest["fingerprint"]
    assert written["config"]["split"] == "train" and written["samples"] == 5
    assert written["config"]["train"]["precision"] == "bf16" and written["completed"]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_pseudo_label_is_a_one_line_error_naming_the_file(
    shapes: Path, tmp_path: Path, capsys, workers
) -> None:
    import shutil

    import numpy as np

    from ssr_cli.data import read_mask, write_label_png

    pseudo = tmp_path / "pseudo"
    shutil.copytree(shapes / "masks", pseudo)
    for path in pseudo.glob("train_*.png"):
        mask = read_mask(path)
        mask[0, 0] = 9  # not a class of the 4-class vocabulary, not 255
        write_label_png(path, mask.astype(np.uint8))
    args = ["fit-seg", "--data", shapes, "--split", "train", "--pseudo", pseudo, "--out", tmp_path / "run",
            *TINY, "--iters", "2", "-j", workers]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    line = error_line(err)
    assert code == 1 and "label value 9" in line and str(pseudo) in line and "Traceback" not in line


def test_deeplabv2_head_trains_with_its_recipe_then_predicts(shapes: Path, tmp_path: Path, capsys) -> None:
    """--head deeplabv2: CLIP-ES's recipe by default (recorded in the manifest), BatchNorm frozen,
    output stride 8; explicit flags win; predict rebuilds the model from the model file."""
    run = tmp_path / "v2"
    tiny = ["--backbone", "resnet18", "--no-pretrained", "--crop-size", "48", "--batch-size", "2",
            "--device", "cpu", "-j", "0", "--log-every", "1"]  # fmt: skip
    code, _, err = run_cli([*base_args(shapes, run), "--head", "deeplabv2", *tiny, "--iters", "3"], capsys)
    assert code == 0, err
    text = " ".join(err.split())
    assert "head deeplabv2, recipe of kazuto1011/deeplab-pytorch" in text and "BatchNorm frozen" in text
    assert "--freeze-bn with random backbone weights" in text
    manifest = json.loads((run / "manifest.json").read_text())
    train, model = manifest["config"]["train"], manifest["config"]["model"]
    assert (
        model["head"] == "deeplabv2"
        and model["output_stride"] == 8
        and model["aspp_rates"] == [6, 12, 18, 24]
    )
    assert (train["lr"], train["head_lr_mult"], train["head_bias_lr_mult"]) == (2.5e-4, 10.0, 20.0)
    assert (train["weight_decay"], train["momentum"], train["poly_power"]) == (5e-4, 0.9, 0.9)
    assert train["freeze_bn"] is True and train["bias_decay"] is False
    recipe = manifest["config"]["recipe"]
    assert recipe["head"] == "deeplabv2" and recipe["source"].startswith("kazuto1011/deeplab-pytorch")
    assert "lr" in recipe["from_recipe"] and recipe["given"] == []
    assert all(r["loss"] == r["loss"] for r in read_log(run) if "loss" in r)  # finite (not NaN)
    from safetensors.torch import load_file

    weights = load_file(run / "model.safetensors")
    assert torch.equal(weights["backbone.bn1.running_var"], torch.ones(64))  # never updated: frozen
    assert torch.equal(weights["backbone.bn1.weight"], torch.ones(64))

    pred = tmp_path / "pred"
    code, _, err = run_cli(["predict", "--model", run, "--data", shapes, "--split", "val", "--out", pred,
                            "--device", "cpu", "-j", "0"], capsys)  # fmt: skip
    assert code == 0, err
    assert len(list((pred / "labels").glob("*.png"))) == 3
    code, out, err = run_cli(["eval", pred, "--data", shapes, "--split", "val", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["summary"]["miou"] is not None

    # explicit flags win over the head's recipe
    mine = tmp_path / "mine"
    args = [*base_args(shapes, mine), "--head", "deeplabv2", *tiny, "--iters", "1", "--lr", "1e-3",
            "--train-bn", "--output-stride", "16", "--head-bias-lr-mult", "10"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    config = json.loads((mine / "manifest.json").read_text())["config"]
    assert (config["train"]["lr"], config["train"]["freeze_bn"], config["train"]["head_bias_lr_mult"]) == (
        1e-3, False, 10.0,
    )  # fmt: skip
    assert config["model"]["output_stride"] == 16 and config["train"]["weight_decay"] == 5e-4
    assert set(config["recipe"]["given"]) == {"lr", "freeze_bn", "head_bias_lr_mult", "output_stride"}


def test_deeplabv3plus_defaults_are_vainf_recipe(shapes: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "v3"
    args = [*base_args(shapes, run), "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels",
            "16", "--crop-size", "48", "--batch-size", "2", "--device", "cpu", "-j", "0",
            "--iters", "1"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    config = json.loads((run / "manifest.json").read_text())["config"]
    train = config["train"]
    assert (train["lr"], train["lr"] * train["head_lr_mult"], train["weight_decay"]) == (1e-3, 1e-2, 1e-4)
    assert train["freeze_bn"] is False and train["norm_decay"] is False and train["bias_decay"] is False
    assert config["model"]["output_stride"] == 16
    assert config["recipe"]["source"] == "VainF/DeepLabV3Plus-Pytorch"
    code, _, err = run_cli([*args, "--head", "nope", "--overwrite"], capsys)
    assert code == 1 and "--head 'nope' is not known" in error_line(err)


@pytest.mark.timeout(300)
def test_validation_on_partial_ground_truth(shapes: Path, tmp_path: Path, capsys) -> None:
    """A validation split where only some images have masks validates on those (issue 15)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    val_ids = (data / "splits" / "val.txt").read_text().split()
    (data / "masks" / f"{val_ids[0]}.png").unlink()
    run = tmp_path / "seg"
    args = [
        "fit-seg", "--data", data, "--split", "train", "--pseudo", shapes / "masks", "--out", run,
        "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "16", "--crop-size", "48",
        "--batch-size", "2", "--iters", "2", "--device", "cpu", "--workers", "0", "--val-split", "val",
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"validating on the {len(val_ids) - 1} of {len(val_ids)} images" in " ".join(err.split())
    assert [r["iter"] for r in read_log(run) if r["type"] == "val"] == [2]
    for image_id in val_ids[1:]:  # no mask at all: one line naming the split
        (data / "masks" / f"{image_id}.png").unlink()
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 1 and "none of the 3 images of --val-split val has a ground-truth mask" in err


@pytest.mark.timeout(300)
def test_tensorboard_events_hold_the_log_numbers(shapes: Path, tmp_path: Path, capsys) -> None:
    """--tensorboard writes the numbers of log.jsonl as TensorBoard scalars (issue 15 item 9)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "seg"
    args = [
        *base_args(shapes, run), "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "16",
        "--crop-size", "48", "--batch-size", "2", "--iters", "4", "--log-every", "2", "--device", "cpu",
        "--workers", "0", "--val-split", "val", "--val-every", "2", "--tensorboard",
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    log = read_log(run)
    train = {r["iter"]: r for r in log if r["type"] == "train"}
    val = {r["iter"]: r for r in log if r["type"] == "val"}
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    miou = {e.step: e.value for e in events.Scalars("val/val_miou")}
    assert sorted(loss) == sorted(train) == [2, 4] and sorted(miou) == sorted(val) == [2, 4]
    for step in loss:
        assert loss[step] == pytest.approx(train[step]["loss"], rel=1e-6)
        assert miou[step] == pytest.approx(val[step]["val_miou"], rel=1e-6)
