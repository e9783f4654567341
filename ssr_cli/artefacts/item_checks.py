"""Cheap checks that a finished item file can be read, used when a run resumes.

A file that exists under its final name was written completely (atomic writes), but a
disk error, a user's copy or a stray edit can still leave garbage there. Resuming stages
redo such items instead of counting them as done. numpy and PIL only, imported inside.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

ItemCheck = Callable[[Path], bool]


def npz_check(required: Sequence[str], load: Sequence[str] = ()) -> ItemCheck:
    """A check that the ``.npz`` opens, holds ``required`` arrays and can load those in ``load``
    (small ones: large arrays are not read, their presence is checked)."""

    def check(path: Path) -> bool:
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                if not set(required) <= set(data.files):
                    return False
                for name in load:
                    data[name]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return False
        return True

    return check


def png_check(path: Path) -> bool:
    """The PNG's structure and checksums are intact (``PIL.Image.verify``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()
    except Exception:  # PIL raises many types for broken files
        return False
    return True
