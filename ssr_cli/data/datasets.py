"""Datasets: a list of images with image-level labels, optional ground truth, a vocabulary.

``open_dataset(root, layout=..., split=..., labels=...)`` resolves one of the
layouts in ``layouts.py`` and attaches image-level labels from:

- ``"auto"``: custom layout -> its ``labels.txt``; VOC -> the ground-truth masks
  when every image has one, else the XML annotations; COCO -> the masks.
- ``"mask"``: the classes present in each ground-truth mask (ids 1..K; 0 and 255 left out).
- ``"xml"``: VOC ``Annotations/<id>.xml`` ``object/name`` entries.
- ``"none"``: no labels (every image gets ``()``), e.g. for prediction.
- a PATH: a label file (format in ``labelfile.py``).

``Dataset.label_source`` records which: ``"mask"``, ``"xml"``, ``"file:<path>"`` or ``"none"``.
Images are not decoded here (``read_image`` finds unreadable ones when used);
their files must exist.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from PIL import Image

from ssr_cli.data.images import read_mask
from ssr_cli.data.labelfile import read_label_file
from ssr_cli.data.layouts import LAYOUTS, Resolved, detect_layout, resolve_coco, resolve_custom, resolve_voc
from ssr_cli.data.vocab import Vocabulary, load_vocabulary
from ssr_cli.errors import ConfigError, DataError
from ssr_cli.parallel import parallel_map

__all__ = ["Dataset", "Item", "open_dataset", "parallel_map"]

LABEL_KEYWORDS = ("auto", "mask", "xml", "none")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Item:
    """One image: ``labels`` are its sorted foreground class ids (1..K)."""

    id: str
    image: Path
    gt: Path | None
    labels: tuple[int, ...]


@dataclass
class Dataset:
    """An ordered list of items of one split, with the vocabulary their labels index."""

    layout: str
    root: Path
    split: str
    vocab: Vocabulary
    items: list[Item]
    label_source: str
    _index: tuple[tuple[int, int], dict[str, int]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _fingerprint: tuple[int, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._find(image_id) is not None

    def _find(self, image_id: str) -> int | None:
        index = self._ids_index().get(image_id)
        if index is not None and (index >= len(self.items) or self.items[index].id != image_id):
            index = self._ids_index(refresh=True).get(image_id)  # items were changed in place
        return index

    def _ids_index(self, refresh: bool = False) -> dict[str, int]:
        signature = (id(self.items), len(self.items))
        if refresh or self._index is None or self._index[0] != signature:
            self._index = (signature, {item.id: i for i, item in enumerate(self.items)})
        return self._index[1]

    def get(self, image_id: str) -> Item:
        """The item with this id; DataError if the dataset has no such image."""
        index = self._find(image_id)
        if index is None:
            raise DataError(
                f"image {image_id!r} is not in this dataset ({self.layout} {self.split}, {len(self)} images)",
                path=self.root,
                hint="use the same --data/--split as the run that produced it",
            )
        return self.items[index]

    @property
    def has_gt(self) -> bool:
        """True when every image has a ground-truth mask."""
        return bool(self.items) and all(item.gt is not None for item in self.items)

    @property
    def gt_count(self) -> int:
        return sum(item.gt is not None for item in self.items)

    def class_counts(self) -> list[int]:
        """Images per foreground class: list of length K (index = class id - 1)."""
        counts = [0] * len(self.vocab.classes)
        for item in self.items:
            for class_id in item.labels:
                counts[class_id - 1] += 1
        return counts

    def fingerprint(self) -> str:
        """Hash of ids, labels, each image file's size and modification time, and the vocabulary
        (not paths). An image replaced by another of the same size changes it (its mtime);
        so does copying the dataset without keeping modification times (``cp -p``/``rsync -a`` keep them)."""
        from ssr_cli.artefacts import fingerprint

        key = hash((tuple(self.items), self.vocab))
        if self._fingerprint is None or self._fingerprint[0] != key:
            stamps = parallel_map(image_stamp, [item.image for item in self.items])
            value = fingerprint(
                {
                    "ids": self.ids,
                    "labels": [list(item.labels) for item in self.items],
                    "files": stamps,
                    "vocab": self.vocab.fingerprint(),
                }
            )
            self._fingerprint = (key, value)
        return self._fingerprint[1]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for manifests (``root`` absolute; ``vocab_spec`` the whole vocabulary)."""
        from ssr_cli.artefacts.paths import absolute

        return {
            "layout": self.layout,
            "root": str(absolute(self.root)),
            "split": self.split,
            "label_source": self.label_source,
            "vocab": self.vocab.name,
            "vocab_fingerprint": self.vocab.fingerprint(),
            "vocab_spec": self.vocab.to_dict(),  # so that a run's class names never need the dataset
            "num_classes": self.vocab.num_classes,
            "count": len(self),
            "gt_count": self.gt_count,
            "fingerprint": self.fingerprint(),
        }


