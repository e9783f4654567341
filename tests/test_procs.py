"""Helper processes die with the main process (``ssr_cli.procs``): DataLoader workers of fit-seg
and predict. (refine's fork server and pool: tests/test_refine_stage.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from clirun import process_alive

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)"),
]

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from ssr_cli.procs import worker_guard

    class Slow(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            print("worker", os.getpid(), flush=True)
            time.sleep(120)  # busy: torch's own idle watchdog never looks
            return i

    init = worker_guard() if sys.argv[1] == "guarded" else None
    for _ in DataLoader(Slow(), batch_size=None, num_workers=2, worker_init_fn=init):
        pass
    """
)


def _kill_main_and_watch(mode: str, wait_s: float) -> list[int]:
    """Run SCRIPT, kill -9 its main process once both workers are busy; the workers alive after ``wait_s``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True, env=env)
    workers: list[int] = []
    try:
        assert proc.stdout is not None
        while len(workers) < 2:
            line = proc.stdout.readline()
            assert line, "the script ended early"
            workers.append(int(line.split()[1]))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(process_alive(p) for p in workers):
            time.sleep(0.1)
        return [p for p in workers if process_alive(p)]
    finally:
        for pid in workers:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()


def test_dataloader_workers_die_with_the_main_process() -> None:
    assert _kill_main_and_watch("guarded", wait_s=5) == []


def test_without_the_guard_busy_workers_outlive_it() -> None:
    """The control: torch alone leaves busy workers running (so the test above can fail)."""
    assert len(_kill_main_and_watch("plain", wait_s=2)) == 2
