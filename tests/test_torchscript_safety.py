"""A hostile TorchScript archive never runs code, on every path that loads CLIP weights.

The archive is real: a module scripted with ``torch.jit.script`` whose exported
``__setstate__`` writes a file, saved with ``torch.jit.save``. The first test proves
that ``torch.jit.load`` does run it (so the other tests would notice if we did).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from tinymodels import TINY_CLIP, make_tiny_clip, register_tiny_clip, save_tiny_clip

import ssr_cli.cli.weights_cmd  # noqa: F401  (registers the sub-app before main runs)
from ssr_cli.errors import WeightsError

pytestmark = pytest.mark.timeout(180)


def _hostile_module(target: str) -> torch.nn.Module:
    class Payload(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))
            self.target = target

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
            return (self.weight, self.target, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
            self.weight = state[0]
            self.target = state[1]
            self.training = state[2]
            torch.save(torch.zeros(1), self.target)  # the "attack": writes a file

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = Payload()
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    return Outer()


def save_hostile_archive(path: Path, target: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_hostile_module(str(target))), str(path))
    return path


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """(archive, the file its __setstate__ writes); the file does not exist yet."""
    target = tmp_path / "written-by-archive"
    return save_hostile_archive(tmp_path / "ViT-B-16.pt", target), target


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "ssr-cache"
    monkeypatch.setenv("SSR_CACHE", str(cache))
    for var in ("HF_HOME", "HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SSR_CLIP_WEIGHTS", raising=False)
    register_tiny_clip()
    return cache


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_cli(argv, capsys)


def test_the_archive_is_hostile_under_torch_jit_load(hostile: tuple[Path, Path]) -> None:
    archive, target = hostile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(archive))
    assert target.is_file()  # torch.jit.load ran the archive's __setstate__


def test_read_state_dict_refuses_it_without_running_it(hostile: tuple[Path, Path]) -> None:
    from ssr_cli.models.weights import read_state_dict

    archive, target = hostile
    with pytest.raises(WeightsError, match="__setstate__") as caught:
        read_state_dict(archive, kind="CLIP")
    assert "torch.save" in caught.value.one_line() and "\n" not in caught.value.one_line()
    assert not target.exists()


@pytest.mark.parametrize("how", ["flag", "folder", "env", "cache"])
def test_load_clip_never_runs_it(
    how: str, hostile: tuple[Path, Path], env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssr_cli.models.clip import load_clip

    archive, target = hostile
    weights: str | None = None
    if how == "flag":
        weights = str(archive)
    elif how == "folder":
        weights = str(archive.parent)
    elif how == "env":
        monkeypatch.setenv("SSR_CLIP_WEIGHTS", str(archive))
    else:
        cached = env / "weights" / "clip" / f"{TINY_CLIP}.pt"
        cached.parent.mkdir(parents=True)
        cached.write_bytes(archive.read_bytes())
    with pytest.raises(WeightsError, match="TorchScript archive"):
        load_clip(TINY_CLIP, weights)
    assert not target.exists()


def test_make_seeds_cli_is_a_one_line_error(
    hostile: tuple[Path, Path], env: Path, examples_voc: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    archive, target = hostile
    base = ["make-seeds", "--data", str(examples_voc), "--split", "train", "--clip-arch", TINY_CLIP]
    code, _out, err = run([*base, "--out", str(tmp_path / "a"), "--clip-weights", str(archive)], capsys)
    assert code == 1 and err.count("ssr: error:") == 1 and str(archive) in err, err
    monkeypatch.setenv("SSR_CLIP_WEIGHTS", str(archive))
    code, _out, err = run([*base, "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "__setstate__" in err, err
    assert not target.exists()


def test_weights_add_checks_the_hash_first_and_never_runs_it(
    hostile: tuple[Path, Path], env: Path, capsys
) -> None:
    archive, target = hostile
    # a known model: the SHA-256 differs from OpenAI's, refused before anything is read
    code, _out, err = run(["weights", "add", "clip", str(archive)], capsys)
    assert code == 1 and "SHA-256" in err, err
    # --force skips the hash, not the safety
    code, _out, err = run(["weights", "add", "clip", str(archive), "--force"], capsys)
    assert code == 1 and "__setstate__" in err and "torch.save" in err, err
    code, _out, err = run(["weights", "add", "clip", str(archive), "--name", TINY_CLIP], capsys)
    assert code == 1 and "__setstate__" in err, err
    assert not target.exists()
    assert not any(p.is_file() for p in env.rglob("*"))  # nothing cached


def test_foreign_globals_in_data_pkl_are_refused(tmp_path: Path) -> None:
    """An archive whose data.pkl calls os.system is refused; the command never runs."""
    from ssr_cli.models.weights import read_state_dict, sniff_format

    target = tmp_path / "os-system-ran"
    source = save_tiny_clip(make_tiny_clip(), tmp_path / "jit.pt", "openai-torchscript")
    payload = b"cos\nsystem\n(S'touch " + str(target).encode() + b"'\ntR."
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    assert sniff_format(crafted) == "torchscript"
    with pytest.raises(WeightsError, match="os.system"):
        read_state_dict(crafted, kind="CLIP")
    assert not target.exists()


def test_official_layout_archive_loads_identically_to_torch_jit_load(tmp_path: Path) -> None:
    """Our reader gives exactly torch.jit.load's state dict (keys, dtypes, values)."""
    from ssr_cli.models.weights import read_state_dict

    path = save_tiny_clip(make_tiny_clip(seed=2), tmp_path / "jit.pt", "openai-torchscript")
    ours, fmt = read_state_dict(path, kind="CLIP")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert fmt == "torchscript" and set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_traced_archive_loads_identically(tmp_path: Path) -> None:
    """Traced modules (another way OpenAI-style archives are made) read the same."""
    from ssr_cli.models.weights import read_state_dict

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    module[1].running_mean.uniform_()
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.half().float(), torch.randn(1, 3, 8, 8))
        traced.save(str(path))
        theirs = torch.jit.load(str(path)).state_dict()
    ours, _fmt = read_state_dict(path)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("kind", ["dino", "backbone"])
