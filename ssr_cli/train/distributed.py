"""torchrun / DistributedDataParallel set-up for ``ssr fit-seg``.

``torchrun --nproc-per-node N -m ssr_cli fit-seg ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_distributed`
then joins the process group (nccl on GPUs, gloo on the CPU). Without those
variables everything runs in one process and the helpers here are no-ops.
Rank 0 alone writes files (checkpoints, logs, manifest); the other ranks compute.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ssr_cli.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_ENV_HINT = "launch with torchrun, or unset RANK/WORLD_SIZE/LOCAL_RANK for a single process"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer", hint=_ENV_HINT) from None


def init_distributed(device: torch.device) -> DistEnv:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; returns this process's :class:`DistEnv`.

    ``device`` is the resolved ``--device`` (``runtime.resolve_device`` already maps
    ``auto``/``cuda`` to ``cuda:LOCAL_RANK`` under torchrun).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} is not a process count", hint=_ENV_HINT)
    if world == 1:
        return DistEnv(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world or local_rank < 0:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})", hint=_ENV_HINT)
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but MASTER_ADDR is not",
            hint="launch with torchrun, or unset WORLD_SIZE for a single process",
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index or 0])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` for one process)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_main(env: DistEnv, decide: Callable[[], Any]) -> Any:
    """Run ``decide()`` on rank 0 only and return its result on every rank; a user error
    (``SSRError``) raised there is raised on every rank, so all ranks stop with it."""
    from ssr_cli.errors import SSRError

    result: Any = None
    if env.is_main:
        try:
            result = decide()
        except SSRError as exc:
            result = exc
    result = broadcast_object(env, result)
    if isinstance(result, SSRError):
        raise result
    return result


def broadcast_buffers(env: DistEnv, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if env.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex) of every parameter's bytes in order: equal digests = equal weights."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_ranks_agree(
    env: DistEnv,
    module: torch.nn.Module,
    loss: float,
    iteration: int,
    write_log: Any,
    what: str = "the weights",
) -> None:
    """``--check-sync-every``: gather every rank's parameter digest and loss, log them (a ``sync``
    record) and stop when the ranks' weights differ (DistributedDataParallel broke)."""
    gathered = all_gather_object(env, (parameter_digest(module), float(loss)))
    sync = {"weights": [g[0] for g in gathered], "rank_losses": [g[1] for g in gathered]}
    write_log({"type": "sync", "iter": iteration, "sync": sync})
    if len({g[0] for g in gathered}) != 1:
        raise RuntimeError(f"ranks disagree on {what} after iteration {iteration}")
