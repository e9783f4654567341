"""How the synthetic world looks (``ssr data synth``): class colours and textures (on each
object's badge), class-independent bodies, backgrounds cut from real photographs or drawn, the
eight shape families, and drawing one object.

Every function draws from the ``numpy.random.Generator`` it is given, in a fixed order, so a
scene stays a pure function of its seed (``ssr_cli.data.synth.render_scene``). Imports numpy at
the top and OpenCV inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

#: appearance family per class: (hue centre in degrees, hue spread, texture weights)
#: textures: solid, stripes, dots, checker, noise
APPEARANCE: dict[str, tuple[float, float, tuple[float, ...]]] = {
    "boat": (0.0, 25.0, (0.5, 0.3, 0.0, 0.0, 0.2)),
    "train": (220.0, 25.0, (0.4, 0.4, 0.0, 0.0, 0.2)),
    "kite": (300.0, 25.0, (0.2, 0.3, 0.0, 0.5, 0.0)),
    "ball": (35.0, 20.0, (0.2, 0.4, 0.3, 0.0, 0.1)),
    "ring": (55.0, 20.0, (0.2, 0.4, 0.3, 0.0, 0.1)),
    "star": (95.0, 20.0, (0.4, 0.1, 0.3, 0.0, 0.2)),
    "flower": (120.0, 20.0, (0.4, 0.1, 0.3, 0.0, 0.2)),
    "fish": (175.0, 25.0, (0.2, 0.2, 0.2, 0.0, 0.4)),
}

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
_ASSETS = Path(__file__).with_name("synth_assets")
# ----------------------------------------------------------------------------- colour


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def class_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    centre, spread, _ = APPEARANCE[name]
    hue = centre + rng.uniform(-spread, spread)
    return hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))


def body_colour(rng: np.random.Generator, name: str | None = None) -> np.ndarray:
    """An object body's colour: a faint tint (saturation 0.15-0.4) of the class's hue range, so the
    body is weak evidence of its class next to the badge; ``None``: any hue (clutter)."""
    if name is None:
        hue = rng.uniform(0, 360)
    else:
        centre, spread, _ = APPEARANCE[name]
        hue = centre + rng.uniform(-spread, spread)
    return hsv_to_rgb(hue, rng.uniform(0.15, 0.4), rng.uniform(0.5, 0.85))


@lru_cache(maxsize=16)
def _asset(name: str) -> np.ndarray:
    import cv2

    image = cv2.imread(str(_ASSETS / f"{name}.jpg"), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(_ASSETS / f"{name}.jpg")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image.setflags(write=False)
    return image


def _crop(rng: np.random.Generator, source: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random crop of ``source`` at a random zoom, resized to h x w (float32)."""
    import cv2

    sh, sw = source.shape[:2]
    zoom = rng.uniform(0.5, 1.0)
    ch = max(8, int(min(sh, sw * h / w) * zoom))
    cw = max(8, int(ch * w / h))
    cw = min(cw, sw)
    y = int(rng.integers(0, sh - ch + 1))
    x = int(rng.integers(0, sw - cw + 1))
    patch = source[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return cv2.resize(np.ascontiguousarray(patch), (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def _tint(gray: np.ndarray, colour: np.ndarray, contrast: float) -> np.ndarray:
    g = (gray - gray.mean()) / (gray.std() + 1e-6)
    return np.clip(colour[None, None, :] * (1.0 + contrast * g[..., None]), 0, 255)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    import cv2

    small = rng.standard_normal((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------- backgrounds


def draw_background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    import cv2

    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == "water":
        colour = hsv_to_rgb(rng.uniform(180, 230), rng.uniform(0.2, 0.5), rng.uniform(0.45, 0.8))
        freq, phase = rng.uniform(0.15, 0.45), rng.uniform(0, 6.3)
        waves = np.sin(yy * freq + 2.0 * np.sin(xx * 0.05 + phase)) + 0.6 * _smooth_noise(rng, h, w, 12)
        return np.clip(colour * (1.0 + 0.18 * waves[..., None]), 0, 255)
    if kind == "railway":
        base = _tint(_crop(rng, _asset("gravel"), h, w), hsv_to_rgb(rng.uniform(20, 40), 0.25, 0.55), 0.35)
        angle = rng.uniform(-0.35, 0.35) + (math.pi / 2 if rng.random() < 0.5 else 0.0)
        u = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
        v = -(xx - w / 2) * math.sin(angle) + (yy - h / 2) * math.cos(angle)
        gauge = rng.uniform(0.18, 0.3) * min(h, w)
        ties = (np.mod(v, gauge * 0.45) < gauge * 0.15) & (np.abs(u) < gauge * 0.85)
        base[ties] = base[ties] * 0.4 + np.array([90, 60, 40], np.float32) * 0.6
        for offset in (-gauge / 2, gauge / 2):
            rail = np.abs(u - offset) < max(1.5, gauge * 0.05)
            base[rail] = np.array([150, 150, 160], np.float32)
        return base
    if kind == "grass":
        return _tint(_crop(rng, _asset("grass"), h, w), hsv_to_rgb(rng.uniform(70, 130), 0.35, 0.5), 0.45)
    if kind == "wall":
        colour = hsv_to_rgb(rng.uniform(0, 40), rng.uniform(0.15, 0.45), rng.uniform(0.4, 0.75))
        return _tint(_crop(rng, _asset("brick"), h, w), colour, 0.35)
    if kind == "sky":
        top = hsv_to_rgb(rng.uniform(195, 225), rng.uniform(0.3, 0.55), rng.uniform(0.6, 0.9))
        bottom = hsv_to_rgb(rng.uniform(190, 220), rng.uniform(0.1, 0.3), 0.95)
        t = (yy / max(1, h - 1))[..., None] * np.ones((1, w, 1), np.float32)
        sky = top * (1 - t) + bottom * t
        clouds = np.clip(_smooth_noise(rng, h, w, 24) - 0.4, 0, None)[..., None]
        return np.clip(sky + 120.0 * clouds, 0, 255)
    photo = _crop(rng, _asset(str(rng.choice(_PHOTOS))), h, w)
    if photo.ndim == 2:
        photo = _tint(photo, hsv_to_rgb(rng.uniform(0, 360), 0.3, 0.6), 0.5)
    return cv2.GaussianBlur(photo, (0, 0), 0.6)


# ----------------------------------------------------------------------------- shapes

Polys = list[np.ndarray]


def _circle(r: float, n: int = 28, cx: float = 0.0, cy: float = 0.0, ry: float | None = None) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + (ry if ry is not None else r) * np.sin(t)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


@dataclass
class Shape:
    """Polygons in unit coordinates (object size 1, centre 0): ``body`` (main colour),
    ``parts`` (second colour), ``holes`` (cut out), ``lines`` (polylines, width in pixels)."""

    body: Polys
    parts: Polys = field(default_factory=list)
    holes: Polys = field(default_factory=list)
    lines: list[tuple[np.ndarray, float]] = field(default_factory=list)


def _boat(rng: np.random.Generator) -> Shape:
    depth = rng.uniform(0.15, 0.25)
    hull = np.array([[-0.5, 0.1], [0.5, 0.1], [0.35, 0.1 + depth], [-0.35, 0.1 + depth]])
    mast_x = rng.uniform(-0.1, 0.1)
    sail = np.array([[mast_x + 0.02, -0.45], [mast_x + 0.02, 0.05], [mast_x + rng.uniform(0.25, 0.4), 0.05]])
    mast = np.array([[mast_x, -0.5], [mast_x, 0.1]])
    return Shape(body=[hull], parts=[sail], lines=[(mast, 2.0)])


def _train(rng: np.random.Generator) -> Shape:
    height = rng.uniform(0.25, 0.35)
    body = _rect(-0.5, -height / 2, 0.5, height / 2)
    nose = np.array([[0.5, -height / 2], [0.62, 0.0], [0.5, height / 2]])
    windows = [
        _rect(x, -height / 2 + 0.05, x + 0.08, -height / 2 + 0.05 + height * 0.35)
        for x in np.arange(-0.45, 0.42, 0.13)
    ]
    wheels = [_circle(0.05, 12, x, height / 2 + 0.03) for x in (-0.35, -0.15, 0.15, 0.35)]
    return Shape(body=[body, nose] + wheels, parts=windows)


def _kite(rng: np.random.Generator) -> Shape:
    w, top, bottom = rng.uniform(0.22, 0.32), rng.uniform(0.2, 0.3), rng.uniform(0.3, 0.4)
    diamond = np.array([[0, -top - 0.1], [w, -0.1], [0, bottom - 0.1], [-w, -0.1]])
    cross = [np.array([[0, -top - 0.1], [0, bottom - 0.1]])]
    t = np.linspace(0, 1, 16)
    tail = np.stack([0.15 * np.sin(t * rng.uniform(6, 12)), bottom - 0.1 + 0.45 * t], 1)
    bows = [_circle(0.025, 8, tail[i, 0], tail[i, 1]) for i in (5, 10, 15)]
    return Shape(body=[diamond] + bows, lines=[(tail, 1.5)] + [(c, 1.0) for c in cross])


def _ball(rng: np.random.Generator) -> Shape:
    return Shape(body=[_circle(0.5, 36)])


def _ring(rng: np.random.Generator) -> Shape:
    return Shape(body=[_circle(0.5, 36)], holes=[_circle(rng.uniform(0.25, 0.36), 30)])


def _star(rng: np.random.Generator) -> Shape:
    points = int(rng.integers(5, 8))
    inner = rng.uniform(0.17, 0.25)
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 0.5, inner)
    return Shape(body=[np.stack([r * np.cos(t), r * np.sin(t)], 1)])


def _flower(rng: np.random.Generator) -> Shape:
    petals = int(rng.integers(5, 9))
    body = []
    for k in range(petals):
        a = 2 * math.pi * k / petals
        c, s = math.cos(a), math.sin(a)
        ellipse = _circle(0.16, 16, ry=0.08)
        rot = ellipse @ np.array([[c, s], [-s, c]])
        body.append(rot + np.array([0.22 * c, 0.22 * s]) - np.array([0, 0.12]))
    centre = _circle(0.09, 16, 0, -0.12)
    stem = np.array([[0.0, 0.0], [0.03, 0.25], [0.0, 0.5]])
    return Shape(body=body, parts=[centre], lines=[(stem, 2.0)])


def _fish(rng: np.random.Generator) -> Shape:
    body = _circle(0.33, 30, -0.05, 0, ry=rng.uniform(0.14, 0.2))
    tail = np.array([[0.22, 0], [0.5, -0.18], [0.45, 0], [0.5, 0.18]])
    fin = np.array([[-0.1, -0.12], [0.05, -0.28], [0.12, -0.1]])
    eye = _circle(0.035, 10, -0.25, -0.03)
    return Shape(body=[body, tail, fin], parts=[eye])


_SHAPES: dict[str, Callable[[np.random.Generator], Shape]] = {
    "boat": _boat,
    "train": _train,
    "kite": _kite,
    "ball": _ball,
    "ring": _ring,
    "star": _star,
    "flower": _flower,
    "fish": _fish,
}
_ROTATION = {"boat": 0.25, "train": 0.3}  # radians; others rotate freely


# ----------------------------------------------------------------------------- rendering


def texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    weights = np.array(APPEARANCE[name][2])
    kind = int(rng.choice(len(weights), p=weights / weights.sum()))
    first, second = class_colour(rng, name), class_colour(rng, name)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:
        sel = np.zeros((h, w), bool)
    elif kind == 1:
        a, period = rng.uniform(0, math.pi), rng.uniform(6, 14)
        sel = np.mod(xx * math.cos(a) + yy * math.sin(a), period) < period / 2
    elif kind == 2:
        period = rng.uniform(7, 12)
        sel = (np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (
            period / 3.5
        ) ** 2
    elif kind == 3:
        period = rng.uniform(6, 12)
        sel = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    else:
        sel = _smooth_noise(rng, h, w, 5) > 0.3
    tex = np.where(sel[..., None], second[None, None], first[None, None]).astype(np.float32)
    shade = 1.0 + 0.15 * _smooth_noise(rng, h, w, 40)[..., None]
    return tex * shade


def _place(poly: np.ndarray, size: float, angle: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    pts = poly * size @ np.array([[c, s], [-s, c]])
    return np.round((pts + np.array([cx, cy])) * 16).astype(np.int32)  # 4 fractional bits


def body_texture(rng: np.random.Generator, h: int, w: int, name: str | None = None) -> np.ndarray:
    """A body of class ``name`` (None: clutter): its :func:`body_colour`, lightly shaded."""
    colour = body_colour(rng, name)
    shade = 1.0 + 0.08 * _smooth_noise(rng, h, w, 6) + 0.12 * _smooth_noise(rng, h, w, 40)
    return np.clip(colour[None, None] * shade[..., None], 0, 255)


def badge_mask(rng: np.random.Generator, mask: np.ndarray, size: float) -> np.ndarray:
    """The object's class badge: a disc around one of its pixels, clipped to the object."""
    import cv2

    ys, xs = np.nonzero(mask)
    badge = np.zeros(mask.shape, np.uint8)
    if len(ys) == 0:
        return badge.astype(bool)
    k = int(rng.integers(0, len(ys)))
    radius = max(2, int(round(rng.uniform(0.2, 0.3) * size)))
    cv2.circle(badge, (int(xs[k]), int(ys[k])), radius, 1, -1)
    return badge.astype(bool) & mask


def draw_object(
    rng: np.random.Generator, name: str, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object mask, second-colour mask, badge mask) of one object of class ``name``."""
    import cv2

    shape = _SHAPES[name](rng)
    size = rng.uniform(0.45, 0.85) * min(h, w)
    limit = _ROTATION.get(name, math.pi)
    angle = rng.uniform(-limit, limit)
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    if name in ("boat", "train") and rng.random() < 0.5:
        shape = Shape(
            [p * [-1, 1] for p in shape.body],
            [p * [-1, 1] for p in shape.parts],
            [p * [-1, 1] for p in shape.holes],
            [(p * [-1, 1], t) for p, t in shape.lines],
        )
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [_place(p, size, angle, cx, cy) for p in shape.body], 1, cv2.LINE_8, 4)
    for line, width in shape.lines:
        thickness = max(1, int(round(width * size / 100)))
        cv2.polylines(mask, [_place(line, size, angle, cx, cy)], False, 1, thickness, cv2.LINE_8, 4)
    parts = np.zeros((h, w), np.uint8)
    if shape.parts:
        cv2.fillPoly(parts, [_place(p, size, angle, cx, cy) for p in shape.parts], 1, cv2.LINE_8, 4)
        mask |= parts
    if shape.holes:
        cv2.fillPoly(mask, [_place(p, size, angle, cx, cy) for p in shape.holes], 0, cv2.LINE_8, 4)
        parts &= mask
    obj = mask.astype(bool)
    return obj, parts.astype(bool), badge_mask(rng, obj, size)