def test_other_weights_kinds_refuse_it_too(hostile: tuple[Path, Path], env: Path, capsys, kind: str) -> None:
    """DINO and backbone weights are read with torch.load(weights_only=True), which refuses archives."""
    archive, target = hostile
    code, _out, err = run(["weights", "add", kind, str(archive), "--force"], capsys)
    assert code == 1 and err.count("\n") == 1 and "TorchScript archive" in err, err
    assert not target.exists()


def test_train_cmpa_and_refine_never_run_it(
    hostile: tuple[Path, Path], env: Path, examples_voc: Path, tmp_path: Path, capsys
) -> None:
    """The other stages that load CLIP: train-cmpa, and refine when it recomputes CLIP's attention."""
    import ssr_cli.cli.cmpa_cmd  # noqa: F401  (registers train-cmpa)
    import ssr_cli.cli.refine_cmd  # noqa: F401  (registers refine)

    archive, target = hostile
    data = ["--data", str(examples_voc), "--split", "train"]
    code, _out, err = run(
        ["train-cmpa", *data, "--out", str(tmp_path / "cmpa"), "--clip-arch", TINY_CLIP, "--clip-weights",
         str(archive)], capsys,
    )  # fmt: skip
    assert code == 1 and "__setstate__" in err and err.count("\n") == 1, err
    seeds = tmp_path / "seeds"
    weights = save_tiny_clip(make_tiny_clip(), tmp_path / "tiny.safetensors", "safetensors")
    code, _out, err = run(
        ["make-seeds", *data, "--out", str(seeds), "--clip-arch", TINY_CLIP, "--clip-weights", str(weights),
         "--no-save-attn"], capsys,
    )  # fmt: skip
    assert code == 0, err
    code, _out, err = run(
        ["refine", "--seeds", str(seeds), "--out", str(tmp_path / "refine"), "--affinity", "clip", "--mask",
         "box", "--no-crf", "--workers", "0", "--clip-weights", str(archive)], capsys,
    )  # fmt: skip
    assert code == 1 and "not the seeds'" in err and err.count("\n") == 1, err  # hash checked before reading
    assert not target.exists()
