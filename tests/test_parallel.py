"""ssr_cli.parallel.bounded_map: the one bounded parallel map (order, look-ahead, errors, prefetch)."""

from __future__ import annotations

import threading
import time

import pytest

from ssr_cli.parallel import bounded_map

pytestmark = pytest.mark.timeout(60)


def test_results_keep_the_input_order_and_the_look_ahead_is_bounded() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (i % 3))
        return i * i

    out = []
    for k, value in enumerate(bounded_map(slow, range(20), 3, ahead=4)):
        out.append(value)
        assert len(started) <= k + 1 + 4  # never more than `ahead` items beyond what was taken
    assert out == [i * i for i in range(20)]
    assert sorted(bounded_map(slow, range(20), 3, ordered=False)) == out


def test_an_error_reaches_the_caller_and_stops_the_queue() -> None:
    def fail_at_5(i: int) -> int:
        if i == 5:
            raise ValueError("item 5")
        return i

    taken = []
    with pytest.raises(ValueError, match="item 5"):
        for value in bounded_map(fail_at_5, range(100), 2, ahead=3):
            taken.append(value)
    assert taken == [0, 1, 2, 3, 4]


def test_one_worker_runs_inline_unless_asked_to_prefetch() -> None:
    def thread_name(_: int) -> str:
        return threading.current_thread().name

    main = threading.current_thread().name
    assert set(bounded_map(thread_name, range(3), 1)) == {main}
    assert set(bounded_map(thread_name, range(3), 0)) == {main}
    background = set(bounded_map(thread_name, range(3), 0, inline=False, name="ssr-prefetch"))
    assert len(background) == 1 and main not in background and background.pop().startswith("ssr-prefetch")
