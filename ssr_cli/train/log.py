"""The log of a training run: ``log.jsonl`` (one JSON record per line, with a ``type``: train,
val, prototypes, sync), optionally mirrored to TensorBoard, cut back to a checkpoint on resume;
and peak memory figures for its records.

Imports torch: import lazily.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssr_cli.errors import ConfigError

LOG_FILE = "log.jsonl"


def truncate_log(
    path: Path, last_iteration: int, redone_at_last: Callable[[dict[str, Any]], bool] | None = None
) -> None:
    """Keep the records of ``path`` up to ``last_iteration`` (the checkpoint a run resumes from),
    except those at ``last_iteration`` that the resumed run writes again (``redone_at_last``)."""
    from ssr_cli.artefacts import atomic_write_text

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            continue
        it = record.get("iter", 0)
        if it < last_iteration or (it == last_iteration and not (redone_at_last and redone_at_last(record))):
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on a GPU, peak allocated GPU memory."""
    out = {"max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if device.type == "cuda":
        out["max_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


TENSORBOARD_DIR = "tensorboard"


def log_writer(out: Path, log_path: Path, is_main: bool, tensorboard: bool) -> tuple[Any, Any]:
    """(write_log(record), the TensorBoard writer or None) for a training run: each record is a
    line of ``log_path`` (main process only) and, with ``tensorboard``, the same numbers as
    scalars ``<type>/<name>`` at step ``iter`` (scores stay fractions, as in the JSON)."""
    board = tensorboard_writer(out) if tensorboard and is_main else None

    def write_log(record: dict[str, Any]) -> None:
        if not is_main:
            return
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if board is not None:
            for name, value in record.items():
                if name not in ("type", "iter") and isinstance(value, (int, float)):
                    board.add_scalar(f"{record.get('type', 'train')}/{name}", value, record["iter"])
            board.flush()

    return write_log, board


def tensorboard_writer(out: Path) -> Any:
    """torch's TensorBoard ``SummaryWriter`` on ``out/tensorboard``; a one-line error without the
    tensorboard package (an optional extra: ``pip install tensorboard``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed",
            hint="pip install tensorboard (or pip install 'ssr-cli[tensorboard]'), or drop --tensorboard",
        ) from None
    return SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
