"""Training images for CMPA: which image, with which augmentation, at every step.

Statelessness gives exact resume: the batch of (iteration, rank) is a pure function
of ``(seed, iteration, rank)``. Global positions ``p = (iteration * world + rank) *
batch + slot`` run through epochs; epoch ``e = p // N`` visits the images in a
permutation drawn from ``(seed, e)``, so every rank of a DistributedDataParallel run
sees different images and a resumed run continues at the positions of its iteration.

Augmentations keep image-level labels valid: no crop (a crop can cut a class out).
The whole image is resized (bicubic) to a square side ``s``, one per step, drawn from
``size * U(scale_range)`` and rounded to the patch size; then horizontal flips and a
colour jitter (brightness, contrast, saturation, each a factor in [1 - j, 1 + j]).
Prototype collection and the initial projection use the plain image at ``size``.

Tensors are NCHW float32, CLIP-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.data import read_image
from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD

_PERM_TAG, _AUG_TAG = 0xC3A1, 0xA06E


@dataclass(frozen=True)
class TrainItem:
    """An image and its 0-based foreground class indices (class id - 1)."""

    id: str
    image: Path
    classes: tuple[int, ...]


@dataclass(frozen=True)
class Augment:
    """One image's augmentation: flip and colour factors (1.0 = unchanged)."""

    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


class SampleStream:
    """Indices into the item list for every (iteration, rank): see the module docstring."""

    def __init__(self, count: int, seed: int, batch_size: int, world: int = 1) -> None:
        self.count, self.seed, self.batch_size, self.world = count, seed, batch_size, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, _PERM_TAG, epoch]).permutation(self.count)
        return self._perms[epoch]

    def indices(self, iteration: int, rank: int) -> list[int]:
        first = (iteration * self.world + rank) * self.batch_size
        return [
            int(self._perm(p // self.count)[p % self.count]) for p in range(first, first + self.batch_size)
        ]


def step_augment(
    seed: int,
    iteration: int,
    rank: int,
    count: int,
    size: int,
    scale_range: tuple[float, float],
    flip: bool,
    jitter: float,
    patch: int,
) -> tuple[int, list[Augment]]:
    """(square side, per-image augmentations) of one step, from (seed, iteration, rank)."""
    rng = np.random.default_rng([seed, _AUG_TAG, iteration, rank])
    scale = float(rng.uniform(*scale_range)) if scale_range[0] != scale_range[1] else scale_range[0]
    side = max(patch, int(round(size * scale / patch)) * patch)
    augs = []
    for _ in range(count):
        f = bool(rng.random() < 0.5) if flip else False
        b, c, s = (float(v) for v in rng.uniform(1 - jitter, 1 + jitter, size=3)) if jitter > 0 else (1, 1, 1)
        augs.append(Augment(f, b, c, s))
    return side, augs


def prepare_image(path: Path, side: int, aug: Augment | None = None) -> torch.Tensor:
    """Read, resize to ``side`` x ``side`` (bicubic), augment, normalise: [3, side, side]."""
    from PIL import Image

    image = read_image(path)
    pil = Image.fromarray(image)
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.Resampling.BICUBIC)
    x = np.asarray(pil, dtype=np.float32) / 255.0  # HxWx3
    if aug is not None:
        if aug.flip:
            x = x[:, ::-1]
        if aug.brightness != 1.0:
            x = x * aug.brightness
        gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if aug.contrast != 1.0:
            x = (x - gray.mean()) * aug.contrast + gray.mean()
            gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if aug.saturation != 1.0:
            x = gray[..., None] + (x - gray[..., None]) * aug.saturation
        x = np.clip(x, 0.0, 1.0)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class Loader:
    """Decodes batches in a thread pool, a few steps ahead of the training loop.

    ``make(key)`` must return the list of (path, side, augment) of a batch; the
    batch of ``key`` is the same whenever it is computed, so look-ahead changes nothing.
    """

    def __init__(self, workers: int, ahead: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.ahead = ahead
        self.pending: dict[object, list[Future]] = {}

    def submit(self, key: object, jobs: Sequence[tuple[Path, int, Augment | None]]) -> None:
        if key not in self.pending:
            self.pending[key] = [self.pool.submit(prepare_image, *job) for job in jobs]

    def get(self, key: object, jobs: Sequence[tuple[Path, int, Augment | None]]) -> torch.Tensor:
        """[N, 3, side, side] of ``key`` (computed now if it was not submitted)."""
        self.submit(key, jobs)
        futures = self.pending.pop(key)
        return torch.stack([f.result() for f in futures])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def iter_plain_batches(
    items: Sequence[TrainItem],
    order: Sequence[int],
    side: int,
    batch_size: int,
    loader: Loader,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(item indices, [n, 3, side, side]) for ``order`` in batches, decoded ahead in ``loader``."""
    chunks = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]

    def jobs(chunk: list[int]) -> list[tuple[Path, int, Augment | None]]:
        return [(items[i].image, side, None) for i in chunk]

    for k, chunk in enumerate(chunks):
        for ahead in chunks[k + 1 : k + 1 + loader.ahead]:
            loader.submit(("plain", side, tuple(ahead)), jobs(ahead))
        yield chunk, loader.get(("plain", side, tuple(chunk)), jobs(chunk))
        if on_batch is not None:
            on_batch(len(chunk))


def step_batch(
    stream: SampleStream, cfg: Any, iteration: int, rank: int, patch_size: int
) -> tuple[list[int], int, list[Any]]:
    """One step's batch on ``rank``: (item indices, training side, per-image augmentations), a
    pure function of (``cfg.seed``, iteration, rank) for train-cmpa and ``ssr train`` alike."""
    idx = stream.indices(iteration, rank)
    side, augs = step_augment(
        cfg.seed, iteration, rank, len(idx), cfg.size, cfg.scale_range, cfg.flip, cfg.jitter, patch_size
    )
    return idx, side, augs
