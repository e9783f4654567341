"""The images and seeds ``ssr refine`` reads: batches of one working size, read a few batches ahead.

Images come at their working size (``--max-side`` / ``--oversize``: ``stages/working_size.py``),
and so does a seed's ``image_hw``; a seed that does not fit its image is a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ssr_cli.artefacts.seeds import load_seed
from ssr_cli.data import Dataset
from ssr_cli.data.size_limit import SizePlan
from ssr_cli.errors import ArtefactError
from ssr_cli.parallel import bounded_map
from ssr_cli.stages.working_size import read_working, working_hw

if TYPE_CHECKING:  # (sources imports torch)
    from ssr_cli.refine.sources import SeedsRun


def one_size_batches(
    dataset: Dataset, ids: Sequence[str], batch_size: int, plan: SizePlan | None = None
) -> list[list[str]]:
    """Consecutive ids of one (working) image size, at most ``batch_size`` each (fixed by the id
    order, so a resumed run forms the same batches and computes the same numbers)."""
    if batch_size == 1:
        return [[i] for i in ids]
    batches: list[list[str]] = []
    last: tuple[int, int] | None = None
    for item_id in ids:
        size = working_hw(dataset, item_id, plan)
        if batches and len(batches[-1]) < batch_size and size == last:
            batches[-1].append(item_id)
        else:
            batches.append([item_id])
        last = size
    return batches


def read_item(
    dataset: Dataset, seeds: SeedsRun, item_id: str, attn: bool = False, plan: SizePlan | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The image and its seed; with ``attn`` the seed must hold the stored CLIP attention ``[hw, hw]``.

    An image that ``plan`` downscales comes at its working size, and so does the seed's ``image_hw``."""
    target = None if plan is None else plan.target_hw(item_id)
    path = seeds.item_path(item_id)
    image = read_working(dataset, item_id, plan)
    original = image.shape[:2] if plan is None or target is None else plan.downscaled[item_id]
    seed = load_seed(path, with_attn=attn)
    if tuple(int(v) for v in seed["image_hw"]) != tuple(original) or seed["cams"].ndim != 3:
        raise ArtefactError(
            f"this seed was made from an image of size {tuple(seed['image_hw'])}, "
            f"the image now has {image.shape[:2]}",
            path=path,
            hint="the dataset changed since make-seeds: rerun make-seeds",
        )
    hw = int(seed["cams"].shape[1] * seed["cams"].shape[2])
    if attn and ("attn" not in seed or seed["attn"].shape != (hw, hw)):
        raise ArtefactError(
            "this seed lacks the CLIP attention its run's manifest promises (or it has another grid)",
            path=path,
            hint="rerun make-seeds into that folder with --overwrite, or pass --clip-attention recompute",
        )
    if target is not None:
        seed["image_hw"] = np.asarray(target, dtype=np.int32)
    return image, seed


def prefetch(
    dataset: Dataset,
    seeds: SeedsRun,
    batches: list[list[str]],
    attn: bool = False,
    plan: SizePlan | None = None,
) -> Iterator[tuple[list[str], list]]:
    """Read the images and seeds of upcoming batches on two threads (a few batches ahead)."""

    def read(batch: list[str]) -> tuple[list[str], list]:
        return batch, [read_item(dataset, seeds, i, attn, plan) for i in batch]

    yield from bounded_map(read, batches, 2, ahead=3, name="ssr-refine-read")
