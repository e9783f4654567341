"""What the training loops (``train-cmpa``, ``fit-seg``, ``train``) share around their steps: the run
folder (``log.jsonl``, ``checkpoints/``), the progress bar and its log lines, DistributedDataParallel
wrapping, step timing by part, and :class:`TrainLoop`: the loop over iterations with the periodic
work after a step (log window, rank check, validation with ``best.pt``, ``last.pt``).

Nothing here draws random numbers: a loop's RNG use and op order are its own ``step``'s.

Imports torch: import lazily.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssr_cli.console import ProgressBar, info, progress_enabled
from ssr_cli.train import distributed as D
from ssr_cli.train.log import LOG_FILE, log_writer, truncate_log
from ssr_cli.train.state import save_checkpoint

CHECKPOINT_DIR = "checkpoints"


def percent(value: float | None) -> str:
    """A score (a fraction in JSON and logs) as a percentage for people: ``45.00 %``."""
    return "-" if value is None else f"{100 * value:.2f} %"


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (so a step's parts are timed right); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wrap_ddp(module: torch.nn.Module, env: D.DistEnv) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when several processes train; else ``module``."""
    if not env.enabled:
        return module
    device = env.device
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def due(done: int, every: int, last: int) -> bool:
    """Whether periodic work (every ``every`` iterations and after the ``last``) falls after ``done``."""
    return done % every == 0 or done == last


def progress_bar(name: str, total: int, start: int, env: D.DistEnv) -> Any:
    """The run's progress bar (rank 0), or a context that yields None (other ranks)."""
    return ProgressBar(name, total=total, completed=start) if env.is_main else contextlib.nullcontext()


@dataclass
class RunFiles:
    """A training run's log writer and checkpoint folder."""

    log_path: Path
    ckpt_dir: Path
    write_log: Callable[[dict[str, Any]], None]
    board: Any  # the TensorBoard writer, or None

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def open_run_files(
    out: Path,
    env: D.DistEnv,
    start: int,
    tensorboard: bool,
    redone_at_last: Callable[[dict[str, Any]], bool] | None = None,
) -> RunFiles:
    """Rank 0 creates ``out/checkpoints`` and cuts ``log.jsonl`` back to iteration ``start`` (the
    checkpoint resumed from; ``redone_at_last``: records at ``start`` the run writes again)."""
    log_path, ckpt_dir = out / LOG_FILE, out / CHECKPOINT_DIR
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, start, redone_at_last)
    write_log, board = log_writer(out, log_path, env.is_main, tensorboard)
    return RunFiles(log_path, ckpt_dir, write_log, board)


class StepTimes:
    """Seconds by part of a step: over the run (``total``, which may also hold ``extra`` parts timed
    outside the steps) and over the current log window (``window``), with the window's step count
    and its clock, from which paused time (validation, checkpoints) is left out."""

    def __init__(self, parts: Sequence[str], extra: Sequence[str] = ()) -> None:
        self.parts = tuple(parts)
        self.total = dict.fromkeys((*self.parts, *extra), 0.0)
        self.window = dict.fromkeys(self.parts, 0.0)
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.total[part] += seconds
        self.window[part] += seconds

    def add_step(self, seconds: Iterable[float]) -> None:
        """One step done, ``seconds`` per part (in ``parts`` order)."""
        for part, dt in zip(self.parts, seconds, strict=True):
            self.add(part, dt)
        self.steps += 1

    def pause(self, seconds: float, part: str | None = None) -> None:
        """``seconds`` of the window that were not step time (counted under ``part`` if given)."""
        self.start += seconds
        if part is not None:
            self.total[part] += seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def reset(self) -> None:
        """A new log window."""
        self.window.update(dict.fromkeys(self.parts, 0.0))
        self.steps = 0
        self.start = time.perf_counter()

    def shares(self) -> dict[str, float]:
        """Each part's share of the run's step time (empty before any)."""
        busy = sum(self.total[p] for p in self.parts)
        return {p: round(self.total[p] / busy, 4) for p in self.parts} if busy > 0 else {}


