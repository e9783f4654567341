"""Start-up without torch where nothing needs it (issue 15 item 3).

``ssr weights``, a missing-weights error and the rerun of a complete make-seeds run answer
before torch, open_clip or timm are imported; the tables that make this possible match
open_clip, timm and torch (so they cannot drift silently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tinymodels import TINY_CLIP, make_pets_project

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys\n"
    "from ssr_cli.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
    "heavy = sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules)\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def ssr(args: list[object], cwd: Path, **env: str) -> tuple[int, str, str, list[str]]:
    """Run ``ssr ARGS`` in a fresh interpreter; returns (code, stdout, stderr, heavy modules loaded)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    heavy_line = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")][-1]
    heavy = [m for m in heavy_line[len("HEAVY=") :].split(",") if m]
    return done.returncode, done.stdout, done.stderr, heavy


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pets_project(tmp_path_factory.mktemp("startup"), images=4)


SEEDS = ["make-seeds", "--data", "data", "--out", "runs/seeds", "--clip-arch", "tiny.json",
         "--clip-weights", "tiny.safetensors", "--device", "cpu"]  # fmt: skip


def test_a_complete_run_reruns_without_torch(project: Path) -> None:
    assert TINY_CLIP  # the architecture named in tiny.json
    code, _, err, heavy = ssr(SEEDS, project)
    assert code == 0, err
    assert "torch" in heavy  # the first run computes
    manifest = json.loads((project / "runs/seeds/manifest.json").read_text())
    assert manifest["completed"] and manifest["quick_rerun"]["key"]
    code, _, err, heavy = ssr(SEEDS, project)
    assert code == 0, err
    assert heavy == [] and "nothing to do" in err
    # an option outside the results' fingerprint still takes the full path (which finds it done)
    code, _, err, heavy = ssr([*SEEDS, "--batch-size", "2"], project)
    assert code == 0, err
    assert "torch" in heavy and "nothing to do" not in err and "4 already done" in " ".join(err.split())
    # a rewritten item file is not trusted: the full path checks it, and redoes a broken one
    item = project / "runs/seeds/cams/p1.npz"
    item.write_bytes(b"garbage")
    code, _, err, heavy = ssr(SEEDS, project)
    assert code == 0, err
    assert "torch" in heavy and "cannot be read and will be redone" in " ".join(err.split())
    with np.load(item) as seed:
        assert "cams" in seed.files
    code, _, err, heavy = ssr(SEEDS, project)
    assert code == 0 and heavy == [], err
    # a touched image changes the dataset fingerprint: the full path refuses the run
    os.utime(project / "data/images/p2.jpg", ns=(1, 1))
    code, _, err, heavy = ssr(SEEDS, project)
    assert code == 1 and "torch" in heavy and "different settings or inputs" in err


def test_missing_weights_fail_without_torch(project: Path) -> None:
    args = ["make-seeds", "--data", "data", "--out", "runs/none", "--device", "cpu"]
    code, stdout, err, heavy = ssr(args, project, SSR_CACHE=str(project / "empty-cache"))
    assert code == 1 and stdout == "" and heavy == []
    assert err.splitlines()[0].startswith("ssr: error: no local clip weights for ViT-B-16")


def test_weights_listing_without_torch(project: Path) -> None:
    code, stdout, err, heavy = ssr(["weights"], project, SSR_CACHE=str(project / "empty-cache"))
    assert code == 0, err
    assert heavy == [] and stdout.count("MISSING") == 3


def test_tables_match_open_clip_timm_and_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import open_clip
    import torch

    from ssr_cli.models.backbone_weights import hub_files
    from ssr_cli.models.sources import OPENAI_CLIP, TIMM_HUB, torch_hub_dir

    openai = {a for a in open_clip.list_models() if "openai" in open_clip.list_pretrained_tags_by_model(a)}
    assert set(OPENAI_CLIP) == openai
    for arch, cfg in OPENAI_CLIP.items():
        real = open_clip.get_pretrained_cfg(arch, "openai")
        assert cfg == {"url": real["url"], "hf_hub": real["hf_hub"]}, arch
    for name, (repo, files) in TIMM_HUB.items():
        assert hub_files(name) == (repo, files), name
    assert torch_hub_dir() == Path(torch.hub.get_dir())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert torch_hub_dir() == Path(torch.hub.get_dir()) == tmp_path / "th" / "hub"


