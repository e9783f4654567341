"""The one bounded parallel map of the tool: threads for I/O and decoding (image reads, PNG
encoding, scoring), a bounded number of items in flight, so memory stays flat however long the
input. CPU-heavy per-image work that needs processes uses ``ssr_cli.refine.pool.WorkerPool``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    ordered: bool = True,
    ahead: int | None = None,
    name: str = "ssr",
    inline: bool = True,
) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, at most ``ahead`` (default 2 x workers) in
    flight; results in the order of ``items`` (``ordered``) or as they finish. With ``workers``
    <= 1 it runs in the caller's thread, or with ``inline=False`` on one background thread (a
    prefetch: reading overlaps the caller's compute). The first exception is raised as soon as its
    result is reached, and the queued work is cancelled."""
    if not inline:
        workers = max(1, workers)
    elif workers <= 1:
        for item in items:
            yield fn(item)
        return
    limit = max(1, ahead if ahead is not None else 2 * workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        queue: deque[Future[R]] = deque()
        pending: set[Future[R]] = set()
        try:
            for item in items:
                future = pool.submit(fn, item)
                if ordered:
                    queue.append(future)
                    if len(queue) >= limit:
                        yield queue.popleft().result()
                else:
                    pending.add(future)
                    if len(pending) >= limit:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for finished in done:
                            yield finished.result()
            while queue:
                yield queue.popleft().result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for finished in done:
                    yield finished.result()
        except BaseException:
            for future in (*queue, *pending):
                future.cancel()
            raise


def parallel_map(
    fn: Callable[[T], R], values: Sequence[T], description: str = "", workers: int = 0
) -> list[R]:
    """``[fn(v) for v in values]`` on threads (default: 2 per CPU, at most 8), in order. A
    progress bar shows on stderr when ``description`` is given and stderr is a terminal."""
    if not values:
        return []
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    if len(values) < 4:
        workers = 1
    results: Iterable[R] = bounded_map(fn, values, workers, ahead=4 * workers, name="ssr-map")
    if description:
        from ssr_cli.console import track

        results = track(results, total=len(values), description=description)
    return list(results)
