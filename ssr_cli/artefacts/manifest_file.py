"""The manifest file of a run folder: creating, writing, reading and checking ``manifest.json``.

``new_manifest`` builds the manifest of a new run (per-item runs and training runs alike),
``write_manifest`` is the one writer, ``read_manifest`` the one reader (a one-line error names
the file when it is unusable), ``read_old_manifest`` what a stage finds in its output folder
before it writes there. The typed view of a manifest is ``ssr_cli.artefacts.manifest``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ssr_cli import __version__
from ssr_cli.artefacts.atomic import atomic_write_json, is_temp
from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.errors import ArtefactError

#: part of the name under which a replaced run's folder waits to be deleted (``RunFolder.open``)
REPLACED_MARK = ".replaced-"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def now_utc() -> str:
    """The time stamp of manifests: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_manifest(
    stage: str,
    *,
    config: dict[str, Any],
    basis: dict[str, Any],
    upstream: dict[str, Any],
    inputs: dict[str, Any],
    item_dir: str,
    item_suffix: str,
    item_count: int,
    notices: Iterable[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a new run, the same for per-item runs (``RunFolder.open``) and training
    runs (train-cmpa, fit-seg): ``basis`` is what the fingerprint hashes; ``extra`` are the
    stage's own top-level keys."""
    stamp = now_utc()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "ssr-cli",
        "tool_version": __version__,
        "stage": stage,
        "created": stamp,
        "updated": stamp,
        "host": socket.gethostname(),
        "config": config,
        "fingerprint_basis": basis,
        "fingerprint": fingerprint(basis),
        "upstream": upstream,
        "inputs": inputs,
        "item_dir": item_dir,
        "item_suffix": item_suffix,
        "item_count": item_count,
        "items_done": 0,
        "completed": False,
        "notices": list(notices),
        "timing": {},
        **extra,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Stamp ``updated`` and write ``folder/manifest.json`` atomically (the one manifest writer)."""
    manifest["updated"] = now_utc()
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read ``folder/manifest.json``; a one-line error names the file when it is unusable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtefactError(
            "no manifest.json here: not an ssr run folder",
            path=folder,
            hint="pass the output folder of an ssr stage",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactError(
            f"unreadable manifest ({exc})", path=path, hint="rerun the stage with --overwrite"
        ) from None
    if not isinstance(data, dict) or "stage" not in data:
        raise ArtefactError("not an ssr manifest", path=path, hint="rerun the stage with --overwrite")
    problem = _manifest_problem(data)
    if problem:
        raise ArtefactError(
            f"not a valid ssr manifest ({problem})", path=path, hint="rerun the stage with --overwrite"
        )
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ArtefactError(
            f"manifest schema {data.get('schema_version')} is newer than this ssr-cli understands",
            path=path,
            hint="upgrade ssr-cli",
        )
    return data


#: files that other commands add to a run folder (``ssr eval`` writes metrics.json)
KNOWN_EXTRAS = ("metrics.json", "text_embeddings.safetensors")


def read_old_manifest(
    root: Path, *, stage: str, overwrite: bool, known: Iterable[str]
) -> dict[str, Any] | None:
    """The manifest of the run already in ``root`` for a ``stage`` about to write there, or None.

    Refuses a folder that is not a run folder (and not empty) and a run of another stage.
    An unreadable manifest is refused unless ``overwrite``; with ``overwrite`` it counts as a
    run of other settings (``{"fingerprint": None}``), but only when every entry of the
    folder is one an ssr stage writes there (``known`` names, the manifest, our temporary
    files): a folder that holds anything else is never replaced.
    """
    if root.exists() and not root.is_dir():
        raise ArtefactError(
            "output path exists and is not a folder", path=root, hint="choose a folder path for the output"
        )
    if not (root / MANIFEST).exists():
        if root.exists() and any(root.iterdir()):
            raise ArtefactError(
                "output folder is not empty and is not an ssr run folder",
                path=root,
                hint="choose a new or empty folder; nothing in it was touched",
            )
        return None
    try:
        old = read_manifest(root)
    except ArtefactError as exc:
        if not overwrite:
            raise
        strange = _foreign_entries(root, known)
        if strange:
            raise ArtefactError(
                f"{exc.what}; not replaced: the folder also holds {strange[0]!r}, which no ssr stage writes",
                path=root / MANIFEST,
                hint="choose another output folder, or empty this one yourself",
            ) from None
        return {"stage": stage, "fingerprint": None}
    if old.get("stage") != stage:
        raise ArtefactError(
            f"this folder holds a '{old.get('stage')}' run, not '{stage}'",
            path=root,
            hint="choose another output folder",
        )
    return old


def _foreign_entries(root: Path, known: Iterable[str]) -> list[str]:
    """Top-level entries of ``root`` that a run folder of ours would not hold."""
    ours = {MANIFEST, *known}
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name not in ours and not is_temp(p) and REPLACED_MARK not in p.name
    )


#: the type every manifest key that ssr reads back must have (when present)
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "stage": str,
    "schema_version": int,
    "fingerprint": str,
    "config": dict,
    "fingerprint_basis": dict,
    "upstream": dict,
    "inputs": dict,
    "timing": dict,
    "item_dir": str,
    "item_suffix": str,
    "item_count": int,
    "items_done": int,
    "completed": bool,
    "notices": list,
}


def _manifest_problem(data: dict[str, Any]) -> str | None:
    """What makes ``data`` unusable as a manifest (a key of the wrong type, an item folder
    outside the run folder), or None."""
    for key, kind in _MANIFEST_TYPES.items():
        if key in data and not isinstance(data[key], kind):
            return f"{key!r} is a {type(data[key]).__name__}"
        if kind is int and key in data and isinstance(data[key], bool):
            return f"{key!r} is a bool"
    for key in ("inputs", "upstream"):
        if any(not isinstance(v, dict | str | None) for v in data.get(key, {}).values()):
            return f"{key!r} holds an entry that is neither an object nor a string"
    item_dir = data.get("item_dir")
    if isinstance(item_dir, str) and (item_dir.startswith("/") or ".." in Path(item_dir).parts):
        return f"item folder {item_dir!r} lies outside the run folder"
    return None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new)):
            keys += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".") or "(value)"]
