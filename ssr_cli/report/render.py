"""Pictures for ``ssr report``: thumbnails, CAM heatmaps, label overlays, the contact sheet.

numpy + PIL only (cv2 for the colour map, imported inside the function). Images are
HxWx3 uint8 RGB; label maps HxW integer class ids (255 = ignore/uncertain); CAMs
[C, h, w] float in [0, 1] at any resolution (brought to the thumbnail size here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (255, 255, 255)
SHEET_HEADER_H = 16


def thumb_size(image_hw: Sequence[int], max_side: int) -> tuple[int, int]:
    """(H, W) of a thumbnail of an image of size ``image_hw`` whose longer side is ``max_side``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    scale = min(1.0, max_side / max(h, w, 1))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> ``size_hw`` (antialiased)."""
    if image.shape[:2] == tuple(size_hw):
        return image
    pil = Image.fromarray(image).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(pil)


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """HxW class ids -> ``size_hw`` by nearest neighbour (no new class ids appear)."""
    if labels.shape == tuple(size_hw):
        return labels
    h, w = labels.shape
    rows = np.minimum(((np.arange(size_hw[0]) + 0.5) * h / size_hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size_hw[1]) + 0.5) * w / size_hw[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def heatmap(cam: np.ndarray) -> np.ndarray:
    """[H, W] scores in [0, 1] -> HxWx3 uint8 RGB (JET colour map: blue low, red high)."""
    import cv2

    scaled = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    bgr = cv2.applyColorMap((scaled * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    return np.ascontiguousarray(bgr[..., ::-1])


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The photo blended with the heatmap of one CAM [h, w] (resized to the photo, bilinear)."""
    from ssr_cli.cam.labels import upsample_cams

    cam_up = upsample_cams(cam[None].astype(np.float32), image.shape[:2])[0]
    return blend(image, heatmap(cam_up), alpha)


def blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colour`` as uint8."""
    mixed = image.astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    return np.clip(mixed.round(), 0, 255).astype(np.uint8)


def label_colours(labels: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 by the 768-entry ``palette``; 255 is white."""
    table = np.asarray(palette, dtype=np.uint8).reshape(256, 3).copy()
    table[255] = IGNORE_COLOUR
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def label_overlay(
    image: np.ndarray, labels: np.ndarray, palette: Sequence[int], alpha: float = 0.6
) -> np.ndarray:
    """The photo with a label map on top: background pixels keep the photo (dimmed), other
    classes (and 255, white) are blended with their palette colour. ``labels`` is resized
    to the photo (nearest)."""
    labels = resize_labels(labels, image.shape[:2])
    colours = label_colours(labels, palette)
    out = blend(image, colours, alpha)
    bg = labels == 0
    out[bg] = (image[bg].astype(np.float32) * 0.7).astype(np.uint8)
    return out


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an HxWx3 uint8 array as PNG (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, optimize=False, compress_level=3)


