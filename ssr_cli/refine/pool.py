"""The worker pool of ``ssr refine``: the per-image CPU work (``pipeline.process_item``) in processes.

:class:`WorkerPool` runs jobs in ``workers`` processes (0 = inline) with at most
``2 * workers`` in flight, so memory does not grow with the number of images. The
workers are forked from a fork server that has imported torch, OpenCV, scikit-learn
and pydensecrf once (:data:`WORKER_PRELOAD`; spawn where there is no fork server);
each runs torch, OpenCV and every OpenMP/BLAS pool on one thread (threadpoolctl), and
inline work does the same, so the results do not depend on the number of workers. A
job's exception comes back as :class:`ItemFailure` naming the image id. This module
imports only numpy at the top (import it anywhere).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ssr_cli.errors import SSRError
from ssr_cli.refine.pipeline import (
    ItemFailure,
    ItemFn,
    ItemJob,
    ItemResult,
    RefineParams,
    one_torch_thread,
    process_item,
)

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch, OpenCV and OpenMP/BLAS on one thread for a while, as in the workers (so that
    ``--workers 0`` computes the same numbers as worker processes)."""
    import cv2
    import sklearn.cluster  # noqa: F401  (load its OpenMP runtime so that the limit covers it)
    from threadpoolctl import threadpool_limits

    old_cv = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with one_torch_thread(), threadpool_limits(1):
            yield
    finally:
        cv2.setNumThreads(old_cv)


#: Imported once by the fork server, so each worker starts without importing them again.
WORKER_PRELOAD = [
    "ssr_cli.refine.forkserver_guard",  # first: the fork server dies with the main process
    "ssr_cli.refine.pipeline",
    "ssr_cli.refine.pool",
    "numpy",
    "torch",
    "cv2",
    "sklearn.cluster",
    "pydensecrf.densecrf",
]


def worker_init(main_pid: int | None = None) -> None:
    """Process-pool initializer: the worker dies with the main process ``main_pid``
    (``ssr_cli.procs``); one thread for torch, OpenCV and every OpenMP/BLAS library here."""
    import warnings

    from ssr_cli.procs import guard_helper

    guard_helper(main_pid)
    warnings.simplefilter("ignore")  # library noise; a failing image comes back as ItemFailure
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import cv2
    import sklearn.cluster  # noqa: F401  (load its OpenMP runtime so that the limit below covers it)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    threadpool_limits(1)


def worker_context() -> Any:
    """The multiprocessing context of the workers: a fork server with :data:`WORKER_PRELOAD`
    where there is one (a clean single-threaded process to fork from: the main process has
    torch/OpenMP thread pools and maybe CUDA, which forking breaks), else spawn."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def run_job(fn: ItemFn, job: ItemJob, params: RefineParams) -> ItemResult:
    """``fn(job, params)`` with any exception turned into :class:`ItemFailure` (picklable, names the id)."""
    try:
        return fn(job, params)
    except ItemFailure:
        raise
    except SSRError as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise ItemFailure(job.item_id, where + exc.what, exc.hint, traceback.format_exc()) from None
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ItemFailure(job.item_id, cause, None, traceback.format_exc()) from None


class WorkerPool:
    """Jobs on ``workers`` processes (0 = inline), at most ``2 * workers`` in flight.

    :meth:`submit` returns the results that finished meanwhile; :meth:`drain` the rest.
    Failures (:class:`ItemFailure`, or a worker that died) are collected in
    ``failures``; after the first one, :meth:`submit` accepts no more work, and the
    jobs already in flight still finish (their results are returned).
    """

    def __init__(self, workers: int, params: RefineParams, fn: ItemFn = process_item) -> None:
        self.workers = max(0, int(workers))
        self.params = params
        self.fn = fn
        self.failures: list[ItemFailure] = []
        self._inflight: dict[Future[ItemResult], str] = {}
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 0:
            from ssr_cli.procs import export_main_pid

            main_pid = export_main_pid()  # before the fork server starts: it reads it
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=worker_context(),
                initializer=worker_init,
                initargs=(main_pid,),
            )

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def submit(self, job: ItemJob) -> list[ItemResult]:
        if self.failed:
            return []
        if self._pool is None:
            try:
                with single_threaded():
                    return [run_job(self.fn, job, self.params)]
            except ItemFailure as exc:
                self.failures.append(exc)
                return []
        done: list[ItemResult] = []
        while len(self._inflight) >= 2 * self.workers:
            done += self._collect(wait(list(self._inflight), return_when=FIRST_COMPLETED).done)
        if not self.failed:
            try:
                future = self._pool.submit(run_job, self.fn, job, self.params)
            except BrokenProcessPool:
                self._broken([job.item_id])
            else:
                self._inflight[future] = job.item_id
        return done

    def drain(self) -> Iterator[ItemResult]:
        """Wait for the jobs in flight; yields their results as they finish."""
        while self._inflight:
            yield from self._collect(wait(list(self._inflight), return_when=FIRST_COMPLETED).done)

    def _collect(self, futures: Any) -> list[ItemResult]:
        out: list[ItemResult] = []
        broken: list[str] = []
        for future in futures:
            item_id = self._inflight.pop(future)
            try:
                out.append(future.result())
            except ItemFailure as exc:
                self.failures.append(exc)
            except BrokenProcessPool:
                broken.append(item_id)
        if broken:
            self._broken(broken)
        return out

    def _broken(self, ids: list[str]) -> None:
        shown = ", ".join(repr(i) for i in sorted(ids)[:4])
        self.failures.append(
            ItemFailure(
                sorted(ids)[0],
                f"a worker process died (killed, e.g. out of memory, or crashed) while working on {shown}",
                "finished items are kept: rerun the same command to resume, with fewer --workers "
                "if memory is short",
            )
        )

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(cancel=exc_type is not None)
