"""Run folders: atomic writes, manifest, fingerprint refusal, resume, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli

from ssr_cli.artefacts import RunFolder, Shard, atomic_write, fingerprint, parse_shard, read_manifest
from ssr_cli.artefacts.atomic import remove_stale_temps, temp_path_for
from ssr_cli.errors import ArtefactError, ConfigError

pytestmark = pytest.mark.timeout(60)

IDS = [f"img{i:02d}" for i in range(7)]


def _open(root: Path, **kw):
    args = dict(
        stage="toy",
        item_dir="items",
        item_suffix=".txt",
        config={"alpha": 1, "workers": 2, "out": str(root)},
        result_config={"alpha": 1},
        ids=IDS,
    )
    args.update(kw)
    return RunFolder.open(root, **args)


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_leaves_no_partial_file(tmp_path):
    final = tmp_path / "x.bin"

    def boom(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(final, boom)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    atomic_write(final, lambda p: p.write_bytes(b"whole"))
    assert final.read_bytes() == b"whole"


def test_stale_temp_of_dead_process_is_removed_live_one_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    mine = temp_path_for(tmp_path / "a.npz")
    stale = Path(str(mine).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    stale.write_bytes(b"partial")
    live_other = Path(str(mine).replace(f"-{os.getpid()}-", "-1-"))  # pid 1 is alive
    live_other.write_bytes(b"in progress")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live_other.exists()


def test_manifest_resume_and_refusal(tmp_path):
    root = tmp_path / "run"
    run = _open(root)
    assert run.pending(IDS) == IDS
    for i in IDS[:3]:
        run.write_item(i, lambda p, i=i: p.write_text(i))
    man = run.finish(IDS)
    assert man["items_done"] == 3 and man["completed"] is False
    m = read_manifest(root)
    assert m["stage"] == "toy" and m["schema_version"] == 1 and m["item_count"] == 7
    assert m["config"]["workers"] == 2 and "workers" not in json.dumps(m["fingerprint_basis"])

    # same result config, different workers/paths: resumes
    run2 = _open(root, config={"alpha": 1, "workers": 8})
    assert run2.pending(IDS) == IDS[3:]
    for i in run2.pending(IDS):
        run2.write_item(i, lambda p, i=i: p.write_text(i))
    assert run2.finish(IDS)["completed"] is True

    # different result config: refused, nothing touched
    with pytest.raises(ArtefactError) as err:
        _open(root, result_config={"alpha": 2})
    assert "alpha" in str(err.value) and "--overwrite" in str(err.value)
    assert len(list((root / "items").iterdir())) == 7

    # different upstream: refused too
    with pytest.raises(ArtefactError):
        _open(root, upstream={"seeds": "abc"})

    # overwrite: starts again
    run3 = _open(root, result_config={"alpha": 2}, overwrite=True)
    assert run3.pending(IDS) == IDS


def test_refuses_foreign_folder_and_other_stage(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ArtefactError, match="not an ssr run folder"):
        _open(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    _open(tmp_path / "r")
    with pytest.raises(ArtefactError, match="'toy' run"):
        _open(tmp_path / "r", stage="other")


def test_corrupt_manifest_is_one_line_error(tmp_path):
    root = tmp_path / "r"
    _open(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtefactError) as err:
        _open(root)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)


def test_shards_cover_everything_once(tmp_path, monkeypatch):
    root = tmp_path / "r"
    seen = []
    for k in range(3):
        run = _open(root, shard=Shard(k, 3))
        mine = run.pending(IDS)
        seen += mine
        for i in mine:
            run.write_item(i, lambda p, i=i: p.write_text(i))
        man = run.finish(IDS)
    assert sorted(seen) == IDS
    assert man["completed"] is True
    assert [r["shard"] for r in read_manifest(root)["timing"]["runs"]] == ["0/3", "1/3", "2/3"]


def test_parse_shard(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) == Shard(0, 1)
    assert parse_shard("1/4") == Shard(1, 4)
    for bad in ("4/4", "x/2", "1", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == Shard(1, 2)
    assert parse_shard("0/3") == Shard(0, 3)  # the flag wins over the environment


def test_overwrite_of_one_shard_with_other_settings_removes_every_old_item(tmp_path):
    """--overwrite --shard i/n with new settings: no item of the old settings stays in the folder."""
    root = tmp_path / "run"
    for k in range(2):  # a complete run with alpha 1, made by two shards
        run = _open(root, shard=Shard(k, 2))
        for i in run.pending(IDS):
            run.write_item(i, lambda p, i=i: p.write_text(f"alpha1 {i}"))
        run.finish(IDS)
    new = _open(root, result_config={"alpha": 2}, shard=Shard(0, 2), overwrite=True)
    assert new.pending(IDS) == IDS[0::2] and not any((root / "items").iterdir())
    for i in new.pending(IDS):
        new.write_item(i, lambda p, i=i: p.write_text(f"alpha2 {i}"))
    assert new.finish(IDS)["completed"] is False
    other = _open(root, result_config={"alpha": 2}, shard=Shard(1, 2))  # shard 1, new settings
    assert other.pending(IDS) == IDS[1::2]
    for i in other.pending(IDS):
        other.write_item(i, lambda p, i=i: p.write_text(f"alpha2 {i}"))
    assert other.finish(IDS)["completed"] is True
    assert sorted(p.read_text() for p in (root / "items").iterdir()) == [f"alpha2 {i}" for i in IDS]
    # the same settings with --overwrite for one shard only redoes that shard
    again = _open(root, result_config={"alpha": 2}, shard=Shard(1, 2), overwrite=True)
    assert again.pending(IDS) == IDS[1::2] and len(list((root / "items").iterdir())) == 4


def test_a_run_replaced_while_running_writes_nothing_more(tmp_path):
    root = tmp_path / "run"
    old = _open(root)
    old.write_item(IDS[0], lambda p: p.write_text("old"))
    new = _open(root, result_config={"alpha": 2}, overwrite=True)
    with pytest.raises(ArtefactError, match="replaced this run folder"):
        old.write_item(IDS[1], lambda p: p.write_text("old"))
    with pytest.raises(ArtefactError, match="replaced this run folder"):
        old.finish(IDS)
    assert not any((root / "items").iterdir())
    assert read_manifest(root)["fingerprint"] == new.manifest["fingerprint"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("garbage", [b'{"stage": "toy", trunc', b"\x00\xff" * 10, b"[1, 2]", b""])
def test_unreadable_manifest_is_replaced_only_with_overwrite(tmp_path, garbage):
    root = tmp_path / "run"
    run = _open(root)
    for i in IDS:
        run.write_item(i, lambda p, i=i: p.write_text(i))
    run.finish(IDS)
    (root / "metrics.json").write_text("{}")
    (root / "manifest.json").write_bytes(garbage)
    with pytest.raises(ArtefactError, match="--overwrite"):
        _open(root)
    assert len(list((root / "items").iterdir())) == len(IDS)  # nothing touched
    new = _open(root, shard=Shard(1, 2), overwrite=True)
    assert new.pending(IDS) == IDS[1::2] and not any((root / "items").iterdir())
    assert read_manifest(root)["fingerprint"] == new.manifest["fingerprint"]


def test_unreadable_manifest_in_a_folder_with_other_files_is_never_replaced(tmp_path):
    root = tmp_path / "run"
    _open(root).write_item(IDS[0], lambda p: p.write_text("x"))
    (root / "thesis.tex").write_text("precious")
    (root / "manifest.json").write_text("not json")
    with pytest.raises(ArtefactError, match="thesis.tex"):
        _open(root, overwrite=True)
    assert (root / "thesis.tex").read_text() == "precious" and (root / "items" / f"{IDS[0]}.txt").is_file()
    assert (root / "manifest.json").read_text() == "not json"


def test_training_run_with_unreadable_manifest(tmp_path):
    from ssr_cli.artefacts.training import prepare_training_run

    out = tmp_path / "train"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    (out / "manifest.json").write_text("{broken")
    basis = {"config": {"train": {"iters": 5}}}
    kw = dict(stage="toy-train", basis=basis, resume=False, outputs=("checkpoints", "log.jsonl"), final="x")
    with pytest.raises(ArtefactError, match="unreadable manifest"):
        prepare_training_run(out, overwrite=False, **kw)
    assert prepare_training_run(out, overwrite=True, **kw) == "fresh"
    assert not (out / "checkpoints").exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "rank, world",
    [("5", "2"), ("0", "0"), ("-1", "2"), ("a", "2"), ("1", None), (None, "2"), ("2", "2"), ("0", "-3")],
)
def test_shard_from_the_environment_is_checked(monkeypatch, rank, world):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="RANK"):
        parse_shard(None)


def test_bad_shards_through_the_cli(tmp_path, monkeypatch, capsys):
    """A malformed --shard is a usage error (exit 2); bad RANK/WORLD_SIZE one line, exit 1."""
    import ssr_cli.cli.refine_cmd  # noqa: F401

    def run(*args: str) -> tuple[int, str]:
        code, _, err = run_cli(list(args), capsys)
        return code, err

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for command in (["make-seeds", "--data", "x", "--out", str(tmp_path / "o")], ["refine", "--seeds", "x"]):
        for bad in ("2/2", "a/b", "1", "0/0"):
            code, err = run(*command, "--shard", bad)
            assert code == 2 and "--shard" in err, (command, bad, err)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run(
        "make-seeds", "--data", "examples/voc", "--out", str(tmp_path / "o"), "--clip-weights", "random"
    )
    assert code == 1 and err.startswith("ssr: error:") and "RANK" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "0"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "2", "RANK": "7"}])
def test_training_checks_torchrun_variables(monkeypatch, env):
    import torch

    from ssr_cli.train.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        init_distributed(torch.device("cpu"))


def test_a_shard_whose_item_folder_was_replaced_says_so(tmp_path):
    """A shard still running with the old settings when another one overwrites the run with new ones:
    its next write fails with the reason, not with a bare "no such file"."""
    root = tmp_path / "run"
    old = _open(root, shard=Shard(0, 2))
    old.write_item(IDS[0], lambda p: p.write_text("old"))
    _open(root, result_config={"alpha": 2}, shard=Shard(1, 2), overwrite=True)
    (root / "items").rmdir()  # the new run has not written anything yet
    with pytest.raises(ArtefactError, match="replaced this run folder"):
        old.write_item(IDS[2], lambda p: p.write_text("old"))
    assert not (root / "items").exists() or not any((root / "items").iterdir())


def test_open_run_gives_one_typed_view_of_every_run(tmp_path: Path) -> None:
    import json

    from ssr_cli.artefacts.manifest import Manifest, open_run
    from ssr_cli.errors import ArtefactError

    run = tmp_path / "seeds"
    run.mkdir()
    manifest = {"schema_version": 1, "tool": "ssr-cli", "stage": "seeds", "fingerprint": "f" * 16,
                "completed": True, "inputs": {"dataset": {"split": "train"}}}  # fmt: skip
    (run / "manifest.json").write_text(json.dumps(manifest))
    opened = open_run(run, "seeds")
    assert isinstance(opened, Manifest) and opened.stage == "seeds" and opened.completed
    # a manifest without item_dir (an older run): the stage's folder, in one place for every reader
    assert opened.item_path("a/b") == run / "cams" / "a/b.npz"
    assert opened.dataset == {"split": "train"}
    (run / "manifest.json").write_text(json.dumps({**manifest, "item_dir": "x", "item_suffix": ".npz"}))
    assert open_run(run).item_path("i") == run / "x" / "i.npz"
    with pytest.raises(ArtefactError) as err:
        open_run(run, ("refine", "predict"), option="--pseudo")
    text = str(err.value)
    assert "'seeds' run, not a refine or a predict run" in text
    assert "ssr refine or ssr predict to --pseudo" in (err.value.hint or "")