def test_a_complete_refine_reruns_without_torch(project: Path) -> None:
    code, _, err, _ = ssr([*SEEDS, "--overwrite"], project)  # (an earlier test touched an image)
    assert code == 0, err
    refine = ["refine", "--seeds", "runs/seeds", "--out", "runs/refine", "--affinity", "clip", "--mask",
              "none", "--no-crf", "--workers", "0", "--device", "cpu"]  # fmt: skip
    code, _, err, heavy = ssr(refine, project)
    assert code == 0 and "torch" in heavy, err
    code, _, err, heavy = ssr(refine, project)
    assert code == 0 and heavy == [] and "nothing to do" in err, err
    code, _, err, heavy = ssr([*refine, "--conf-thresh", "0.9"], project)  # another setting: the full path
    assert code == 1 and "torch" in heavy and "different settings" in err
    # the DINO affinity without DINO weights: one line, before torch
    code, _, err, heavy = ssr(
        [*refine[:4], "runs/refine-dino"], project, SSR_CACHE=str(project / "empty-cache")
    )
    assert code == 1 and heavy == [] and err.startswith("ssr: error: no local dino weights for dino_vitb16")


def test_a_complete_predict_reruns_without_torch(project: Path) -> None:
    from ssr_cli.seg.synthetic import make_shapes_dataset

    make_shapes_dataset(project / "shapes", {"train": 3}, size=(40, 48), seed=2)
    fit = ["fit-seg", "--data", "shapes", "--split", "train", "--pseudo", "shapes/masks", "--out", "runs/seg",
           "--backbone", "resnet10t", "--no-pretrained", "--aspp-channels", "16", "--crop-size", "32",
           "--batch-size", "2", "--iters", "2", "--device", "cpu", "--workers", "0"]  # fmt: skip
    code, stdout, err, heavy = ssr(fit, project)
    assert code == 0 and "torch" in heavy, err
    first_line = stdout
    code, stdout, err, heavy = ssr(fit, project)  # the complete training run: nothing to do, no torch
    assert code == 0 and heavy == [] and "nothing to do" in err and stdout == first_line, err
    code, _, err, heavy = ssr([*fit, "--iters", "3"], project)  # another setting
    assert code == 1 and "torch" in heavy and "--overwrite" in err
    (project / "shapes/masks/train_0000.png").touch()  # a touched pseudo-label: the full path checks it
    code, _, err, heavy = ssr(fit, project)  # (by content: unchanged, so still done)
    assert code == 0 and "torch" in heavy and "nothing to do" in err, err
    predict = ["predict", "--model", "runs/seg", "--data", "shapes", "--split", "train", "--out", "runs/pred",
               "--device", "cpu", "--workers", "0"]  # fmt: skip
    code, _, err, heavy = ssr(predict, project)
    assert code == 0 and "torch" in heavy, err
    code, _, err, heavy = ssr(predict, project)
    assert code == 0 and heavy == [] and "3 already done" in err and "nothing to do" in err, err
    code, stdout, err, _ = ssr(["eval", "runs/pred", "--json"], project)  # GT: the dataset predict recorded
    assert code == 0 and json.loads(stdout)["summary"]["images"] == 3, err
    code, _, err, heavy = ssr([*predict, "--flip"], project)  # another setting: the full path refuses
    assert code == 1 and "torch" in heavy and "--overwrite" in err

    # a plain folder of images (--images): the same quick rerun, and a new image is noticed
    images = ["predict", "--model", "runs/seg", "--images", "shapes/images", "--out", "runs/pred-folder",
              "--device", "cpu", "--workers", "0"]  # fmt: skip
    code, _, err, heavy = ssr(images, project)
    assert code == 0 and "torch" in heavy, err
    code, _, err, heavy = ssr(images, project)
    assert code == 0 and heavy == [] and "nothing to do" in err, err
    Image.new("RGB", (40, 48)).save(project / "shapes/images/extra.png")
    code, _, err, heavy = ssr(images, project)
    assert "torch" in heavy and "nothing to do" not in err


def test_a_complete_cmpa_run_reruns_without_torch(project: Path) -> None:
    cmpa = ["train-cmpa", "--data", "data", "--out", "runs/cmpa", "--clip-arch", "tiny.json",
            "--clip-weights", "tiny.safetensors", "--iters", "2", "--batch-size", "2", "--dim", "16",
            "--size", "32", "--init-images", "2", "--device", "cpu", "--workers", "0"]  # fmt: skip
    code, stdout, err, heavy = ssr([*cmpa, "--overwrite"], project)
    assert code == 0 and "torch" in heavy, err
    first_line = stdout
    code, stdout, err, heavy = ssr(cmpa, project)
    assert code == 0 and heavy == [] and "nothing to do" in err and stdout == first_line, err
    (project / "runs/cmpa/heads.safetensors").touch()  # a rewritten output: the full path checks
    code, _, err, heavy = ssr(cmpa, project)
    assert code == 0 and "torch" in heavy and "nothing to do" in err, err
    code, _, err, heavy = ssr(cmpa, project)  # remembered again by the full path
    assert code == 0 and heavy == [], err
    code, _, err, heavy = ssr([*cmpa, "--lr", "0.5"], project)  # another setting: the full path refuses
    assert code == 1 and "torch" in heavy and "--overwrite" in err
