"""Validation of training settings: the first unmet condition becomes a one-line ``ConfigError``.
Pure Python (the CLI's settings modules import it at no cost)."""

from __future__ import annotations

from collections.abc import Iterable

from ssr_cli.errors import ConfigError


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ``ConfigError(message)`` for the first ``(ok, message)`` whose ``ok`` is false."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