def image_stamp(path: Path) -> list[int]:
    """[size, modification time in ns] of an image file."""
    try:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError as exc:
        raise DataError(f"cannot read image file: {exc.strerror or exc}", path=path) from None


def _mask_labels(path: Path, num_classes: int) -> tuple[int, ...]:
    mask = read_mask(path)
    histogram = Image.fromarray(mask).histogram()  # 256 counts; faster than numpy for uint8
    present = [value for value, count in enumerate(histogram) if count]
    bad = [int(v) for v in present if v >= num_classes and v != 255]
    if bad:
        raise DataError(
            f"mask has class id {bad[0]}, beyond the {num_classes - 1} classes of the vocabulary",
            path=path,
            hint="use the vocabulary the masks were made with (--vocab)",
        )
    return tuple(int(v) for v in present if 0 < v < num_classes)


def _xml_labels(path: Path, vocab: Vocabulary) -> tuple[int, ...]:
    if not path.is_file():
        raise DataError("XML annotation not found", path=path, hint="use --labels mask or a label file")
    try:
        text = path.read_bytes()
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else None
        raise DataError(f"malformed XML annotation: {exc.msg}", path=path, line=line) from None
    except OSError as exc:
        raise DataError(f"cannot read XML annotation: {exc.strerror or exc}", path=path) from None
    ids = set()
    for element in root.iter("object"):
        name = (element.findtext("name") or "").strip()
        try:
            ids.add(vocab.class_id(name))
        except KeyError:
            position = text.find(f">{name}<".encode())
            line = text.count(b"\n", 0, position) + 1 if position >= 0 else None
            raise DataError(
                f"unknown class {name!r} in XML annotation",
                path=path,
                line=line,
                hint=f"vocabulary {vocab.name!r} does not have it; pass the right --vocab",
            ) from None
    return tuple(sorted(ids))


def _labels_from_masks(resolved: Resolved, vocab: Vocabulary) -> list[tuple[int, ...]]:
    for (image_id, line), gt in zip(resolved.ids, resolved.gts, strict=True):
        if gt is None:
            folder = resolved.gt_dirs[0] if resolved.gt_dirs else resolved.root / "SegmentationClass"
            where = f"listed in {resolved.id_file}:{line}; " if resolved.id_file is not None else ""
            raise DataError(
                "ground-truth mask not found (needed for labels from masks)",
                path=folder / f"{image_id}.png",
                hint=f"{where}{resolved.gts.count(None)} of {len(resolved.gts)} images have no mask; "
                "use --labels with a label file" + (" or xml" if resolved.layout == "voc" else ""),
            )
    masks = [gt for gt in resolved.gts if gt is not None]
    return parallel_map(lambda p: _mask_labels(p, vocab.num_classes), masks, "reading masks for labels")


def _labels_from_file(
    resolved: Resolved, path: Path, table: dict[str, tuple[tuple[int, ...], int]]
) -> list[tuple[int, ...]]:
    labels = []
    for image_id, line in resolved.ids:
        if image_id not in table:
            where = f" (listed in {resolved.id_file}:{line})" if resolved.id_file not in (None, path) else ""
            raise DataError(
                f"no labels for image {image_id!r}{where}",
                path=path,
                hint="add a line '<id> <class> ...' for it",
            )
        labels.append(table[image_id][0])
    return labels


def _resolve_vocab(layout: str, root: Path, vocab: str | Path | Vocabulary | None) -> Vocabulary:
    if vocab is not None:
        return load_vocabulary(vocab)
    if layout in ("voc", "coco"):
        return load_vocabulary(layout)
    path = root / "vocab.json"
    if not path.is_file():
        raise DataError(
            "custom dataset has no vocabulary",
            path=path,
            hint='write vocab.json like {"classes": ["cat", "dog"]} or pass --vocab voc|coco|PATH',
        )
    return load_vocabulary(path)


