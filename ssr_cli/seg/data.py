"""The training sample stream: which image, with which augmentation, at every step.

Resume exactness comes from statelessness: the sample at global position ``p`` is
a pure function of ``(seed, p)``. Epoch ``e = p // N`` visits the images in the
order ``permutation_e`` (drawn from ``(seed, e)``), and the augmentation of
position ``p`` uses a generator seeded with ``(seed, p)``. Positions are laid out
as ``p = ((iteration * accum + micro) * world + rank) * batch + slot``, so each
rank of a DistributedDataParallel run sees different images (this replaces a
``DistributedSampler``) and a resumed run at iteration ``i`` simply continues at
the positions of ``i``: no sampler or RNG state needs restoring, and the number
of data-loader workers changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssr_cli.data.images import read_image, read_mask
from ssr_cli.errors import DataError
from ssr_cli.seg.transforms import IGNORE, normalize, random_scale_crop_flip


@dataclass(frozen=True)
class Sample:
    """One training pair: an image file and its label PNG (pseudo-label or ground truth)."""

    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class StreamLayout:
    """Where a (iteration, micro-batch, rank, slot) lands in the global sample stream."""

    batch_size: int
    accum: int = 1
    world: int = 1

    def position(self, iteration: int, micro: int, rank: int, slot: int) -> int:
        return ((iteration * self.accum + micro) * self.world + rank) * self.batch_size + slot

    def batches(self, start: int, stop: int, rank: int) -> Iterator[list[int]]:
        """Position lists of this rank's micro-batches for iterations ``start..stop-1``, in order."""
        for iteration in range(start, stop):
            for micro in range(self.accum):
                yield [self.position(iteration, micro, rank, s) for s in range(self.batch_size)]


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """Read a label PNG (HxW uint8) and refuse values that are neither 0..K-1 nor 255."""
    label = read_mask(path)
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        value = int(label[bad].flat[0])
        raise DataError(
            f"label value {value} is not a class id 0..{num_classes - 1} nor 255",
            path=path,
            hint="pseudo-labels must use the vocabulary of --vocab (0 background, 1..K, 255 ignore)",
        )
    return label


def read_pair(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, label HxW uint8) of ``sample``; sizes must agree."""
    image = read_image(sample.image)
    label = read_label(sample.label, num_classes)
    if image.shape[:2] != label.shape:
        raise DataError(
            f"label size {label.shape[1]}x{label.shape[0]} differs from its image's "
            f"{image.shape[1]}x{image.shape[0]} ({sample.image})",
            path=sample.label,
            hint="the label must be made for this image at its original size",
        )
    return image, label


class TrainStream(Dataset):
    """Map-style dataset indexed by global stream position (see the module docstring).

    ``stream[p]`` -> (image 3xCxC float32 normalised, label CxC int64) with C = crop size.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        seed: int,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: tuple[float, float] = (0.5, 1.5),
        flip: bool = True,
    ) -> None:
        if not samples:
            raise DataError("no training samples", hint="check --pseudo and --split")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.crop_size = int(crop_size)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.scale_range = scale_range
        self.flip = flip
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def __len__(self) -> int:  # positions are unbounded; this is the epoch length
        return len(self.samples)

    @lru_cache(maxsize=4)  # noqa: B019 - a few epochs' orders per process, freed with the dataset
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(len(self.samples))

    def index_at(self, position: int) -> int:
        """The sample index at stream ``position``."""
        epoch, offset = divmod(int(position), len(self.samples))
        return int(self._order(epoch)[offset])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[self.index_at(position)]
        image, label = read_pair(sample, self.num_classes)
        rng = np.random.default_rng([self.seed, 0xA06, int(position)])
        image, label = random_scale_crop_flip(
            image, label, rng, self.crop_size, self.scale_range, self.flip, self.fill
        )
        x = torch.from_numpy(normalize(image, self.mean, self.std))
        y = torch.from_numpy(label.astype(np.int64))
        return x, y


def clean_worker_error(exc: BaseException) -> BaseException:
    """Turn an error re-raised by a DataLoader worker back into a one-line ``SSRError``.

    PyTorch re-creates the worker's exception type with the whole worker traceback as
    its message; the last line holds our one-line text.
    """
    from ssr_cli.errors import SSRError

    if isinstance(exc, SSRError) and "Traceback" in exc.what:
        lines = [line for line in exc.what.splitlines() if line.strip()]
        last = lines[-1] if lines else exc.what
        marker = f"{type(exc).__name__}: "
        if marker in last:
            last = last.split(marker, 1)[1]
        return type(exc)(last)
    return exc
