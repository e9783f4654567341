"""Helper processes die with the command that started them.

When the main process of a stage is killed (``kill -9``, out of memory), the processes it
started (refine's fork server and pool workers, DataLoader workers) must not live on.
Two mechanisms, both set up from inside the helper process:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the process as soon as
  its parent exits (refine's fork server has the main process as parent, the pool
  workers the fork server: the chain unwinds at once);
- everywhere: a daemon thread that checks every ``poll_s`` seconds whether the main
  process still exists and exits the helper when it is gone.

Standard library only; import it anywhere.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

MAIN_PID_ENV = "SSR_MAIN_PID"
_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent exits. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_when_gone(pid: int, poll_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process (``os._exit``) once process ``pid`` is gone."""

    def watch() -> None:
        while pid_alive(pid):
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="ssr-parent-watch", daemon=True).start()


def guard_helper(main_pid: int | None, *, watch_thread: bool = True) -> None:
    """Called first thing in a helper process: die with the parent, and with ``main_pid``.

    ``watch_thread`` False (a process that forks others, such as a fork server) sets only
    the kernel's parent-death signal: a thread there would be copied into no child and
    could hold a lock at the moment of a fork.
    """
    parent = os.getppid()
    kill_with_parent()
    if main_pid is not None and not pid_alive(main_pid):
        os._exit(1)
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    if watch_thread and main_pid is not None:
        exit_when_gone(main_pid)


def main_pid_from_env() -> int | None:
    """The main process's pid that :func:`export_main_pid` put into the environment, if any."""
    text = os.environ.get(MAIN_PID_ENV, "")
    return int(text) if text.isdigit() else None


def export_main_pid() -> int:
    """Record this process as the main process for helpers started from now on; returns its pid."""
    pid = os.getpid()
    os.environ[MAIN_PID_ENV] = str(pid)
    return pid


def dataloader_worker_init(main_pid: int, _worker_id: int = 0) -> None:
    """Body of :func:`worker_guard`'s ``worker_init_fn`` (also silences library warnings there:
    errors come back to the main process, which reports them in one line)."""
    import warnings

    guard_helper(main_pid)
    warnings.simplefilter("ignore")


def worker_guard() -> Callable[[int], None]:
    """A ``worker_init_fn`` for torch DataLoaders: each worker dies with this (main) process."""
    return functools.partial(dataloader_worker_init, os.getpid())
