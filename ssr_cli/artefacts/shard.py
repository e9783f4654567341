"""Splitting the items of a stage across processes: ``--shard i/n`` or torchrun.

Shards are 0-based: ``--shard 0/2`` and ``--shard 1/2`` together cover a split.
Without ``--shard``, torchrun's ``RANK`` and ``WORLD_SIZE`` are used, so
``torchrun --nproc-per-node 4 -m ssr_cli make-seeds ...`` splits the work 4 ways.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from ssr_cli.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def select(self, items: Sequence[T]) -> list[T]:
        """Round-robin selection (items must already be in a fixed order)."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard:
    """Parse ``"i/n"``; ``None`` or ``""`` means: from torchrun's env, else the whole split."""
    if text:
        try:
            i_text, n_text = text.split("/")
            index, count = int(i_text), int(n_text)
        except ValueError:
            raise ConfigError(
                f"--shard {text!r} is not of the form i/n", hint="e.g. --shard 0/4 ... 3/4"
            ) from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(
                f"--shard {text!r} is out of range",
                hint="shards are 0-based: i must be in 0..n-1",
            )
        return Shard(index, count)
    return shard_from_env()


def shard_from_env() -> Shard:
    """torchrun's ``RANK``/``WORLD_SIZE``, checked like ``--shard`` (ConfigError when unusable)."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return Shard()
    hint = "unset RANK and WORLD_SIZE, launch with torchrun, or pass --shard i/n"
    if rank is None or world is None:
        raise ConfigError(f"only one of RANK={rank!r} and WORLD_SIZE={world!r} is set", hint=hint)
    try:
        index, count = int(rank), int(world)
    except ValueError:
        raise ConfigError(f"RANK={rank!r} / WORLD_SIZE={world!r} are not integers", hint=hint) from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"RANK={rank} / WORLD_SIZE={world} is out of range (RANK must be in 0..WORLD_SIZE-1)", hint=hint
        )
    return Shard(index, count)