def _fit_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """Centre ``image`` (longer side scaled to ``tile``) on a ``tile``x``tile`` dark grey square."""
    th, tw = thumb_size(image.shape[:2], tile)
    small = resize_image(image, (th, tw))
    out = np.full((tile, tile, 3), 40, dtype=np.uint8)
    top, left = (tile - th) // 2, (tile - tw) // 2
    out[top : top + th, left : left + tw] = small
    return out


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray | None]],
    captions: Sequence[str],
    tile: int = 128,
    caption_h: int = 14,
    gap: int = 2,
    header: Sequence[str] | None = None,
    header_h: int = 16,
) -> np.ndarray:
    """A grid: one row per image, one column per picture (``None`` = an empty tile).

    ``header``: column titles in a strip of ``header_h`` pixels at the top. Each row has a
    caption strip of ``caption_h`` pixels above its tiles. Tile (r, c) starts at
    y = top + r * (caption_h + tile + gap) + caption_h, x = c * (tile + gap), where top is
    ``header_h`` with a header, else 0 (``tile_origin``).
    Returns HxWx3 uint8.
    """
    cols = max((len(r) for r in rows), default=1)
    row_h = caption_h + tile + gap
    top = header_h if header else 0
    sheet = np.full((top + max(1, len(rows)) * row_h, cols * (tile + gap) - gap, 3), 255, dtype=np.uint8)
    if header:
        sheet[: top - 2] = 232
    for r, pictures in enumerate(rows):
        y = top + r * row_h + caption_h
        for c, picture in enumerate(pictures):
            x = c * (tile + gap)
            if picture is None:
                sheet[y : y + tile, x : x + tile] = 220
            else:
                sheet[y : y + tile, x : x + tile] = _fit_tile(picture, tile)
    canvas = Image.fromarray(sheet)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, text in enumerate(header or []):
        draw.text((c * (tile + gap) + 2, 2), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(captions):
        draw.text((2, top + r * row_h + 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas).copy()


def tile_origin(
    row: int, col: int, tile: int = 128, caption_h: int = 14, gap: int = 2, top: int = 0
) -> tuple[int, int]:
    """(y, x) of the top-left pixel of tile (row, col) in :func:`contact_sheet`'s output
    (``top``: the header's height, when it has one)."""
    return top + row * (caption_h + tile + gap) + caption_h, col * (tile + gap)


def safe_name(item_id: str) -> str:
    """A file-name stem for ``item_id`` (ids may hold '/'): unsafe characters become '_', and a
    short hash is added whenever anything was replaced, so two ids never share a name."""
    import hashlib
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)
    if stem != item_id or stem.startswith("."):
        stem = f"{stem}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"
    return stem


def _iou_vs(gt: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    from ssr_cli.metrics import confusion_matrix

    if labels.shape != gt.shape:
        return None
    conf = confusion_matrix(gt, labels, k)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else None


def render_item(
    item_id: str,
    out: Path,
    *,
    photo: Path | None,
    gt: Path | None,
    sources: Sequence[Any],
    primary: Any,
    class_names: Sequence[str],
    palette: Sequence[int],
    thumb: int = 160,
) -> dict[str, Any]:
    """Draw one image's thumbnails into ``out/thumbs`` and return its row for the page.

    ``sources`` are ``ssr_cli.stages.report.Source`` objects (``cams(id)``, ``labels(id)``).
    Row: ``id``, ``cells`` (``title``, ``src`` relative to ``out``, ``kind``), ``ious``
    (source name -> IoU against GT), ``sheet`` (photo, primary labels, GT thumbnail paths).
    """
    from ssr_cli.data.images import read_image, read_mask

    stem = safe_name(item_id)
    labels = {s.name: s.labels(item_id) for s in sources if s.gives_labels}
    cams = {s.name: s.cams(item_id) for s in sources if s.cams_dir is not None}
    gt_mask = read_mask(gt) if gt is not None else None
    if photo is not None and photo.is_file():
        image = read_image(photo)
    else:
        shapes = [v.shape for v in labels.values() if v is not None]
        shapes += [tuple(int(x) for x in c["image_hw"]) for c in cams.values() if c is not None]
        image = np.full((*(shapes[0] if shapes else (64, 64)), 3), 128, dtype=np.uint8)
    size = thumb_size(image.shape[:2], thumb)
    cells: list[dict[str, Any]] = []
    sheet: list[str | None] = [None, None, None]

    def put(suffix: str, full: np.ndarray, title: str, kind: str) -> str:
        """The picture at full size (``full/``, JPEG, opened by a click) and as a thumbnail."""
        rel = f"thumbs/{stem}_{suffix}.png"
        save_png(out / rel, resize_image(full, size))
        big = f"full/{stem}_{suffix}.jpg"
        (out / big).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(full).save(out / big, format="JPEG", quality=90)
        cells.append({"title": title, "src": rel, "full": big, "kind": kind})
        return rel

    sheet[0] = put("photo", image, "photo" if photo is not None else "photo (not found)", "photo")
    for src in sources:
        seed = cams.get(src.name)
        if seed is None:
            continue
        for j, cid in enumerate(int(c) for c in seed["class_ids"]):
            name = class_names[cid] if cid < len(class_names) else f"class {cid}"
            pic = cam_overlay(image, seed["cams"][j].astype(np.float32))
            put(f"r{src.index}_cam{cid}", pic, f"{src.cam_title}: {name} ({src.name})", "cam")
    ious: dict[str, float | None] = {}
    k = len(class_names)
    for src in sources:
        lab = labels.get(src.name)
        if lab is None:
            continue
        title = "prediction" if src.stage == "predict" else "pseudo-labels"
        iou = _iou_vs(gt_mask, lab, k) if gt_mask is not None else None
        ious[src.name] = iou
        extra = "" if iou is None else f", IoU {100 * iou:.1f} %"
        overlay = label_overlay(image, lab, palette)  # labels resized to the photo
        rel = put(f"r{src.index}_labels", overlay, f"{title} ({src.name}{extra})", "labels")
        if src is primary:
            sheet[1] = rel
    if gt_mask is not None:
        overlay = label_overlay(image, gt_mask, palette)
        sheet[2] = put("gt", overlay, "ground truth", "gt")
    return {"id": item_id, "cells": cells, "ious": ious, "sheet": sheet, "image_hw": list(image.shape[:2])}


def render_sheet(
    rows: Sequence[dict[str, Any]], path: Path, out: Path, tile: int = 128, primary_name: str = ""
) -> dict[str, Any]:
    """The contact sheet of ``rows`` (in order): photo | primary labels | GT, captioned with
    id and IoU; written to ``path``. Returns its layout (``tile``, ``columns``, ``ids``)."""
    pictures: list[list[np.ndarray | None]] = []
    captions: list[str] = []
    for row in rows:
        pictures.append(
            [np.asarray(Image.open(out / rel).convert("RGB")) if rel else None for rel in row["sheet"]]
        )
        iou = row.get("iou")
        captions.append(f"{row['id']}  IoU {'-' if iou is None else f'{100 * iou:.1f} %'}")
    if not pictures:
        pictures, captions = [[None, None, None]], ["no images"]
    columns = ["photo", f"labels ({primary_name})" if primary_name else "labels", "ground truth"]
    save_png(path, contact_sheet(pictures, captions, tile=tile, header=columns, header_h=SHEET_HEADER_H))
    return {
        "file": path.name,
        "tile": tile,
        "header_h": SHEET_HEADER_H,
        "columns": columns,
        "ids": [row["id"] for row in rows],
    }
