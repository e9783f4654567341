"""Folder layouts: where images, ground truth, split lists and annotations live.

- ``voc``: a VOC2012 folder (or a VOCdevkit folder holding one):
  ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
  ``SegmentationClassAug/<id>.png`` (inside VOC2012 or beside it),
  ``ImageSets/Segmentation/<split>.txt`` (also ``ImageSets/SegmentationAug/``),
  ``Annotations/<id>.xml``. Default split ``train``. Ground truth of an image:
  SegmentationClass when its mask is there, else SegmentationClassAug.
- ``coco``: COCO 2014 converted to VOC-style PNGs: ``JPEGImages/<split>/<id>.jpg``
  (or ``images/<split>/``), ``SegmentationClass/<split>/<id>.png``; ids from
  ``ImageSets/<split>.txt`` when present, else every image of the split folder.
  Default split ``train2014``.
- ``custom``: ``images/`` (any depth; id = relative path without extension),
  ``labels.txt`` (see ``labelfile``), ``vocab.json`` (see ``vocab``), optional
  ``masks/<id>.png`` and ``splits/<split>.txt``. Default split ``all``: every
  image of the label file (or, without one, every image under ``images/``).

``--split`` may also be the path of an id-list file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssr_cli.data.images import IMAGE_EXTENSIONS
from ssr_cli.data.labelfile import read_id_list
from ssr_cli.errors import DataError

LAYOUTS = ("voc", "coco", "custom")
DEFAULT_SPLIT = {"voc": "train", "coco": "train2014", "custom": "all"}


@dataclass
class Resolved:
    """A layout resolved to concrete files, before image-level labels are attached."""

    layout: str
    root: Path
    split: str
    ids: list[tuple[str, int]]  # (id, line in id_file)
    id_file: Path | None  # split file or label file the ids came from (None: folder listing)
    images: list[Path]
    gts: list[Path | None]
    gt_dirs: list[Path]
    xml_dir: Path | None = None
    label_file: Path | None = None  # the layout's own label file (custom: labels.txt)
    vocab_spec: str | Path | None = None
    notes: list[str] = field(default_factory=list)


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def _coco_image_root(root: Path) -> Path | None:
    for name in ("JPEGImages", "images"):
        folder = root / name
        if folder.is_dir() and any(entry.is_dir() for entry in os.scandir(folder)):
            return folder
    return None


def detect_layout(root: Path) -> str:
    """``voc`` | ``coco`` | ``custom`` from the folder's contents; DataError if none fits."""
    voc = _voc_root(root)
    if voc is not None and (voc / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    if (root / "images").is_dir() and any(
        (root / name).exists() for name in ("labels.txt", "vocab.json", "masks")
    ):
        return "custom"
    segmentation = root / "SegmentationClass"
    if _coco_image_root(root) is not None or (
        segmentation.is_dir() and any(entry.is_dir() for entry in os.scandir(segmentation))
    ):
        return "coco"
    raise DataError(
        "cannot tell the dataset layout",
        path=root,
        hint="expected JPEGImages/ + ImageSets/Segmentation/ (voc), images/ + labels.txt (custom), "
        "or JPEGImages/<split>/ (coco); or pass --layout",
    )


def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """``os.walk`` following symlinked folders, each real folder once (no cycles)."""
    seen: set[str] = set()
    for directory, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield Path(directory), files


def _listing(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """Map id -> image file for the image files in ``folder`` (ids with '/' when recursive).

    An id with two image files maps to ``None`` (reported only if the id is used).
    """
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    walk: Iterable[tuple[Path, list[str]]]
    if recursive:
        walk = _walk(folder)
    else:
        walk = [(folder, [e.name for e in os.scandir(folder) if not e.is_dir()])]
    for directory, files in walk:
        relative = directory.relative_to(folder).as_posix()
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            image_id = stem if relative == "." else f"{relative}/{stem}"
            found[image_id] = _AMBIGUOUS if image_id in found else directory / name
    return found


_AMBIGUOUS = Path("\x00ambiguous")


def _png_stems(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {name[:-4] for name in os.listdir(folder) if name.endswith(".png")}


def _split_file(split: str, candidates: list[Path], listing_dirs: list[Path]) -> Path:
    as_path = Path(split).expanduser()
    if (split.endswith(".txt") or "/" in split) and as_path.is_file():
        return as_path
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(
        {p.stem for d in listing_dirs if d.is_dir() for p in d.iterdir() if p.suffix == ".txt"}
    )
    raise DataError(
        f"split {split!r} not found",
        path=candidates[0],
        hint=f"available splits: {', '.join(available)}" if available else "no split files found",
    )


def _attach_images(
    ids: list[tuple[str, int]], listing: dict[str, Path], folder: Path, id_file: Path | None
) -> list[Path]:
    images: list[Path] = []
    missing: list[tuple[str, int]] = []
    for image_id, line in ids:
        path = listing.get(image_id)
        if path is None:
            missing.append((image_id, line))
        elif path is _AMBIGUOUS:
            names = sorted(p.name for p in (folder / image_id).parent.glob(Path(image_id).name + ".*"))
            raise DataError(
                f"more than one image file for id {image_id!r}: {', '.join(names)}",
                path=folder / image_id,
                hint="keep one file per image",
            )
        else:
            images.append(path)
    if missing:
        image_id, line = missing[0]
        where = f"listed in {id_file}:{line}; " if id_file is not None else ""
        raise DataError(
            "image not found",
            path=folder / f"{image_id}.jpg",
            hint=f"{where}{len(missing)} of {len(ids)} images of the split are missing "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})",
        )
    return images


def _attach_gts(ids: list[tuple[str, int]], gt_dirs: list[Path]) -> list[Path | None]:
    stems = [(folder, _png_stems(folder)) for folder in gt_dirs]
    gts: list[Path | None] = []
    for image_id, _ in ids:
        found = None
        for folder, have in stems:
            candidate = folder / f"{image_id}.png"
            if image_id in have or ("/" in image_id and candidate.is_file()):
                found = candidate
                break
        gts.append(found)
    return gts


def _gt_dirs(gt: Path | None, defaults: list[Path]) -> list[Path]:
    """The ground-truth folders that exist: ``--gt`` (which must be a folder), else ``defaults``."""
    if gt is not None and not gt.is_dir():
        raise DataError(
            "ground-truth folder not found", path=gt, hint="--gt takes a folder of <id>.png masks"
        )
    return [d for d in ([gt] if gt is not None else defaults) if d.is_dir()]


_NOT_FOUND = {  # layout -> (problem, hint) when its folder is not found under the root
    "voc": ("not a VOC2012 folder: JPEGImages/ not found", "pass the VOC2012 (or VOCdevkit) folder"),
    "coco": (
        "not a COCO-as-PNG folder: no JPEGImages/<split>/ or images/<split>/ folder",
        "expected JPEGImages/train2014/<id>.jpg and SegmentationClass/train2014/<id>.png",
    ),
}


def _layout_folder(layout: str, folder: Path | None, root: Path) -> Path:
    """``folder`` (the layout's folder found under ``root``), or DataError when it was not found."""
    if folder is None:
        problem, hint = _NOT_FOUND[layout]
        raise DataError(problem, path=root, hint=hint)
    return folder


def _split_name(split: str) -> str:
    return Path(split).stem if split.endswith(".txt") else split


def _resolved(
    layout: str,
    root: Path,
    split: str,
    ids: list[tuple[str, int]],
    id_file: Path | None,
    images: list[Path],
    gt_dirs: list[Path],
    **extra: Any,
) -> Resolved:
    """A :class:`Resolved` with each id's mask looked up in ``gt_dirs`` (first found wins)."""
    gts = _attach_gts(ids, gt_dirs)
    return Resolved(layout, root, split, ids, id_file, images, gts, gt_dirs, **extra)


def resolve_voc(root: Path, split: str | None, gt: Path | None) -> Resolved:
    voc = _layout_folder("voc", _voc_root(root), root)
    split = split or DEFAULT_SPLIT["voc"]
    sets = [voc / "ImageSets" / "Segmentation", voc / "ImageSets" / "SegmentationAug"]
    split_file = _split_file(split, [d / f"{split}.txt" for d in sets], sets)
    ids = read_id_list(split_file, file_names=True)
    images = _attach_images(ids, _listing(voc / "JPEGImages"), voc / "JPEGImages", split_file)
    gt_dirs = _gt_dirs(
        gt, [voc / "SegmentationClass", voc / "SegmentationClassAug", voc.parent / "SegmentationClassAug"]
    )
    return _resolved(
        "voc",
        voc,
        _split_name(split),
        ids,
        split_file,
        images,
        gt_dirs,
        xml_dir=voc / "Annotations",
        vocab_spec="voc",
    )


def resolve_coco(root: Path, split: str | None, gt: Path | None) -> Resolved:
    image_root = _layout_folder("coco", _coco_image_root(root), root)
    split = split or DEFAULT_SPLIT["coco"]
    as_file = Path(split).expanduser()
    list_file = (
        as_file if split.endswith(".txt") and as_file.is_file() else root / "ImageSets" / f"{split}.txt"
    )
    name = Path(split).stem if list_file is as_file else split
    folder = image_root / name
    if not folder.is_dir():
        available = sorted(entry.name for entry in os.scandir(image_root) if entry.is_dir())
        raise DataError(
            f"split {name!r} not found", path=folder, hint=f"available splits: {', '.join(available)}"
        )
    listing = _listing(folder)
    if list_file.is_file():
        ids = read_id_list(list_file, file_names=True)
        id_file: Path | None = list_file
    else:
        ids = [(image_id, 0) for image_id in sorted(listing)]
        id_file = None
        if not ids:
            raise DataError("split folder holds no images", path=folder)
    images = _attach_images(ids, listing, folder, id_file)
    gt_dirs = _gt_dirs(gt, [root / "SegmentationClass" / name])
    return _resolved("coco", root, name, ids, id_file, images, gt_dirs, vocab_spec="coco")


def resolve_custom(
    root: Path,
    split: str | None,
    gt: Path | None,
    label_ids: list[tuple[str, int]] | None,
    label_file: Path | None,
) -> Resolved:
    """``label_ids``: (id, line) of the label file in use (``label_file``), or None without one."""
    folder = root / "images"
    if not folder.is_dir():
        raise DataError(
            "images/ folder not found", path=folder, hint="a custom dataset keeps its images in images/"
        )
    split = split or DEFAULT_SPLIT["custom"]
    listing = _listing(folder, recursive=True)
    if split == "all" and label_ids is not None:
        ids, id_file = label_ids, label_file
    elif split == "all":
        ids = [(image_id, 0) for image_id in sorted(listing)]
        id_file = None
        if not ids:
            raise DataError(
                "images/ holds no images", path=folder, hint=f"extensions: {', '.join(IMAGE_EXTENSIONS)}"
            )
    else:
        splits = root / "splits"
        id_file = _split_file(split, [splits / f"{split}.txt"], [splits])
        ids = read_id_list(id_file)
    images = _attach_images(ids, listing, folder, id_file)
    gt_dirs = _gt_dirs(gt, [root / "masks"])
    return _resolved("custom", root, _split_name(split), ids, id_file, images, gt_dirs, label_file=label_file)
