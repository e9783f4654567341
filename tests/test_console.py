"""console.track and ProgressBar are one rich set-up: on a terminal both draw the same bar."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)
SCRIPT = """
from ssr_cli.console import ProgressBar, track
assert list(track(range(5), total=5, description="counting")) == [0, 1, 2, 3, 4]
with ProgressBar("manual", total=3) as bar:
    bar.update(0, status="warming up")
    bar.update(3, status="done now")
"""


def on_a_terminal(code: str) -> str:
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "SSR_QUIET": ""}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=child_fd,
                            stderr=child_fd, env=env)  # fmt: skip
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=30) == 0
    os.close(main_fd)
    return b"".join(chunks).decode(errors="replace")


def test_track_and_progress_bar_draw_on_a_terminal() -> None:
    text = on_a_terminal(SCRIPT)
    assert "counting" in text and "5/5" in text
    assert "manual" in text and "3/3" in text and "done now" in text


def test_nothing_drawn_without_a_terminal() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
