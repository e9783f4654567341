"""A plain folder of images (``ssr predict --images DIR``): its items and its fingerprint.

Torch-free, so that a rerun of a complete run can be recognised before torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.artefacts.paths import absolute
from ssr_cli.errors import DataError


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) of every image under ``folder`` (any depth), sorted by id."""
    from ssr_cli.data.images import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise DataError("image folder not found", path=folder, hint="pass a folder of images to --images")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            image_id = path.relative_to(folder).with_suffix("").as_posix()
            if image_id in found:
                raise DataError(
                    f"two images share the id {image_id!r}",
                    path=path,
                    hint=f"rename one of {found[image_id].name} and {path.name}",
                )
            found[image_id] = path
    if not found:
        raise DataError(
            "no images in this folder", path=folder, hint="extensions: " + ", ".join(IMAGE_EXTENSIONS)
        )
    return sorted(found.items())


def describe_folder(folder: Path) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """The images of ``folder`` and the manifest's description of them (the fingerprint covers
    the ids and each file's size and modification time, as a dataset's does)."""
    from ssr_cli.data.datasets import image_stamp
    from ssr_cli.parallel import parallel_map

    pairs = list_images(Path(folder))
    stamps = parallel_map(image_stamp, [p for _, p in pairs])
    fp = fingerprint({"ids": [i for i, _ in pairs], "files": stamps})
    return pairs, {"kind": "folder", "root": str(absolute(folder)), "count": len(pairs), "fingerprint": fp}
