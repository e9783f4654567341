"""Running ``ssr`` in the test's own process (the real Typer app, ``main``) and reading its
one-line errors: shared by the CLI tests."""

from __future__ import annotations

import pytest

from ssr_cli.cli import main


def run_cli(args: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ssr ARGS`` -> (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, last: bool = False) -> str:
    """The one ``ssr: error:`` line of ``err`` (info lines before it may be wrapped by rich);
    ``last``: it must also end the output."""
    lines = [line for line in err.splitlines() if line.startswith("ssr: error:")]
    assert len(lines) == 1, err
    if last:
        assert err.rstrip().endswith(lines[0])
    return lines[0]
