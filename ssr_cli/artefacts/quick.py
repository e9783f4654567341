"""A fast answer for the rerun of a complete run: "nothing to do", without importing torch.

A stage's real fingerprint needs its models (CLIP's weights hash, the resolved device and
precision), which costs seconds to load. A complete run also records a *quick key*: a hash of
everything the command was given that can change its results, computed without torch — the
options as given, the dataset fingerprint (file sizes and modification times), the size and
modification time of every weights or config file it read, the fingerprints of the upstream
runs, the tool version and the host (``--device auto`` resolves per machine) — plus a stamp of
the files in the run folder (items, refined CAMs, caches; not the manifest or eval's
metrics.json). A rerun whose quick key and file stamp both match stops at once; any difference
(another option, a touched image or weights file, a missing or rewritten file) takes the
normal path, which checks everything.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ssr_cli import __version__
from ssr_cli.artefacts.fingerprint import fingerprint

QUICK = "quick_rerun"


def file_stamp(path: str | Path | None) -> list[Any] | None:
    """[absolute path, size, modification time in ns] of a file (of a folder: a stamp of every
    file in it); None for no path, [path, None, None] when it does not exist."""
    if path is None:
        return None
    try:
        full = Path(os.path.abspath(Path(path).expanduser()))
        st = full.stat()
        if full.is_dir():  # a folder of weights or labels: every file in it
            return [str(full), "folder", folder_stamp(full)]
    except OSError:
        return [str(path), None, None]
    return [str(full), st.st_size, st.st_mtime_ns]


def run_stamp(folder: str | Path | None) -> list[Any] | None:
    """The fingerprint and completion of an upstream run folder (from its manifest)."""
    if folder is None:
        return None
    from ssr_cli.artefacts.manifest_file import MANIFEST

    path = Path(folder) / MANIFEST
    try:
        import json

        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [str(folder), None]
    if not isinstance(manifest, dict):
        return [str(folder), None]
    return [str(Path(folder).resolve()), manifest.get("fingerprint"), manifest.get("completed")]


def quick_key(
    stage: str,
    settings: dict[str, Any],
    *,
    dataset_fingerprint: str | None,
    files: Iterable[str | Path | None] = (),
    runs: Iterable[str | Path | None] = (),
    env: Iterable[str] = (),
) -> str:
    """The quick key of a command (see the module docstring)."""
    return fingerprint(
        {
            "stage": stage,
            "tool_version": __version__,
            "host": socket.gethostname(),
            "settings": settings,
            "dataset": dataset_fingerprint,
            "files": [file_stamp(f) for f in files],
            "runs": [run_stamp(r) for r in runs],
            "env": {name: os.environ.get(name, "") for name in env},
        }
    )


#: files of a run folder that others rewrite (eval's report) or that the stamp itself changes
_NOT_STAMPED = ("manifest.json", "metrics.json")


def _items_stamp(out: Path, manifest: dict[str, Any]) -> str | None:
    """A hash of every file of the run folder (item files, refined CAMs, caches): names, sizes,
    modification times; the manifest and eval's metrics.json left out."""
    if "item_dir" in manifest:  # a per-item run; training runs have none and stamp every file
        if not isinstance(manifest["item_dir"], str) or not (out / manifest["item_dir"]).is_dir():
            return None
    return folder_stamp(out, skip=_NOT_STAMPED)


def folder_stamp(root: str | Path, skip: Iterable[str] = ()) -> str | None:
    """A hash of the files under ``root`` (relative names, sizes, modification times), ``skip``
    (relative names) left out; None when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    skipped = set(skip)
    stamps = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel in skipped:
                continue
            st = path.stat()
            stamps.append([rel, st.st_size, st.st_mtime_ns])
    return fingerprint(stamps)


def finished_unchanged(out: str | Path, key: str) -> dict[str, Any] | None:
    """The manifest of ``out`` when it is a complete run made with this quick key whose item
    files are as it left them; None otherwise (then the stage runs its normal checks)."""
    from ssr_cli.artefacts.manifest_file import read_manifest
    from ssr_cli.errors import SSRError

    out = Path(out)
    if not (out / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(out)
    except SSRError:
        return None
    quick = manifest.get(QUICK)
    if not manifest.get("completed") or not isinstance(quick, dict) or quick.get("key") != key:
        return None
    try:
        if _items_stamp(out, manifest) != quick.get("items"):
            return None
    except OSError:
        return None
    return manifest


def remember(out: str | Path, key: str) -> None:
    """Record the quick key and the item stamp in the manifest of the complete run ``out``."""
    from ssr_cli.artefacts.atomic import atomic_write_json
    from ssr_cli.artefacts.manifest_file import read_manifest
    from ssr_cli.errors import SSRError

    out = Path(out)
    try:
        manifest = read_manifest(out)
        if not manifest.get("completed"):
            return
        manifest[QUICK] = {"key": key, "items": _items_stamp(out, manifest)}
        atomic_write_json(out / "manifest.json", manifest)
    except (OSError, SSRError):
        return  # only a later rerun is slower


def nothing_to_do(command: str, out: str | Path, manifest: dict[str, Any], ids: list[str], shard: Any) -> str:
    """The line a quick rerun prints: the full path's own count line, then "nothing to do"."""
    folder = Path(out) / str(manifest.get("item_dir", ""))
    suffix = str(manifest.get("item_suffix", ""))
    done = [i for i in ids if (folder / f"{i}{suffix}").is_file()]
    mine = shard.select(done)
    return (
        f"{command}: {len(mine)} images in shard {shard}, {len(mine)} already done; the run is complete "
        f"(fingerprint {manifest.get('fingerprint')}) and its inputs are unchanged: nothing to do"
    )


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def answered_training_rerun(
    command: str, out: str | Path, key: str | None, overwrite: bool, result_line: Any, what: str
) -> bool:
    """For a training command, before torch: when ``out`` is a complete run made with the quick
    ``key`` and untouched, say so (``what`` it holds; ``result_line(out, manifest)`` on stdout,
    as a finished run prints it; main process only) and return True; else False (it runs)."""
    done = None if overwrite or key is None else finished_unchanged(out, key)
    if done is None:
        return False
    if _is_main_process():
        from ssr_cli.console import info

        unchanged = "its inputs are unchanged; nothing to do (--overwrite trains again)"
        info(f"{command}: {out} already holds {what} and {unchanged}")
        print(result_line(Path(out), done))
    return True


def finish_training_command(
    out: str | Path, key: str | None, manifest: dict[str, Any], result_line: Any
) -> None:
    """After a training stage ran: remember the quick key of a complete run and print its result
    line (main process only)."""
    if not _is_main_process():
        return
    if manifest.get("completed") and key is not None:
        remember(out, key)
    print(result_line(Path(out), manifest))
