"""Shared test setup: offline hub, paths to the real example data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail at once instead of after ~45 s
os.environ.setdefault("SSR_CACHE", str(Path(__file__).resolve().parent / ".cache-never-used"))

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_VOC = REPO / "examples" / "voc"
SHARED_MASKS = REPO / "tests" / "data" / "voc2012_val_masks"  # copied from shared/ (PROVENANCE.md)


@pytest.fixture
def examples_voc() -> Path:
    return EXAMPLES_VOC


@pytest.fixture
def shared_masks() -> Path:
    if not SHARED_MASKS.is_dir():
        pytest.fail(f"the real VOC masks are expected at {SHARED_MASKS}")
    return SHARED_MASKS


#: the test files that take longest (pytest --durations), run first: with `make test`'s two
#: workers (pytest-xdist, one file per worker at a time) the short files then fill the gaps
#: instead of one long file starting last
SLOW_FIRST = (
    "test_gpu_check.py",
    "test_reproduce.py",
    "test_make_seeds.py",
    "test_startup.py",
    "test_quality.py",
    "test_fit_seg.py",
    "test_oversize.py",
)


@pytest.fixture
def one_thread():
    """One torch compute thread for in-process runs: steady speed on a shared, busy CPU (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    from ssr_cli.runtime import torch_threads

    with torch_threads(1):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept
