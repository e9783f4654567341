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

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ssr_cli.artefacts.atomic import atomic_write, is_temp, remove_stale_temps
from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.artefacts.item_checks import ItemCheck
from ssr_cli.artefacts.manifest_file import (  # re-exported: the manifest file's home is manifest_file
    KNOWN_EXTRAS as KNOWN_EXTRAS,
)
from ssr_cli.artefacts.manifest_file import MANIFEST as MANIFEST
from ssr_cli.artefacts.manifest_file import REPLACED_MARK, read_old_manifest, write_manifest
from ssr_cli.artefacts.manifest_file import SCHEMA_VERSION as SCHEMA_VERSION
from ssr_cli.artefacts.manifest_file import changed_keys as changed_keys
from ssr_cli.artefacts.manifest_file import new_manifest as new_manifest
from ssr_cli.artefacts.manifest_file import now_utc as now_utc
from ssr_cli.artefacts.manifest_file import read_manifest as read_manifest
from ssr_cli.artefacts.paths import locate_inputs
from ssr_cli.artefacts.shard import Shard
from ssr_cli.errors import ArtefactError, SSRError


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


def _remove_folder(root: Path, name: str) -> None:
    """Remove ``root/name`` at once: renamed to a hidden name first, so no old item stays visible."""
    folder = root / name
    if not folder.exists():
        return
    if not folder.is_dir():
        folder.unlink()
        return
    hidden = root / f".{name.replace('/', '_')}{REPLACED_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    folder.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_replaced(root: Path) -> None:
    """Finish removing item folders that an interrupted overwrite renamed away."""
    for leftover in root.glob(f".*{REPLACED_MARK}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def list_item_files(folder: Path, suffix: str) -> list[Path]:
    """Finished item files under ``folder`` (temporary files excluded), sorted."""
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file() and not is_temp(p))
