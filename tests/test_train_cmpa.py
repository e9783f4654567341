"""`ssr train-cmpa` through the real CLI: end to end on examples/, SIGKILL + --resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from clirun import kill_when, ssr_one_thread
from tinymodels import tiny_clip_for_cli

pytestmark = pytest.mark.timeout(240)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# works before and after `ssr_cli.cli.commands` registers the command
LAUNCH = "import ssr_cli.cli.cmpa_cmd\nfrom ssr_cli.cli import main\nmain()\n"
SMALL = ["--size", "64", "--batch-size", "2", "--dim", "16", "--workers", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tinyclip-train-cmpa")
    files = tiny_clip_for_cli(folder)
    config, weights = Path(files["arch"]), Path(files["weights"])
    launcher = folder / "ssr_launch.py"
    launcher.write_text(LAUNCH)
    return {"arch": str(config), "weights": str(weights), "launcher": str(launcher)}


def _cli(tiny: dict[str, str], *args: str, command: str = "train-cmpa") -> list[str]:
    return [sys.executable, tiny["launcher"], command, "--clip-arch", tiny["arch"], "--clip-weights",
            tiny["weights"], *args]  # fmt: skip


def _main(capsys, cmd: list[str]) -> tuple[int, str, str]:
    """The real CLI in this process (``cmd`` as for a subprocess), single-threaded like the
    subprocesses: (exit code, stdout, stderr). Saves an interpreter start per call."""
    return ssr_one_thread(capsys, cmd[2:])


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_cli_end_to_end_on_examples_then_seeds(tmp_path, tiny, examples_voc, capsys):
    from safetensors import safe_open

    out = tmp_path / "cmpa"
    args = ["--data", str(examples_voc), "--split", "train", "--out", str(out), *SMALL, "--iters", "6",
            "--proto-every", "3", "--log-every", "2", "--save-every", "3", "--protos-per-class", "2",
            "--proto-ema", "0.9", "--tensorboard"]  # fmt: skip
    code, stdout, stderr = _main(capsys, _cli(tiny, *args))
    assert code == 0, stderr
    assert stdout.strip().startswith(str(out / "heads.safetensors")) and "temperature" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "cmpa" and manifest["completed"] and manifest["items_done"] == 6
    sha = manifest["inputs"]["clip"]["weights"]["sha256"]
    basis = manifest["fingerprint_basis"]
    assert sha and basis["config"]["clip"]["weights"] == sha
    assert basis["inputs"]["dataset"] == manifest["inputs"]["dataset"]["fingerprint"]
    assert basis["config"]["train"]["dim"] == 16 and "workers" not in basis["config"]["train"]
    assert manifest["config"]["train"]["protos_per_class"] == 2
    log = _log(out)
    losses = [r for r in log if "loss" in r]
    assert [r["iter"] for r in losses] == [2, 4, 6]
    assert all(r["loss"] > 0 and 0.01 <= r["temperature"] < 1 for r in losses)
    assert [r["iter"] for r in log if "prototypes" in r] == [0, 3]
    assert {r["type"] for r in losses} == {"train"} and {r["type"] for r in log} == {"train", "prototypes"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # --tensorboard: the same numbers
    labels = Counter(c for ids in [(15,), (8,), (15,), (5, 9, 11, 15)] for c in ids)
    assert log[0]["prototypes"]["features"] == [labels.get(c, 0) for c in range(1, 21)]
    assert (out / "checkpoints" / "last.pt").is_file()
    with safe_open(str(out / "prototypes.safetensors"), framework="pt") as fh:
        assert tuple(fh.get_tensor("image").shape) == (20, 2, 16)
        assert tuple(fh.get_tensor("text").shape) == (20, 16)
        assert tuple(fh.get_tensor("background").shape) == (25, 16)
        assert json.loads(fh.metadata()["classes"])[14] == "person"
    with safe_open(str(out / "heads.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ssr_cmpa_heads"])
        assert meta["config"]["dim"] == 16 and meta["clip"]["weights"] == sha
        assert tuple(fh.get_tensor("isa.proj.weight").shape) == (16, 32)

    # --resume is crash recovery, not "train longer"
    twelve = [("12" if prev == "--iters" else a) for prev, a in zip(["", *args], args, strict=False)]
    code, _, stderr = _main(capsys, _cli(tiny, *twelve, "--resume"))
    assert code == 1 and "--resume continues an interrupted run" in stderr, stderr
    assert len([x for x in stderr.splitlines() if x.strip()]) == 1
    code, _, stderr = _main(capsys, _cli(tiny, *args))
    assert code == 0 and "nothing to do" in stderr

    seeds = tmp_path / "seeds"
    code, _, stderr = _main(capsys, _cli(tiny, "--data", str(examples_voc), "--split", "train", "--out",
                                         str(seeds), "--cmpa", str(out), command="make-seeds"))  # fmt: skip
    assert code == 0, stderr
    seeds_manifest = json.loads((seeds / "manifest.json").read_text())
    assert seeds_manifest["completed"] and seeds_manifest["upstream"] == {"cmpa": manifest["fingerprint"]}
    assert len(list((seeds / "cams").glob("*.npz"))) == 4


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, tiny, examples_voc, capsys):
    from safetensors.torch import load_file

    from ssr_cli.errors import ArtefactError
    from ssr_cli.stages import train_cmpa

    common = ["--data", str(examples_voc), "--split", "train", *SMALL, "--iters", "40", "--proto-every", "9",
              "--proto-ema", "0.5", "--log-every", "1", "--save-every", "4", "--lr", "1e-3"]  # fmt: skip
    whole = tmp_path / "whole"
    code, _, stderr = _main(capsys, _cli(tiny, *common, "--out", str(whole)))
    assert code == 0, stderr

    killed = tmp_path / "killed"
    kill_when(
        _cli(tiny, *common, "--out", str(killed)),
        ENV,
        (killed / "checkpoints" / "last.pt").exists,
        timeout=120,
    )
    assert json.loads((killed / "manifest.json").read_text())["completed"] is False, "the kill came too late"

    # rerunning without --resume is refused (nothing is touched)
    same = {"iters": 40, "size": 64, "batch_size": 2, "dim": 16, "hidden": 16, "workers": 1, "proto_every": 9,
            "proto_ema": 0.5, "log_every": 1, "save_every": 4, "lr": 1e-3}  # fmt: skip
    opts = train_cmpa.CmpaOptions(data=examples_voc, out=killed, split="train", arch=tiny["arch"],
                                  weights=tiny["weights"], device="auto", train=same)  # fmt: skip
    with pytest.raises(ArtefactError, match="--resume"):
        train_cmpa.run(opts)

    code, _, stderr = _main(capsys, _cli(tiny, *common, "--out", str(killed), "--resume"))
    assert code == 0, stderr
    resumed_at = int(stderr.split("resuming")[1].split("at iteration")[1].split()[0])
    assert 4 <= resumed_at < 40
    a = [(r["iter"], r["loss"], r["temperature"]) for r in _log(whole) if "loss" in r]
    b = [(r["iter"], r["loss"], r["temperature"]) for r in _log(killed) if "loss" in r]
    assert [i for i, *_ in a] == list(range(1, 41)) and [i for i, *_ in b] == [i for i, *_ in a]
    for (it, la, ta), (_, lb, tb) in zip(a, b, strict=True):
        assert abs(la - lb) <= 1e-6 and abs(ta - tb) <= 1e-9, (it, la, lb)
    assert [r["iter"] for r in _log(killed) if "prototypes" in r] == [0, 9, 18, 27, 36]
    ha, hb = load_file(str(whole / "heads.safetensors")), load_file(str(killed / "heads.safetensors"))
    assert all(float((ha[k] - hb[k]).abs().max()) <= 1e-6 for k in ha)
    assert [p.name for p in killed.rglob("*") if ".tmp-" in p.name] == []


def test_torchrun_two_cpu_processes(tmp_path, tiny, examples_voc):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_cli(tiny, "--data", str(examples_voc), "--split", "train", "--out", str(out), *SMALL,
                 "--iters", "4", "--proto-every", "3", "--log-every", "1", "--save-every", "2",
                 "--check-sync-every", "2", "--device", "cpu", "--lr", "1e-2")[1:]]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] and manifest["config"]["world_size"] == 2
    assert manifest["fingerprint_basis"]["config"]["world_size"] == 2
    log = _log(out)
    # every rank computed its own parameter digest; rank 0 gathered them
    syncs = [r["sync"] for r in log if "sync" in r]
    assert len(syncs) == 2 and all(len(s["weights"]) == 2 and len(set(s["weights"])) == 1 for s in syncs)
    assert any(len(set(s["rank_losses"])) == 2 for s in syncs)  # the ranks trained on different images
    digests = manifest["summary"]["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and digests[0] != syncs[0]["weights"][0]
    # prototypes were collected over the whole split (each rank took half of it), then gathered
    labels = Counter(c for ids in [(15,), (8,), (15,), (5, 9, 11, 15)] for c in ids)
    refreshes = [r["prototypes"] for r in log if "prototypes" in r]
    assert len(refreshes) == 2 and all(
        r["features"] == [labels.get(c, 0) for c in range(1, 21)] for r in refreshes
    )
