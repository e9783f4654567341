"""Running ``ssr`` in the test's own process (the real Typer app, ``main``) and reading its
one-line errors: shared by the CLI tests."""

from __future__ import annotations

from collections.abc import Callable

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


def on_a_terminal(argv: list[str], env: dict[str, str], timeout: float, stdout_too: bool = True) -> str:
    """Run ``argv`` with its stderr (and its stdout, ``stdout_too``) on a pseudo-terminal, as a
    user's shell would; returns all that the terminal received, after checking exit code 0."""
    import os
    import pty
    import subprocess

    main_fd, child_fd = pty.openpty()
    stdout = child_fd if stdout_too else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=child_fd, env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=timeout) == 0
    os.close(main_fd)
    return b"".join(chunks).decode(errors="replace")


def ssr(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``ssr ARGS`` in this process, output captured before it dropped: (exit code, stdout, stderr)."""
    capsys.readouterr()
    return run_cli(list(args), capsys)


def kill_when(argv: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float) -> None:
    """Start ``argv`` (output discarded) and SIGKILL it as soon as ``ready()`` holds (or it ends, or
    ``timeout`` seconds pass): how the resume tests interrupt a run at a chosen point."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not count); Linux ``/proc``."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ssr_one_thread(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """:func:`ssr` on one torch thread, as the subprocesses of the same test run (a training run's
    numbers then do not depend on the thread count): (exit code, stdout, stderr)."""
    from ssr_cli.runtime import torch_threads

    with torch_threads(1):
        return ssr(capsys, *args)
