"""``ssr weights``: status of every model's weights, and ``ssr weights add`` into the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import run_cli
from tinymodels import TINY_CLIP, make_tiny_clip, register_tiny_clip, save_tiny_clip

import ssr_cli.cli.weights_cmd  # noqa: F401  (registers the sub-app before main runs)
from ssr_cli.errors import WeightsError

pytestmark = pytest.mark.timeout(120)
OPENAI_B16 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SSR cache; the real user caches are hidden."""
    root = tmp_path / "ssr-cache"
    monkeypatch.setenv("SSR_CACHE", str(root))
    for var in ("HF_HOME", "HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("SSR_CLIP_WEIGHTS", "SSR_DINO_WEIGHTS", "SSR_BACKBONE_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    register_tiny_clip()
    return root


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(
        make_tiny_clip(), tmp_path_factory.mktemp("tiny") / "tiny.safetensors", "safetensors"
    )


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_cli(argv, capsys)


def status_rows(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, dict]:
    code, out, err = run(["weights", "show", "--json", *extra], capsys)
    assert code == 0, err
    return {row["kind"]: row for row in json.loads(out)}


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_show_reports_missing_with_what_to_do(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = status_rows(capsys)
    assert set(rows) == {"clip", "dino", "backbone"}
    clip = rows["clip"]
    assert clip["model"] == "ViT-B-16" and clip["origin"] == "missing" and clip["path"] is None
    assert clip["expected"][0] == "ViT-B-16.pt"
    assert OPENAI_B16 in clip["action"] and "ssr weights add clip ~/Downloads/ViT-B-16.pt" in clip["action"]
    assert rows["dino"]["expected"][0] == "dino_vitbase16_pretrain.pth"
    assert rows["backbone"]["expected"] == ["resnet101.safetensors", "resnet101.pth"]
    assert all(row["origin"] == "missing" for row in rows.values())
    # the table (no subcommand) shows the same
    code, out, _err = run(["weights"], capsys)
    assert code == 0 and out.count("MISSING") == 3 and "backbone: resnet101" in out


def test_env_var_is_reported(cache: Path, capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SSR_DINO_WEIGHTS", "random")
    monkeypatch.setenv("SSR_BACKBONE_WEIGHTS", str(tmp_path / "nope.pth"))
    rows = status_rows(capsys)
    assert rows["dino"]["origin"] == "random"
    assert rows["backbone"]["origin"] == "error" and "nope.pth" in rows["backbone"]["action"]
    assert rows["clip"]["origin"] == "missing"


def test_add_tiny_clip_then_found_in_cache(
    cache: Path, tiny_clip_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssr_cli.models.clip import clip_weights_source
    from ssr_cli.models.weights import file_sha256_cached, weights_cache_dir

    before = status_rows(capsys, "--clip-arch", TINY_CLIP)["clip"]
    assert before["origin"] == "missing" and f"--name {TINY_CLIP}" in before["action"]
    code, out, err = run(
        ["weights", "add", "clip", str(tiny_clip_file), "--name", TINY_CLIP, "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    dest = weights_cache_dir("clip") / f"{TINY_CLIP}.safetensors"
    assert result["destination"] == str(dest) and result["copied"] is True
    assert result["format"] == "safetensors" and result["sha256_check"] == "unknown"
    assert file_sha256_cached(dest) == file_sha256_cached(tiny_clip_file)
    after = status_rows(capsys, "--clip-arch", TINY_CLIP)["clip"]
    assert after["origin"] == "cache" and after["path"] == str(dest)
    source = clip_weights_source(TINY_CLIP, None)
    assert source.origin == "cache" and source.path == dest
    # adding the same file again changes nothing
    code, out, err = run(
        ["weights", "add", "clip", str(tiny_clip_file), "--name", TINY_CLIP, "--json"], capsys
    )
    assert code == 0 and json.loads(out)["copied"] is False, err


def test_corrupted_file_is_refused(cache: Path, tiny_clip_file: Path, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(tiny_clip_file.read_bytes()[: tiny_clip_file.stat().st_size // 2])
    code, out, err = run(["weights", "add", "clip", str(bad), "--name", TINY_CLIP], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssr: error: ") and str(bad) in lines[0]
    assert cached_files(cache) == []


def test_wrong_architecture_is_refused(cache: Path, tiny_clip_file: Path, capsys) -> None:
    code, _out, err = run(["weights", "add", "backbone", str(tiny_clip_file), "--name", "resnet18"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "do not fit backbone" in err
    assert cached_files(cache) == []


def test_sha256_check_of_known_files(tmp_path: Path) -> None:
    from ssr_cli.stages.weights import check_sha256, official_sha256

    assert official_sha256("clip", "ViT-B-16") == ("torchscript", OPENAI_B16, "OpenAI's ViT-B-16.pt")
    # other OpenAI archives: read from open_clip's URL
    fmt, sha, _what = official_sha256("clip", "ViT-L-14") or ("", "", "")
    assert fmt == "torchscript" and len(sha) == 64 and sha != OPENAI_B16
    other = "0" * 64
    with pytest.raises(WeightsError, match="--force") as info:
        check_sha256("clip", "ViT-B-16", other, "torchscript", path=tmp_path / "x.pt", force=False)
    assert "x.pt" in str(info.value) and "\n" not in str(info.value)
    assert check_sha256("clip", "ViT-B-16", other, "torchscript", path="x", force=True) == "mismatch-forced"
    assert check_sha256("clip", "ViT-B-16", OPENAI_B16, "torchscript", path="x", force=False) == "verified"
    # open_clip's own safetensors of ViT-B-16 has no official value here
    assert check_sha256("clip", "ViT-B-16", other, "safetensors", path="x", force=False) == "unknown"


def test_known_hash_mismatch_refused_then_forced(
    cache: Path, tiny_clip_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssr_cli.stages import weights as stage

    table = dict(stage.KNOWN_SHA256)
    table[("clip", TINY_CLIP)] = ("safetensors", "f" * 64, "the official tiny file")
    monkeypatch.setattr(stage, "KNOWN_SHA256", table)
    args = ["weights", "add", "clip", str(tiny_clip_file), "--name", TINY_CLIP]
    code, _out, err = run(args, capsys)
    assert code == 1 and "the official tiny file" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and cached_files(cache) == []
    code, out, err = run([*args, "--force", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["sha256_check"] == "mismatch-forced" and "--force" in err
    assert len(cached_files(cache)) == 1


def test_add_backbone_and_replace_needs_force(
    cache: Path, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    from ssr_cli.models.backbone_weights import resolve_backbone_state

    def save(seed: int, path: Path, fmt: str) -> Path:
        torch.manual_seed(seed)
        state = timm.create_model("resnet18", pretrained=False).state_dict()
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        return path

    first = save(0, tmp_path / "a.pth", "torch")
    code, out, err = run(["weights", "add", "backbone", str(first), "--name", "resnet18", "--json"], capsys)
    assert code == 0, err
    assert Path(json.loads(out)["destination"]).name == "resnet18.pth"
    _state, source = resolve_backbone_state("resnet18")
    assert source.origin == "cache" and source.path is not None and source.path.name == "resnet18.pth"
    # a safetensors file would be picked before resnet18.pth: only with --force, which removes the old one
    second = save(1, tmp_path / "b.safetensors", "safetensors")
    args = ["weights", "add", "backbone", str(second), "--name", "resnet18"]
    code, _out, err = run(args, capsys)
    assert code == 1 and "--force" in err
    code, _out, err = run([*args, "--force"], capsys)
    assert code == 0, err
    assert [p.name for p in cached_files(cache)] == ["resnet18.safetensors"]
    rows = status_rows(capsys, "--backbone", "resnet18")
    assert rows["backbone"]["origin"] == "cache" and rows["backbone"]["path"].endswith("resnet18.safetensors")


@pytest.mark.parametrize("columns", [80, 50])
def test_urls_are_never_broken_at_narrow_widths(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    """Download URLs and the add command each stay whole on one line (issue 15 item 7)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    rows = status_rows(capsys)
    code, out, _err = run(["weights"], capsys)
    assert code == 0
    lines = [line.strip() for line in out.splitlines()]
    urls = [w.rstrip(",") for row in rows.values() for w in row["action"].split() if w.startswith("https://")]
    assert any(OPENAI_B16 in url for url in urls) and len(urls) == 3
    for url in urls:
        assert url in lines  # a line of its own, unbroken
    if columns >= 80:  # the command to copy on one line
        assert "then ssr weights add clip ~/Downloads/ViT-B-16.pt" in lines
    for line in out.splitlines():  # everything else fits, except one word (a path) too long to fit
        assert len(line) <= columns or len(line.split()[-1]) > columns - 12, line
