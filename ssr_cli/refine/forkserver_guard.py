"""Imported first by refine's fork server (``WORKER_PRELOAD``): the fork server dies with the
main process (``ssr_cli.procs``), and the pool workers forked from it die with it in turn.

Acts only in a process other than the main one named by ``$SSR_MAIN_PID``.
"""

from __future__ import annotations

import os

from ssr_cli.procs import guard_helper, main_pid_from_env

_MAIN = main_pid_from_env()
if _MAIN is not None and _MAIN != os.getpid():
    guard_helper(_MAIN, watch_thread=False)
