"""Device, precision, seeding and distributed-environment helpers shared by the stages.

Imports torch: only import this module inside command bodies.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from ssr_cli.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the local GPU (``LOCAL_RANK`` under torchrun) when there is one, else CPU."""
    text = device.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} was asked for but no CUDA GPU is visible",
                hint="use --device cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver",
            )
        index = int(text[5:]) if ":" in text else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible",
                hint="pick an index below that",
            )
        return torch.device("cuda", index)
    raise ConfigError(f"--device {device!r} is not understood", hint="use auto, cpu, cuda or cuda:N")


def resolve_precision(
    precision: str, device: torch.device, auto_cpu: str = "fp32", auto_gpu: str = "bf16"
) -> str:
    """Map ``auto`` to a concrete precision for the device; validate the others."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return auto_gpu if (auto_gpu != "bf16" or torch.cuda.is_bf16_supported()) else "fp16"
        return auto_cpu
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is not supported on the CPU", hint="use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """An autocast context for a resolved ``precision`` (fp32: none; bf16, fp16: torch's); the one
    autocast helper of the tool (CLIP, DINO, the training loops)."""
    if precision not in PRECISIONS[1:]:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS[1:])}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave as is)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