class TrainLoop:
    """The loop over iterations ``start .. cfg.iters`` of a training run. A subclass sets it up and
    defines ``step(it)`` (one iteration; returns its loss for the rank check), ``log_window(done)``
    (a ``train`` record through :meth:`report`), ``checkpoint_state(done)`` (``last.pt``; built on
    every rank, since it may sum over ranks) and, with validation images, ``validate(done)``.

    ``cfg`` needs ``iters``, ``log_every``, ``save_every``, ``check_sync_every`` and, with
    validation images, ``val_every``."""

    name = "train"  # the progress bar's and log lines' label
    sync_what = "the weights"  # what a failed rank check names

    def __init__(
        self,
        env: D.DistEnv,
        cfg: Any,
        files: RunFiles,
        start: int,
        sync_module: torch.nn.Module,
        val_samples: Sequence[Any] = (),
    ) -> None:
        self.env, self.cfg, self.files, self.start = env, cfg, files, start
        self.write_log = files.write_log
        self.sync_module = sync_module
        self.val_samples = val_samples
        self.best: dict[str, Any] = {"miou": None, "iteration": None}
        self.bar: Any = None
        self.started = time.perf_counter()

    def step(self, it: int) -> Any:
        raise NotImplementedError

    def log_window(self, done: int) -> None:
        raise NotImplementedError

    def checkpoint_state(self, done: int) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, done: int) -> None:
        raise NotImplementedError

    def paused(self, seconds: float) -> None:
        """The seconds the periodic work after a step took (default: not accounted)."""

    def run(self) -> None:
        """Every iteration from ``start`` on, each followed by its periodic work."""
        cfg = self.cfg
        with progress_bar(self.name, cfg.iters, self.start, self.env) as bar:
            self.bar = bar
            for it in range(self.start, cfg.iters):
                loss = self.step(it)
                self.after_step(it + 1, loss)

    def after_step(self, done: int, loss: Any) -> None:
        cfg, env = self.cfg, self.env
        if due(done, cfg.log_every, cfg.iters):
            self.log_window(done)
        paused = time.perf_counter()
        if cfg.check_sync_every and done % cfg.check_sync_every == 0:
            D.check_ranks_agree(env, self.sync_module, float(loss), done, self.write_log, self.sync_what)
        if self.val_samples and (done == cfg.iters or (cfg.val_every and done % cfg.val_every == 0)):
            self.validate(done)
        if due(done, cfg.save_every, cfg.iters):
            state = self.checkpoint_state(done)
            if env.is_main:
                save_checkpoint(self.files.ckpt_dir / "last.pt", state)
            D.barrier(env)
        self.paused(time.perf_counter() - paused)

    def report(self, done: int, record: dict[str, Any], status: str, steps: int) -> None:
        """Log a window's ``train`` record; show ``status`` on the bar (or a line without one)."""
        self.write_log(record)
        if self.bar is not None:
            self.bar.update(advance=int(steps), status=status)
        if self.env.is_main and not progress_enabled():
            info(f"{self.name}: iteration {done}/{self.cfg.iters}  {status}")

    def validated(
        self, done: int, miou: float | None, best_state: Callable[[], dict[str, Any]], bar_status: bool
    ) -> None:
        """Log a validation score; a new best is remembered and saved (``best_state()`` to
        ``best.pt``). ``bar_status``: also show the score on the bar."""
        improved = miou is not None and (self.best["miou"] is None or miou > self.best["miou"])
        if improved:
            self.best = {"miou": miou, "iteration": done}
        self.write_log({"type": "val", "iter": done, "val_miou": miou, "best_miou": self.best["miou"]})
        if bar_status and self.bar is not None:
            self.bar.update(advance=0, status=f"validation mIoU {percent(miou)}")
        if self.env.is_main:
            info(f"{self.name}: iteration {done}: validation mIoU {percent(miou)}")
            if improved:
                save_checkpoint(self.files.ckpt_dir / "best.pt", best_state())
