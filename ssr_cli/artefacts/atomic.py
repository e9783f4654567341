"""Atomic per-item writes: temporary name in the same folder, then rename.

A file that exists under its final name is complete. Temporary files are named
``.<final name>.tmp-<host>-<pid>-<random>`` so a later run can tell which ones
belong to dead processes on this host and remove them.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssr_cli.errors import os_error, torch_write_error
from ssr_cli.procs import pid_alive

TMP_MARK = ".tmp-"
_HOST = socket.gethostname().replace("-", "_")


def temp_path_for(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(final: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``final``.

    ``write`` must create the file at the path it is given. On any exception the
    temporary file is removed and the final file is left untouched; OS errors (full
    disk, read-only folder) and torch's writer errors become one-line ``SSRError``s.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, final.parent) from None
    tmp = temp_path_for(final)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:  # a full disk, a read-only folder: one line naming the file
        tmp.unlink(missing_ok=True)
        raise os_error(exc, final) from None
    except RuntimeError as exc:
        tmp.unlink(missing_ok=True)
        mapped = torch_write_error(exc, final)
        if mapped is None:
            raise
        raise mapped from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_bytes(final: str | Path, data: bytes) -> Path:
    return atomic_write(final, lambda p: p.write_bytes(data))


def atomic_write_text(final: str | Path, text: str) -> Path:
    return atomic_write(final, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(final: str | Path, obj: Any) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temporary files left in ``folder`` (recursively) by dead processes of this host.

    Temporary files of live processes (another shard running now) and of other
    hosts (a shared file system) are kept. Returns how many were removed.
    """
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    for path in folder.rglob(f".*{TMP_MARK}*"):
        tail = path.name.rsplit(TMP_MARK, 1)[1]
        parts = tail.split("-")
        if len(parts) != 3:
            continue
        host, pid_text, _ = parts
        if host != _HOST or not pid_text.isdigit():
            continue
        if not pid_alive(int(pid_text)) or int(pid_text) == os.getpid():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name
