"""console.track and ProgressBar are one rich set-up: on a terminal both draw the same bar."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from clirun import on_a_terminal

pytestmark = pytest.mark.timeout(60)
SCRIPT = """
from ssr_cli.console import ProgressBar, track
assert list(track(range(5), total=5, description="counting")) == [0, 1, 2, 3, 4]
with ProgressBar("manual", total=3) as bar:
    bar.update(0, status="warming up")
    bar.update(3, status="done now")
"""


def run_on_a_terminal(code: str) -> str:
    env = {**os.environ, "COLUMNS": "120", "SSR_QUIET": ""}
    return on_a_terminal([sys.executable, "-c", code], env, timeout=30)


def test_track_and_progress_bar_draw_on_a_terminal() -> None:
    text = run_on_a_terminal(SCRIPT)
    assert "counting" in text and "5/5" in text
    assert "manual" in text and "3/3" in text and "done now" in text


def test_nothing_drawn_without_a_terminal() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