def open_dataset(
    root: str | Path,
    *,
    layout: str = "auto",
    split: str | None = None,
    labels: str | Path = "auto",
    vocab: str | Path | Vocabulary | None = None,
    gt: str | Path | None = None,
    require_gt: bool = False,
) -> Dataset:
    """Open a dataset folder (layouts in ``layouts.py``, label sources in the module docstring).

    ``gt`` overrides the layout's ground-truth folder (``<gt>/<id>.png``);
    ``require_gt`` makes a missing mask an error. Bad input raises ``DataError``
    naming the file (and line).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError("dataset folder not found" if not root.exists() else "not a folder", path=root)
    layout = _layout(root, layout)
    gt_path = None if gt is None else Path(gt).expanduser()
    mode, label_path = _label_mode(labels)
    if mode == "xml" and layout != "voc":
        raise ConfigError(f"--labels xml needs the voc layout, not {layout}", hint="use mask or a label file")

    vocabulary = _resolve_vocab(layout, root, vocab)
    table = None
    if layout == "custom":
        own, table = _custom_label_file(root, mode, label_path, vocabulary)
        if own is not None and label_path is None and mode == "auto":
            mode, label_path = "file", own
        label_ids = None if table is None else [(i, line) for i, (_, line) in table.items()]
        resolved = resolve_custom(root, split, gt_path, label_ids, own)
    elif layout == "voc":
        resolved = resolve_voc(root, split, gt_path)
    else:
        resolved = resolve_coco(root, split, gt_path)
    if mode == "auto":
        mode = _auto_mode(resolved, root)
    label_lists, source = _image_labels(mode, resolved, vocabulary, label_path, table)

    items = [
        Item(id=image_id, image=image, gt=gt_file, labels=tuple(found))
        for (image_id, _), image, gt_file, found in zip(
            resolved.ids, resolved.images, resolved.gts, label_lists, strict=True
        )
    ]
    dataset = Dataset(resolved.layout, resolved.root, resolved.split, vocabulary, items, source)
    if require_gt and not dataset.has_gt:
        _no_gt_error(dataset, resolved.gt_dirs[0] if resolved.gt_dirs else root)
    return dataset


def _layout(root: Path, layout: str) -> str:
    """``layout`` checked, or (``auto``) detected from ``root``'s contents."""
    layout = layout.lower()
    if layout == "auto":
        return detect_layout(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}", hint="use auto, voc, coco or custom")
    return layout


def _label_mode(labels: str | Path) -> tuple[str, Path | None]:
    """(mode, label file) of ``--labels``: a keyword (``auto``, ``mask``, ...) or ``file`` + its path."""
    label_text = str(labels)
    label_path = None if label_text.lower() in LABEL_KEYWORDS else Path(label_text).expanduser()
    if label_path is not None and not label_path.is_file():
        raise DataError(
            "label file not found" if not label_path.exists() else "label file is not a file",
            path=label_path,
            hint=f"--labels takes {', '.join(LABEL_KEYWORDS)} or a label file path",
        )
    return ("file" if label_path is not None else label_text.lower()), label_path


def _custom_label_file(
    root: Path, mode: str, label_path: Path | None, vocabulary: Vocabulary
) -> tuple[Path | None, dict[str, tuple[tuple[int, ...], int]] | None]:
    """A custom dataset's label file in use and its table: ``--labels PATH``, else its own
    ``labels.txt`` (also read for the ``all`` split's ids under ``mask`` and ``none``)."""
    if label_path is None and mode in ("auto", "mask", "none") and (root / "labels.txt").is_file():
        own = root / "labels.txt"
        return own, read_label_file(own, vocabulary)
    if label_path is not None:
        return label_path, read_label_file(label_path, vocabulary)
    return None, None


def _auto_mode(resolved: Resolved, root: Path) -> str:
    """``--labels auto`` without a label file: ``mask`` when every image has one (COCO: always),
    else VOC's ``xml``; a custom dataset without masks for all is an error."""
    has_all = all(g is not None for g in resolved.gts)
    if resolved.layout == "custom" and not has_all:
        raise DataError(
            "custom dataset has no labels.txt and not every image has a mask",
            path=root / "labels.txt",
            hint="write labels.txt (one line per image: id class class ...) or pass --labels PATH",
        )
    return "mask" if has_all or resolved.layout != "voc" else "xml"


def _image_labels(
    mode: str,
    resolved: Resolved,
    vocabulary: Vocabulary,
    label_path: Path | None,
    table: dict[str, tuple[tuple[int, ...], int]] | None,
) -> tuple[list[tuple[int, ...]], str]:
    """Each image's class ids by ``mode``, and the ``label_source`` to record."""
    if mode == "mask":
        return _labels_from_masks(resolved, vocabulary), "mask"
    if mode == "xml":
        assert resolved.xml_dir is not None
        xml_dir = resolved.xml_dir
        paths = [xml_dir / f"{image_id}.xml" for image_id, _ in resolved.ids]
        return parallel_map(lambda p: _xml_labels(p, vocabulary), paths, "reading XML annotations"), "xml"
    if mode == "file":
        assert label_path is not None
        if table is None:
            table = read_label_file(label_path, vocabulary)
        from ssr_cli.artefacts.paths import absolute

        return _labels_from_file(resolved, label_path, table), f"file:{absolute(label_path)}"
    return [()] * len(resolved.ids), "none"


def _no_gt_error(dataset: Dataset, folder: Path) -> NoReturn:
    items = dataset.items
    missing = next(i for i, item in enumerate(items) if item.gt is None)
    raise DataError(
        "ground-truth mask not found",
        path=folder / f"{items[missing].id}.png",
        hint=f"{len(items) - dataset.gt_count} of {len(items)} images have no mask; pass --gt FOLDER",
    )
