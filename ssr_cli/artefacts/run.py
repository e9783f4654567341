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
from ssr_cli.artefacts.shard import Shard
from ssr_cli.errors import ArtefactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ArtefactError(
            f"manifest schema {data.get('schema_version')} is newer than this ssr-cli understands",
            path=path,
            hint="upgrade ssr-cli",
        )
    return data


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
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
    ) -> RunFolder:
        """Create or resume the run folder ``root``.

        ``config`` is the full resolved configuration (recorded as is);
        ``result_config`` the part that changes results; together with
        ``upstream`` (fingerprints of the runs this one reads) and the input
        fingerprints in ``inputs`` it makes the run's fingerprint.
        """
        root = Path(root)
        upstream = dict(upstream or {})
        inputs = dict(inputs or {})
        input_fps = {k: v.get("fingerprint") for k, v in inputs.items() if isinstance(v, dict)}
        basis = {"stage": stage, "config": result_config, "upstream": upstream, "inputs": input_fps}
        fp = fingerprint(basis)
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": "ssr-cli",
            "tool_version": __version__,
            "stage": stage,
            "created": _now(),
            "updated": _now(),
            "host": socket.gethostname(),
            "config": config,
            "fingerprint_basis": basis,
            "fingerprint": fp,
            "upstream": upstream,
            "inputs": inputs,
            "item_dir": item_dir,
            "item_suffix": item_suffix,
            "item_count": len(ids),
            "items_done": 0,
            "completed": False,
            "notices": list(notices),
            "timing": {},
        }
        if root.exists() and not root.is_dir():
            raise ArtefactError(
                "output path exists and is not a folder",
                path=root,
                hint="choose a folder path for the output",
            )
        old: dict[str, Any] | None = None
        if (root / MANIFEST).exists():
            old = read_manifest(root)
            if old.get("stage") != stage:
                raise ArtefactError(
                    f"this folder holds a '{old.get('stage')}' run, not '{stage}'",
                    path=root,
                    hint="choose another output folder",
                )
        elif root.exists() and any(root.iterdir()):
            raise ArtefactError(
                "output folder is not empty and is not an ssr run folder",
                path=root,
                hint="choose a new or empty folder; nothing in it was touched",
            )
        if old is not None and old.get("fingerprint") != fp:
            if not overwrite:
                changed = _changed_keys(old.get("fingerprint_basis", {}), basis)
                raise ArtefactError(
                    f"holds a {stage} run made with different settings or inputs "
                    f"(changed: {', '.join(changed[:6]) or 'unknown'})",
                    path=root / MANIFEST,
                    hint="pass --overwrite to replace it, or choose a new output folder",
                )
            cls._clear(root / item_dir, shard, ids, item_suffix)
            old = None
        elif old is not None and overwrite:
            cls._clear(root / item_dir, shard, ids, item_suffix)
            old = None
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
            manifest["timing"] = old.get("timing", {})
        root.mkdir(parents=True, exist_ok=True)
        (root / item_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        run = cls(root, manifest, shard)
        run._write_manifest()
        return run

    @staticmethod
    def _clear(item_root: Path, shard: Shard, ids: Sequence[str], suffix: str) -> None:
        if not item_root.exists():
            return
        if shard.is_whole:
            shutil.rmtree(item_root)
            return
        for item_id in shard.select(ids):
            (item_root / f"{item_id}{suffix}").unlink(missing_ok=True)

    # ------------------------------------------------------------------ items
    def item_path(self, item_id: str) -> Path:
        return self.item_dir / f"{item_id}{self.item_suffix}"

    def is_done(self, item_id: str) -> bool:
        return self.item_path(item_id).is_file()

    def pending(self, ids: Sequence[str]) -> list[str]:
        """This shard's items that have no finished file yet, in order."""
        return [i for i in self.shard.select(ids) if not self.is_done(i)]

    def write_item(self, item_id: str, write: Callable[[Path], object]) -> Path:
        """Write one item atomically; ``write(tmp_path)`` must create the file."""
        path = atomic_write(self.item_path(item_id), write)
        self._done_here += 1
        return path

    def extra_path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def count_done(self, ids: Sequence[str]) -> int:
        return sum(1 for i in ids if self.is_done(i))

    def finish(
        self, ids: Sequence[str], extra: dict[str, Any] | None = None, loop_seconds: float | None = None
    ) -> dict[str, Any]:
        """Record counts, timing and completion; returns the manifest written.

        ``loop_seconds``: time spent on the items themselves (without start-up such as
        model loading), recorded beside the run's total seconds."""
        # re-read: another shard may have finished in the meantime
        try:
            current = read_manifest(self.root)
            if current.get("fingerprint") == self.manifest["fingerprint"]:
                self.manifest["timing"] = current.get("timing", {})
        except ArtefactError:
            pass
        seconds = time.perf_counter() - self._started
        shards = self.manifest["timing"].setdefault("runs", [])
        entry: dict[str, Any] = {
            "shard": str(self.shard),
            "items": self._done_here,
            "seconds": round(seconds, 3),
            "finished": _now(),
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


def list_item_files(folder: Path, suffix: str) -> list[Path]:
    """Finished item files under ``folder`` (temporary files excluded), sorted."""
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file() and not is_temp(p))
