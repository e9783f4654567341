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
