"""`ssr data synth`: the proving ground's generator (layout, determinism, the failure modes it builds in)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from clirun import run_cli
from PIL import Image

from ssr_cli.data.synth import (
    BACKGROUNDS,
    BOUNDARY,
    CLASSES,
    COOCCURRENCE,
    LOOK_ALIKES,
    generate,
    render_scene,
)

pytestmark = pytest.mark.timeout(120)


def test_command_writes_a_custom_layout_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    args = ["data", "synth", "--out", out, "--images", 20, "--seed", 3, "--size-range", "150,230"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    ids = [f"s{i:05d}" for i in range(20)]
    assert sorted(p.stem for p in (out / "images").iterdir()) == ids
    assert sorted(p.stem for p in (out / "masks").iterdir()) == ids
    train = (out / "splits" / "train.txt").read_text().split()
    val = (out / "splits" / "val.txt").read_text().split()
    assert sorted(train + val) == ids and val == ids[-4:]  # the default 20% val, the last images
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["classes"] == list(CLASSES) and len(CLASSES) >= 6
    assert vocab["background"] == list(BACKGROUNDS)
    rows = [
        line.split() for line in (out / "labels.txt").read_text().splitlines() if not line.startswith("#")
    ]
    sizes = []
    for image_id, *names in rows:
        mask_png = Image.open(out / "masks" / f"{image_id}.png")
        assert mask_png.mode == "P"  # VOC-style palette PNG
        mask = np.asarray(mask_png)
        image = np.asarray(Image.open(out / "images" / f"{image_id}.jpg"))
        assert image.shape[:2] == mask.shape and image.dtype == np.uint8
        assert 150 <= min(mask.shape) and max(mask.shape) <= 230
        sizes += list(mask.shape)
        present = {CLASSES[v - 1] for v in np.unique(mask) if 0 < v < BOUNDARY}
        assert set(names) == present and 1 <= len(names) <= 3, image_id
        if names:  # objects carry a 255 band on their boundary
            assert (mask == BOUNDARY).any()
    assert any(side % 16 for side in sizes)  # sizes are not all multiples of the patch


def test_scenes_are_pure_functions_of_seed_and_index(tmp_path: Path) -> None:
    first, again = render_scene(5, 7), render_scene(5, 7)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.caption == again.caption and first.background == again.background
    assert not np.array_equal(render_scene(6, 7).image, first.image)
    # any subset regenerates exactly: the written image 7 of a world is render_scene(seed, 7)
    list(generate(tmp_path / "a", 10, seed=5))
    scene = render_scene(5, 7)
    written = np.asarray(Image.open(tmp_path / "a" / "masks" / "s00007.png"))
    assert np.array_equal(written, scene.mask)


def test_the_failure_modes_exist_by_construction() -> None:
    scenes = [render_scene(11, i) for i in range(160)]
    # co-occurrence: boats mostly on water, trains mostly on railway
    for name, (background, probability) in COOCCURRENCE.items():
        with_class = [s.background for s in scenes if name in s.classes]
        share = Counter(with_class)[background] / len(with_class)
        assert share > probability - 0.2, (name, share)
        others = [s.background for s in scenes if name not in s.classes]
        assert Counter(others)[background] / len(others) < 0.3  # the background words name those textures
    # look-alikes: each pair appears, on their own and together
    seen = Counter(name for s in scenes for name in s.classes)
    for a, b in LOOK_ALIKES:
        assert seen[a] > 10 and seen[b] > 10
    # structures finer than the 16-pixel grid: some object is under 4 pixels wide somewhere
    thin = 0
    for scene in scenes[:40]:
        obj = (scene.mask > 0) & (scene.mask != BOUNDARY)
        opened = cv2.morphologyEx(obj.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        thin += int((obj & (opened == 0)).sum() > 20)
    assert thin > 10


def test_class_evidence_is_a_badge_on_a_large_body() -> None:
    """The partial-activation failure mode: an object's class shows strongly in its badge, a
    minority of its pixels, and only faintly in its body; objects span many patch cells, so a
    CAM that finds only the badge misses most of the object."""
    scenes = [render_scene(13, i) for i in range(60)]
    cells, shares = [], []
    for scene in scenes:
        assert scene.badges is not None and scene.badges.shape == scene.mask.shape
        assert not (scene.badges & (scene.mask == 0)).any()  # badges lie on objects
        for value in np.unique(scene.mask):
            if value in (0, BOUNDARY):
                continue
            obj = scene.mask == value
            cells.append(obj.sum() / 256)
            shares.append((scene.badges & obj).sum() / obj.sum())
    assert np.median(cells) > 12  # the median object covers more than 12 patch cells
    assert 0.1 < np.median(shares) < 0.45  # the badge is a minority of the object
    # the body is a faint tint of the class hue; the badge's colours are saturated
    from ssr_cli.data.synth_art import body_colour, class_colour

    rng = np.random.default_rng(0)

    def saturation(rgb: np.ndarray) -> int:
        return int(cv2.cvtColor(rgb[None, None].astype(np.uint8), cv2.COLOR_RGB2HSV)[0, 0, 1])

    for name in CLASSES:
        assert max(saturation(body_colour(rng, name)) for _ in range(50)) <= 0.4 * 255 + 1
        assert min(saturation(class_colour(rng, name)) for _ in range(50)) >= 0.55 * 255 - 1
