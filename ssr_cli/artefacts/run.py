"""Run folders: the on-disk interface between stages.

Layout of a run folder (one per stage invocation)::

    RUN/
      manifest.json        schema, stage, versions, config, fingerprint, counts, completion
      <item_dir>/<id><suffix>   one file per item, written atomically
      ...                  stage-specific extras (text-embedding cache, log.jsonl, metrics.json)

Resume rules: rerunning a stage into the same folder with the same fingerprint
skips items whose file exists (a file that exists is complete, see
``atomic.py``); a different fingerprint is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ssr_cli import __version__
from ssr_cli.artefacts.atomic import atomic_write, atomic_write_json, is_temp, remove_stale_temps
from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.artefacts.item_checks import ItemCheck
from ssr_cli.artefacts.paths import locate_inputs
from ssr_cli.artefacts.shard import Shard
from ssr_cli.errors import ArtefactError, SSRError

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
        if p.name not in ours and not is_temp(p) and _REPLACED_MARK not in p.name
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


class RunFolder:
    """An opened run folder for one stage. Create with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], shard: Shard) -> None:
        self.root = root
        self.manifest = manifest
        self.shard = shard
        self.item_dir = root / manifest["item_dir"]
        self.item_suffix = manifest["item_suffix"]
        self._started = time.perf_counter()
        self._done_here = 0
        self._manifest_key: tuple[int, ...] = ()
        self._check_item: ItemCheck | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        stage: str,
        item_dir: str,
        item_suffix: str,
        config: dict[str, Any],
        result_config: dict[str, Any],
        upstream: dict[str, str] | None = None,
        inputs: dict[str, Any] | None = None,
        ids: Sequence[str],
        shard: Shard = Shard(),
        overwrite: bool = False,
        notices: Iterable[str] = (),
        extra_items: dict[str, str] | None = None,
        check_item: ItemCheck | None = None,
    ) -> RunFolder:
        """Create or resume the run folder ``root``.

        ``config`` is the full resolved configuration (recorded as is);
        ``result_config`` the part that changes results; together with
        ``upstream`` (fingerprints of the runs this one reads) and the input
        fingerprints in ``inputs`` it makes the run's fingerprint.
        ``extra_items`` ({folder: suffix}) are further per-item folders (refine's
        ``cams/``), cleared like ``item_dir`` on overwrite. ``check_item(path)`` tells
        whether a finished item file can be read: ``pending`` redoes those that cannot.

        ``overwrite`` with other settings removes every item of the old run, whatever
        the shard: a run never holds items of two fingerprints. With the same settings
        it removes only this shard's items (the others are of the same run).
        """
        root = Path(root)
        upstream = dict(upstream or {})
        inputs = locate_inputs(dict(inputs or {}), root)  # absolute + relative to the run
        input_fps = {k: v.get("fingerprint") for k, v in inputs.items() if isinstance(v, dict)}
        basis = {"stage": stage, "config": result_config, "upstream": upstream, "inputs": input_fps}
        fp = fingerprint(basis)
        manifest = new_manifest(
            stage,
            config=config,
            basis=basis,
            upstream=upstream,
            inputs=inputs,
            item_dir=item_dir,
            item_suffix=item_suffix,
            item_count=len(ids),
            notices=notices,
        )
        known = [item_dir, *(extra_items or {}), *KNOWN_EXTRAS]
        old = read_old_manifest(root, stage=stage, overwrite=overwrite, known=known)
        if old is not None and old.get("fingerprint") != fp and not overwrite:
            changed = changed_keys(old.get("fingerprint_basis", {}), basis)
            raise ArtefactError(
                f"holds a {stage} run made with different settings or inputs "
                f"(changed: {', '.join(changed[:6]) or 'unknown'})",
                path=root / MANIFEST,
                hint="pass --overwrite to replace it, or choose a new output folder",
            )
        folders = {item_dir: item_suffix, **(extra_items or {})}
        if old is not None and overwrite:
            same_run = old.get("fingerprint") == fp
            for name, suffix in folders.items():
                if same_run and not shard.is_whole:
                    cls._clear_shard(root / name, shard, ids, suffix)
                else:
                    _remove_folder(root, name)
            old = None
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
            manifest["timing"] = old.get("timing", {})
        root.mkdir(parents=True, exist_ok=True)
        (root / item_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        _remove_replaced(root)
        run = cls(root, manifest, shard)
        run._check_item = check_item
        run._write_manifest()
        return run

    @staticmethod
    def _clear_shard(item_root: Path, shard: Shard, ids: Sequence[str], suffix: str) -> None:
        for item_id in shard.select(ids):
            (item_root / f"{item_id}{suffix}").unlink(missing_ok=True)

    # ------------------------------------------------------------------ items
    def item_path(self, item_id: str) -> Path:
        return self.item_dir / f"{item_id}{self.item_suffix}"

    def is_done(self, item_id: str) -> bool:
        return self.item_path(item_id).is_file()

    def pending(self, ids: Sequence[str]) -> list[str]:
        """This shard's items that have no finished, readable file yet, in order.

        With ``check_item``, finished files that cannot be read are redone (with a notice)."""
        mine = self.shard.select(ids)
        todo = [i for i in mine if not self.is_done(i)]
        if self._check_item is None:
            return todo
        check = self._check_item
        broken = {i for i in mine if self.is_done(i) and not check(self.item_path(i))}
        if broken:
            from ssr_cli.console import warn

            example = self.item_path(sorted(broken)[0])
            warn(f"{len(broken)} finished item file(s) cannot be read and will be redone (e.g. {example})")
        return [i for i in mine if i in broken or not self.is_done(i)]

    def write_item(self, item_id: str, write: Callable[[Path], object]) -> Path:
        """Write one item atomically; ``write(tmp_path)`` must create the file.

        Refuses (ArtefactError) when another run with other settings has replaced this
        folder (``--overwrite``) since it was opened: the item is not put in place."""

        def write_checked(tmp: Path) -> None:
            write(tmp)
            self.check_still_ours()

        try:
            path = atomic_write(self.item_path(item_id), write_checked)
        except SSRError:
            self._manifest_key = ()
            self.check_still_ours()  # the folder was replaced under us: say that, not "no such file"
            raise
        self._done_here += 1
        return path

    def check_still_ours(self) -> None:
        """ArtefactError when the folder's manifest now claims another fingerprint."""
        try:
            stat = (self.root / MANIFEST).stat()
            key: tuple[int, ...] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = ()
        if key == self._manifest_key:
            return
        try:
            current = read_manifest(self.root).get("fingerprint")
        except ArtefactError:
            current = None
        if current != self.manifest["fingerprint"]:
            raise ArtefactError(
                "another run with other settings replaced this run folder (--overwrite) while this one "
                "was running; stopped without writing more",
                path=self.root,
                hint="rerun with the settings you want (the folder now holds the other run)",
            )
        self._manifest_key = key

    def extra_path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self) -> None:
        write_manifest(self.root, self.manifest)
        self._manifest_key = ()  # re-read at the next check

    def count_done(self, ids: Sequence[str]) -> int:
        return sum(1 for i in ids if self.is_done(i))

    def finish(
        self, ids: Sequence[str], extra: dict[str, Any] | None = None, loop_seconds: float | None = None
    ) -> dict[str, Any]:
        """Record counts, timing and completion; returns the manifest written.

        ``loop_seconds``: time spent on the items themselves (without start-up such as
        model loading), recorded beside the run's total seconds."""
        # re-read: another shard may have finished in the meantime
        self._manifest_key = ()
        self.check_still_ours()
        try:
            self.manifest["timing"] = read_manifest(self.root).get("timing", {})
        except ArtefactError:
            pass
        seconds = time.perf_counter() - self._started
        shards = self.manifest["timing"].setdefault("runs", [])
        entry: dict[str, Any] = {
            "shard": str(self.shard),
            "items": self._done_here,
            "seconds": round(seconds, 3),
            "finished": now_utc(),
        }
        if loop_seconds is not None:
            entry["loop_seconds"] = round(loop_seconds, 3)
        shards.append(entry)
        done = self.count_done(ids)
        self.manifest["items_done"] = done
        self.manifest["completed"] = done == len(ids)
        if extra:
            self.manifest.update(extra)
        self._write_manifest()
        return self.manifest


_REPLACED_MARK = ".replaced-"


def _remove_folder(root: Path, name: str) -> None:
    """Remove ``root/name`` at once: renamed to a hidden name first, so no old item stays visible."""
    folder = root / name
    if not folder.exists():
        return
    if not folder.is_dir():
        folder.unlink()
        return
    hidden = root / f".{name.replace('/', '_')}{_REPLACED_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    folder.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_replaced(root: Path) -> None:
    """Finish removing item folders that an interrupted overwrite renamed away."""
    for leftover in root.glob(f".*{_REPLACED_MARK}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def list_item_files(folder: Path, suffix: str) -> list[Path]:
    """Finished item files under ``folder`` (temporary files excluded), sorted."""
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file() and not is_temp(p))
