"""Paths recorded in manifests, so that a run folder works from any directory and after a move.

Every input that names a folder or file (``inputs.<name>.root`` / ``.path``) is stored as an
absolute, resolved path plus the same path relative to the run folder
(``root_from_run`` / ``path_from_run``). Reading back (``recorded_path``) tries, in order:
the absolute path, the path relative to the run folder where it is now (a project moved as a
whole), and for manifests of older versions that stored the path as typed, that path from the
current directory and from the run folder's parent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_KEYS = ("root", "path", "dir")


def absolute(path: str | Path) -> Path:
    """``path`` made absolute and resolved (symbolic links followed), without requiring it to exist."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def locate_inputs(inputs: dict[str, Any], run_root: str | Path) -> dict[str, Any]:
    """A copy of ``inputs`` whose ``root``/``path`` entries are absolute, each with ``<key>_from_run``.

    Only the recorded locations change; fingerprints in ``inputs`` are untouched.
    """
    run = absolute(run_root)
    located: dict[str, Any] = {}
    for name, info in inputs.items():
        if isinstance(info, dict):
            info = dict(info)
            for key in PATH_KEYS:
                value = info.get(key)
                if isinstance(value, str) and value:
                    full = absolute(value)
                    info[key] = str(full)
                    info[f"{key}_from_run"] = os.path.relpath(full, run)
        located[name] = info
    return located


def recorded_candidates(info: dict[str, Any], run_root: str | Path, key: str = "root") -> list[Path]:
    """Where the input recorded as ``info[key]`` may be now, most likely first (no duplicates)."""
    run = absolute(run_root)
    found: list[Path] = []
    value = info.get(key)
    relative = info.get(f"{key}_from_run")
    if isinstance(value, str) and value and Path(value).is_absolute():
        found.append(Path(value))
    if isinstance(relative, str) and relative:
        found.append(absolute(run / relative))
    if isinstance(value, str) and value and not Path(value).is_absolute():
        found += [absolute(value), absolute(run.parent / value)]  # older manifests: as typed
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def recorded_path(info: dict[str, Any], run_root: str | Path, key: str = "root") -> Path | None:
    """The first existing location of the recorded input (see ``recorded_candidates``), else None."""
    for path in recorded_candidates(info, run_root, key):
        if path.exists():
            return path
    return None
