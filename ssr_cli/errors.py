"""Error types a user can cause, each rendered as one line with a hint.

Everything the CLI reports as a user error (exit code 1) is an ``SSRError``.
Usage errors (bad flags) are left to click (exit code 2); anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class SSRError(Exception):
    """A problem the user can fix.

    ``what`` says what is wrong, ``path``/``line`` where, ``hint`` what to do.
    ``str(err)`` is the one line the CLI prints.
    """

    def __init__(
        self,
        what: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.what = what
        self.path = None if path is None else str(path)
        self.line = line
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path + (f":{self.line}" if self.line is not None else "") + ": "
        text = f"{where}{self.what}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())  # guarantee a single line


class DataError(SSRError):
    """Bad or missing dataset input: images, masks, label files, vocabularies, splits."""


class ConfigError(SSRError):
    """An option value that cannot work (checked after parsing)."""


class ArtefactError(SSRError):
    """A run folder that does not match the requested run (fingerprint, stage, schema)."""


class WeightsError(SSRError):
    """Model weights that cannot be found or loaded."""


_OS_ADVICE: dict[str, tuple[str, str]] = {
    "ENOSPC": ("no space left on the device", "free disk space or choose another output folder"),
    "EDQUOT": ("disk quota exceeded", "free space in your quota or choose another output folder"),
    "EFBIG": (
        "file too large for this file system or the process's file size limit",
        "choose another output folder or raise the limit (ulimit -f)",
    ),
    "EROFS": ("read-only file system", "choose an output folder on a writable disk"),
    "EACCES": ("permission denied", "choose a folder you may write to, or fix its permissions"),
    "EPERM": ("operation not permitted", "choose a folder you may write to, or fix its permissions"),
    "ENOENT": ("no such file or folder", "check the path"),
    "ENOTDIR": ("a part of the path is not a folder", "check the path"),
    "EISDIR": ("is a folder, not a file", "check the path"),
    "EIO": ("input/output error (a failing disk or network file system)", "check the disk"),
}
_KEPT = (
    "finished items and checkpoints are kept: rerun the same command to resume "
    "(train-cmpa and fit-seg: add --resume)"
)


def os_error(exc: OSError, path: str | Path | None = None) -> SSRError:
    """An ``OSError`` (full disk, read-only folder, permissions, ...) as one line naming the path."""
    import errno

    name = errno.errorcode.get(exc.errno or -1, "")
    what, hint = _OS_ADVICE.get(name, (exc.strerror or type(exc).__name__, "check the path and the disk"))
    where = exc.filename if exc.filename is not None else path
    writing = name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO")
    return ArtefactError(what, path=where, hint=f"{hint}; {_KEPT}" if writing else hint)


def torch_write_error(exc: BaseException, path: str | Path | None) -> SSRError | None:
    """torch.save's C++ writer errors ("PytorchStreamWriter failed writing file ... inline_container")
    as one line naming the file; None for other exceptions."""
    text = str(exc)
    if "PytorchStreamWriter" not in text and "inline_container" not in text:
        return None
    return ArtefactError(
        "writing failed (the disk is full or not writable)",
        path=path,
        hint=f"free disk space or choose another output folder; {_KEPT}",
    )
