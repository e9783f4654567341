"""Start-up times of the commands that should answer at once (issue 15 item 3).

Measures, each as the median wall time of ``--repeat`` fresh ``ssr`` processes:

- ``ssr --help``;
- ``ssr weights`` (lists files; goal < 1 s);
- a missing-weights error of ``ssr make-seeds`` (goal < 2 s);
- the rerun of a complete ``ssr make-seeds`` run, nothing to do (goal < 2 s);
- the rerun of a complete ``ssr train-cmpa`` run (goal < 2 s; fit-seg and ``predict --images``
  take the same path, tested in ``tests/test_startup.py``);
- for comparison, the same make-seeds rerun through the full path (the quick key removed from the
  manifest first: torch and CLIP load, then every item is found done).

The project is made in a temporary folder: a tiny random CLIP (``tests/tinymodels.py``) and a
custom-layout dataset of ``--images`` images. Offline (``HF_HUB_OFFLINE=1``), one thread.

    python benchmarks/bench_startup.py [--repeat 5] [--images 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {
    "ssr weights": 1.0,
    "missing-weights error": 2.0,
    "no-op rerun of a complete run": 2.0,
    "no-op rerun of a complete train-cmpa run": 2.0,
}


def forget_quick_key(manifest: Path) -> None:
    """Drop the run's quick rerun key, so that the next rerun takes the full path."""
    data = json.loads(manifest.read_text())
    data.pop("quick_rerun", None)
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def timed(args: list[str], cwd: Path, env: dict[str, str], expect: int = 0, full_path: bool = False) -> float:
    if full_path:
        forget_quick_key(cwd / "runs" / "seeds" / "manifest.json")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ssr_cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != expect:
        raise SystemExit(f"ssr {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds


def make_project(root: Path, images: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tinymodels import make_pets_project

    make_pets_project(root, images, size=(96, 128))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="ssr-bench-startup-") as tmp:
        root = Path(tmp)
        make_project(root, args.images)
        env["SSR_CACHE"] = str(root / "cache")  # an empty weights cache
        seeds = ["make-seeds", "--data", "data", "--out", "runs/seeds", "--clip-arch", "tiny.json",
                 "--clip-weights", "tiny.safetensors", "--device", "cpu", "-q"]  # fmt: skip
        first = timed(seeds, root, env)
        cmpa = ["train-cmpa", "--data", "data", "--out", "runs/cmpa", "--clip-arch", "tiny.json",
                "--clip-weights", "tiny.safetensors", "--iters", "2", "--batch-size", "2", "--dim", "16",
                "--size", "32", "--init-images", "2", "--device", "cpu", "--workers", "0", "-q"]  # fmt: skip
        timed(cmpa, root, env)
        cases = {
            "ssr --help": (["--help"], 0),
            "ssr weights": (["weights"], 0),
            "missing-weights error": (
                ["make-seeds", "--data", "data", "--out", "runs/x", "--device", "cpu"],
                1,
            ),
            "no-op rerun of a complete run": (seeds, 0),
            "the same rerun through the full path": (seeds, 0),
            "no-op rerun of a complete train-cmpa run": (cmpa, 0),
        }
        rows = []
        for name, (argv, code) in cases.items():
            full = name.endswith("full path")  # without the quick key: torch, CLIP, then all done
            times = [timed(argv, root, env, code, full) for _ in range(args.repeat)]
            rows.append((name, statistics.median(times), min(times), max(times)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"start-up, median of {args.repeat} fresh processes ({os.cpu_count()} CPUs, load {load:.1f}):")
    print(f"{'command':<46} {'median s':>9} {'min s':>7} {'max s':>7}  goal")
    for name, median, low, high in rows:
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"< {goal:g} s: {'met' if median < goal else 'NOT met'}"
        print(f"{name:<46} {median:9.2f} {low:7.2f} {high:7.2f}  {verdict}")
    print(f"(first make-seeds run of {args.images} tiny images, for scale: {first:.2f} s)")


if __name__ == "__main__":
    main()
