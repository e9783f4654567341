"""The one rich console (stderr), progress bars and summary helpers.

Logs and progress go to stderr; results go to stdout (plain ``print`` or
``stdout_console``). Progress bars are off when stderr is not a terminal or
when ``--quiet`` is given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")

console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout_console = Console(highlight=False)
_state = {"quiet": False}


def set_quiet(quiet: bool, *, reset: bool = False) -> None:
    """``--quiet`` on the root sets it for the invocation (``reset=True``); a command's own
    ``--quiet`` can only turn it on."""
    if quiet or reset:
        _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"] or os.environ.get("SSR_QUIET", "") not in ("", "0")


def info(message: str) -> None:
    """A progress/log line on stderr; silent with --quiet."""
    if not is_quiet():
        console.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress_enabled() -> bool:
    return not is_quiet() and sys.stderr.isatty()


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar on stderr when enabled (a :class:`ProgressBar`), plainly otherwise."""
    if not progress_enabled():
        yield from items
        return
    with ProgressBar(description, total=total) as bar:
        for item in items:
            yield item
            bar.update(1)


class ProgressBar:
    """A manually advanced progress bar with a free-text status (loss, throughput...).

    Usage::

        with ProgressBar("train", total=1000) as bar:
            bar.update(advance=1, status="loss 0.31")
    """

    def __init__(self, description: str, total: int | None, completed: int = 0) -> None:
        self.description = description
        self.total = total
        self.completed = completed
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if progress_enabled():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self.completed, status=""
            )
        return self

    def update(self, advance: float = 1, status: str | None = None) -> None:
        if self._bar is not None:
            kwargs = {} if status is None else {"status": status}
            self._bar.update(self._task, advance=advance, **kwargs)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
