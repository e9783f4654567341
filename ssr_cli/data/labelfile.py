"""Image-level label files and id lists (split files).

Label file format (UTF-8 text), one line per image::

    # comments and blank lines are ignored
    2007_000032 aeroplane person
    2007_000039 tvmonitor
    street/img_0001, potted plant, dining table
    img_0002

- The id comes first: the text up to the first space, tab or comma. It is the
  image path relative to the images folder without its extension, with ``/``
  separators (VOC/COCO: the file name without extension).
- Then the image's class names: separated by commas when the line has a comma
  after the id, else by whitespace (so write multi-word names with commas, or
  with ``_`` for the spaces: ``potted_plant``). Names match the vocabulary
  case-insensitively, ignoring spaces, ``_`` and ``-``; aliases are accepted.
- An id alone means an image with no foreground class. Repeated names on a line
  count once; a repeated id is an error.

Split files list one id per line (blank lines and ``#`` comments ignored). For
VOC-style lists that name files (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``,
as DeepLab's ``train_aug.txt``), the stem of the first path is the id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from ssr_cli.data.vocab import Vocabulary
from ssr_cli.errors import DataError

__all__ = ["check_id", "format_label_file", "read_id_list", "read_label_file"]

_DRIVE = re.compile(r"^[A-Za-z]:")
_ID_END = re.compile(r"[\s,]")


def check_id(image_id: str, path: str | Path | None = None, line: int | None = None) -> str:
    """Return ``image_id`` if it is a safe relative id, else raise DataError at ``path:line``.

    Refused: empty ids, absolute paths, drive letters, backslashes, and ``.``/``..``
    or empty path components (ids may not escape the dataset folder).
    """
    problem = None
    if not image_id:
        problem = "empty image id"
    elif "\\" in image_id:
        problem = f"image id {image_id!r} contains a backslash"
    elif image_id.startswith("/") or _DRIVE.match(image_id):
        problem = f"image id {image_id!r} is an absolute path"
    elif "\x00" in image_id:
        problem = f"image id {image_id!r} contains a NUL character"
    else:
        parts = image_id.split("/")
        if any(part in ("", ".", "..") for part in parts):
            problem = f"image id {image_id!r} has an empty, '.' or '..' component"
    if problem is not None:
        raise DataError(
            problem,
            path=path,
            line=line,
            hint="ids are paths relative to the images folder, with '/' separators, without extension",
        )
    return image_id


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} not found", path=path)
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not UTF-8 text: {exc.reason}", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read {what}: {exc.strerror or exc}", path=path) from None


def _content_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines of ``path`` that are not blank once ``#`` comments go."""
    for number, raw in enumerate(_read_lines(path, what), start=1):
        text = raw.split("#", 1)[0].strip()
        if text:
            yield number, text


def _new_id(image_id: str, first: int | None, path: Path, line: int, hint: str) -> None:
    """Check ``image_id`` (:func:`check_id`) and that it was not listed before, on line ``first``."""
    check_id(image_id, path, line)
    if first is not None:
        raise DataError(
            f"duplicate image id {image_id!r} (first on line {first})", path=path, line=line, hint=hint
        )


def read_id_list(path: str | Path, file_names: bool = False) -> list[tuple[str, int]]:
    """Read a split file: ``[(id, line number), ...]`` in file order.

    ``file_names``: a first token naming an image file (``/JPEGImages/x.jpg``)
    gives its stem as the id (VOC/COCO layouts). Duplicates and an empty list raise DataError.
    """
    path = Path(path)
    seen: dict[str, int] = {}
    ids: list[tuple[str, int]] = []
    for number, text in _content_lines(path, "split file"):
        image_id = text.split()[0]
        if file_names and "." in image_id.rsplit("/", 1)[-1] and "/" in image_id:
            image_id = PurePosixPath(image_id).stem
        _new_id(image_id, seen.get(image_id), path, number, "list each image once")
        seen[image_id] = number
        ids.append((image_id, number))
    if not ids:
        raise DataError("split file lists no images", path=path, hint="one image id per line")
    return ids


def parse_label_line(text: str) -> tuple[str, list[str], bool]:
    """Split one (comment-free, non-blank) label line into id, class names, and comma mode."""
    match = _ID_END.search(text)
    if match is None:
        return text, [], False
    image_id, rest = text[: match.start()], text[match.start() :]
    commas = "," in rest
    names = [name.strip() for name in rest.split(",")] if commas else rest.split()
    return image_id, [name for name in names if name], commas


def read_label_file(path: str | Path, vocab: Vocabulary) -> dict[str, tuple[tuple[int, ...], int]]:
    """Read a label file (format in the module docstring).

    Returns ``{id: (sorted class ids 1..K, line number)}`` in file order. Unknown
    class names, bad or duplicate ids raise DataError naming ``path:line``.
    """
    path = Path(path)
    labels: dict[str, tuple[tuple[int, ...], int]] = {}
    for number, text in _content_lines(path, "label file"):
        image_id, names, commas = parse_label_line(text)
        first = labels[image_id][1] if image_id in labels else None
        _new_id(image_id, first, path, number, "give each image one line with all its classes")
        ids = set()
        for name in names:
            try:
                ids.add(vocab.class_id(name))
            except KeyError:
                shown = ", ".join(vocab.classes[:6]) + (", ..." if len(vocab.classes) > 6 else "")
                multi = " (multi-word names need commas or '_')" if not commas and len(names) > 1 else ""
                raise DataError(
                    f"unknown class {name!r} for image {image_id!r}{multi}",
                    path=path,
                    line=number,
                    hint=f"vocabulary {vocab.name!r} has: {shown}",
                ) from None
        labels[image_id] = (tuple(sorted(ids)), number)
    if not labels:
        raise DataError(
            "label file lists no images", path=path, hint="one line per image: id class class ..."
        )
    return labels


def format_label_file(rows: Iterable[tuple[str, Iterable[int]]], vocab: Vocabulary, header: str = "") -> str:
    """Label-file text for ``(id, class ids)`` rows; names are written with ``_`` for spaces."""
    lines = [f"# {text}" for text in header.splitlines() if text.strip()]
    lines.append("# format: <image id> <class> <class> ...  ('_' stands for a space in a class name)")
    for image_id, class_ids in rows:
        names = [vocab.classes[i - 1].replace(" ", "_") for i in sorted(class_ids)]
        lines.append(" ".join([image_id, *names]))
    return "\n".join(lines) + "\n"
