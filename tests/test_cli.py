"""The CLI shell: help, version, start-up cost, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ssr_cli import __version__

pytestmark = pytest.mark.timeout(120)


def _ssr(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ssr_cli", *args], capture_output=True, text=True, env=full_env
    )


def test_version():
    out = _ssr("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ssr-cli {__version__}"


def test_help_lists_commands_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from ssr_cli.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'open_clip', 'timm', 'cv2', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    for command in ("eval", "data"):
        assert command in out.stdout


def test_usage_error_exits_2():
    out = _ssr("eval", "--no-such-flag")
    assert out.returncode == 2
    assert "no-such-flag" in out.stderr


def test_user_error_is_one_line_exit_1(tmp_path):
    out = _ssr("eval", str(tmp_path / "missing"), "--gt", str(tmp_path / "nogt"))
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ssr: error:"), out.stderr
    assert "missing" in lines[0] or "nogt" in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback(tmp_path):
    out = _ssr("eval", str(tmp_path / "missing"), "--gt", str(tmp_path / "nogt"), env={"SSR_DEBUG": "1"})
    assert out.returncode == 1
    assert "Traceback" in out.stderr
