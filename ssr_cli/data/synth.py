"""A synthetic world with known answers: ``ssr data synth`` (the proving ground).

Scenes of 1-3 objects from 8 shape families on backgrounds cut from real photographs
(``synth_assets/``, from scikit-image) or drawn textures, written in the custom dataset
layout (``images/``, ``labels.txt``, ``vocab.json``, ``masks/``, ``splits/``). Each image
is a pure function of ``(seed, index)``, so any subset can be regenerated exactly.

The failure modes SSR targets exist by construction:

- **co-occurrence**: a ``boat`` stands on ``water`` and a ``train`` on a ``railway`` in
  :data:`COOCCURRENCE` of their scenes, and those backgrounds are background words;
- **look-alike classes**: ``ball``/``ring`` and ``star``/``flower`` share their texture
  distributions and have overlapping hue ranges (each class has its own hue range; a pair's
  ranges overlap by half), so colour alone cannot tell them apart;
- **fine structure**: masts, kite tails, flower stems, ring holes and star spikes are
  1-4 pixels wide, far below the 16-pixel patch grid;
- **partial activation**: objects are large (0.45-0.85 of the image's short side) and their
  class shows in a **badge**, a disc in the class's colours and textures that covers about a
  third of the object; the body is only a faint tint of the class's hue (weak evidence).
  A CAM that finds the discriminative part finds the badge and misses the body, which is what
  affinity propagation (CLIP attention, DINO attention, SGC) is meant to repair.

Masks are VOC palette PNGs (0 background, 1..8 the classes, 255 a band on object boundaries).
Imports numpy, OpenCV and PIL only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssr_cli.data.synth_art import body_texture, draw_background, draw_object, hsv_to_rgb, texture

CLASSES: tuple[str, ...] = ("boat", "train", "kite", "ball", "ring", "star", "flower", "fish")
BACKGROUNDS: tuple[str, ...] = ("water", "railway", "grass", "wall", "sky", "room")
TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
#: class -> (background it co-occurs with, probability)
COOCCURRENCE: dict[str, tuple[str, float]] = {"boat": ("water", 0.8), "train": ("railway", 0.8)}
#: pairs of classes with the same texture distribution and overlapping hues
LOOK_ALIKES: tuple[tuple[str, str], ...] = (("ball", "ring"), ("star", "flower"))
DEFAULT_SIZE_RANGE = (160, 320)
BOUNDARY = 255


@dataclass
class Scene:
    """One rendered scene: ``image`` HxWx3 uint8 RGB, ``mask`` HxW uint8 (255 = boundary)."""

    image: np.ndarray
    mask: np.ndarray
    classes: list[str]
    background: str
    caption: str = ""
    objects: list[str] = field(default_factory=list)
    #: HxW bool: the visible pixels of the objects' class badges
    badges: np.ndarray | None = None


def _draw_distractor(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A background blob (an irregular polygon or a bar) coloured like a body of any hue."""
    import cv2

    h, w = image.shape[:2]
    size = rng.uniform(0.15, 0.45) * min(h, w)
    n = int(rng.integers(4, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = size * rng.uniform(0.25, 0.6, n)
    if rng.random() < 0.3:  # a bar
        angles = np.array([0.2, math.pi - 0.2, math.pi + 0.2, -0.2]) + rng.uniform(0, math.pi)
        radii = np.full(4, size * 0.6)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    blob = np.zeros((h, w), np.uint8)
    cv2.fillPoly(blob, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return np.where(blob[..., None] > 0, body_texture(rng, h, w), image)


def _pick_classes(rng: np.random.Generator) -> list[str]:
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    names = [str(n) for n in rng.choice(CLASSES, size=count, replace=False)]
    if rng.random() < 0.15:
        names.append(names[0])  # a second instance of the same class
    return names


def _pick_background(rng: np.random.Generator, names: list[str]) -> str:
    for name in names:
        if name in COOCCURRENCE and rng.random() < COOCCURRENCE[name][1]:
            return COOCCURRENCE[name][0]
    others = [b for b in BACKGROUNDS if b not in ("water", "railway")] + ["water", "railway"]
    weights = np.array([1.0] * (len(others) - 2) + [0.35, 0.35])
    return str(rng.choice(others, p=weights / weights.sum()))


def boundary_band(labels: np.ndarray, width: int = 3) -> np.ndarray:
    """``labels`` with 255 where a ``width`` x ``width`` window holds more than one label."""
    import cv2

    kernel = np.ones((width, width), np.uint8)
    edge = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    out = labels.copy()
    out[edge] = BOUNDARY
    return out


def _others_stay_visible(labels: np.ndarray, obj: np.ndarray) -> bool:
    """Whether every label already drawn keeps at least half of its pixels under ``obj``."""
    values, before = np.unique(labels[labels > 0], return_counts=True)
    for value, count in zip(values, before, strict=True):
        if ((labels == value) & ~obj).sum() < 0.5 * count:
            return False
    return True


def render_scene(
    seed: int,
    index: int,
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
    shape: tuple[int, int] | None = None,
) -> Scene:
    """Scene ``index`` of the world ``seed``: a pure function of its arguments.

    ``shape`` (h, w) fixes the image size instead of drawing it from ``size_range``.
    """
    import cv2

    rng = np.random.default_rng([seed, index])
    h = int(rng.integers(size_range[0], size_range[1] + 1))
    w = int(rng.integers(size_range[0], size_range[1] + 1))
    if shape is not None:
        h, w = shape
    names = _pick_classes(rng)
    background = _pick_background(rng, names)
    image = draw_background(rng, background, h, w)
    for _ in range(int(rng.integers(0, 3))):  # clutter: body-like blobs, no class badge
        image = _draw_distractor(rng, image)
    labels = np.zeros((h, w), np.uint8)
    badges = np.zeros((h, w), bool)
    drawn: list[str] = []
    for name in names:
        for _attempt in range(6):
            obj, parts, badge = draw_object(rng, name, h, w)
            area = int(obj.sum())
            if area < 60:
                continue
            covered = int((labels[obj] > 0).sum())
            if covered <= 0.35 * area and _others_stay_visible(labels, obj):
                break
        else:
            continue
        body = body_texture(rng, h, w, name)
        colour = np.where(parts[..., None], body * rng.uniform(0.6, 0.8), body)
        colour = np.where(badge[..., None], texture(rng, name, h, w), colour)
        image = np.where(obj[..., None], colour, image)
        labels[obj] = CLASSES.index(name) + 1
        badges = (badges & ~obj) | badge
        drawn.append(name)
    if rng.random() < 0.25:  # an occluder of background stuff (a pole) across the scene
        pole = np.zeros((h, w), np.uint8)
        x0 = int(rng.integers(0, w))
        cv2.line(pole, (x0, 0), (int(x0 + rng.integers(-w // 3, w // 3 + 1)), h), 1, int(rng.integers(3, 8)))
        image = np.where(pole[..., None] > 0, hsv_to_rgb(rng.uniform(20, 40), 0.4, 0.35)[None, None], image)
        labels[pole > 0] = 0
        badges[pole > 0] = False
    present = sorted({CLASSES[v - 1] for v in np.unique(labels) if v}, key=CLASSES.index)
    image = image + rng.normal(0, 4.0, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0.5)
    caption = caption_for(present, background, rng)
    return Scene(image, boundary_band(labels), present, background, caption, drawn, badges)


def caption_for(classes: list[str], background: str, rng: np.random.Generator) -> str:
    """A short caption naming the classes (in random order) and the background."""
    names = [f"a {c}" for c in rng.permutation(classes)] if classes else ["nothing"]
    things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    where = {"room": "indoors", "sky": "in the sky", "wall": "by a wall"}.get(background, f"on {background}")
    return f"a photo of {things} {where}."


# ----------------------------------------------------------------------------- dataset


def vocabulary_dict() -> dict:
    """The world's ``vocab.json``: 8 classes, one template, the background words."""
    return {
        "name": "synth",
        "classes": list(CLASSES),
        "templates": list(TEMPLATES),
        "background": list(BACKGROUNDS),
    }


def scene_ids(count: int) -> list[str]:
    return [f"s{index:05d}" for index in range(count)]


def split_of(index: int, count: int, val_fraction: float) -> str:
    """The last ``val_fraction`` of the images are the val split."""
    return "val" if index >= count - int(round(count * val_fraction)) else "train"


def write_scene(root: Path, image_id: str, scene: Scene) -> None:
    """Write one scene's image (JPEG) and mask (palette PNG), each atomically."""
    from PIL import Image

    from ssr_cli.artefacts import atomic_write
    from ssr_cli.data.images import write_label_png

    atomic_write(
        root / "images" / f"{image_id}.jpg",
        lambda tmp: Image.fromarray(scene.image).save(tmp, format="JPEG", quality=92),
    )
    write_label_png(root / "masks" / f"{image_id}.png", scene.mask)


def _render_and_write(args: tuple[str, int, int, tuple[int, int], str]) -> tuple[str, list[str]]:
    root, seed, index, size_range, image_id = args
    scene = render_scene(seed, index, size_range)
    write_scene(Path(root), image_id, scene)
    return image_id, scene.classes


def generate(
    out: Path,
    count: int,
    seed: int = 0,
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
    val_fraction: float = 0.2,
    workers: int = 1,
) -> Iterator[str]:
    """Write the dataset into ``out``; yields each id as it is written (for progress).

    Index files (``labels.txt``, ``vocab.json``, ``splits/``, ``synth.json``) are written
    last, so a folder with ``labels.txt`` is complete.
    """
    from ssr_cli.artefacts import atomic_write_json, atomic_write_text

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ids = scene_ids(count)
    jobs = [(str(out), seed, i, size_range, image_id) for i, image_id in enumerate(ids)]
    labels: dict[str, list[str]] = {}
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for image_id, classes in pool.imap(_render_and_write, jobs, chunksize=8):
                labels[image_id] = classes
                yield image_id
    else:
        for job in jobs:
            image_id, classes = _render_and_write(job)
            labels[image_id] = classes
            yield image_id
    (out / "splits").mkdir(exist_ok=True)
    for split in ("train", "val"):
        chosen = [i for n, i in enumerate(ids) if split_of(n, count, val_fraction) == split]
        atomic_write_text(out / "splits" / f"{split}.txt", "".join(f"{i}\n" for i in chosen))
    atomic_write_json(out / "vocab.json", vocabulary_dict())
    atomic_write_json(
        out / "synth.json",
        {
            "generator": "ssr data synth",
            "seed": seed,
            "images": count,
            "size_range": list(size_range),
            "val_fraction": val_fraction,
        },
    )
    lines = ["# synthetic world of `ssr data synth`: id, then its classes"]
    lines += [f"{i} {' '.join(labels[i])}" for i in ids]
    atomic_write_text(out / "labels.txt", "\n".join(lines) + "\n")
