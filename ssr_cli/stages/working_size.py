"""A dataset's images at the size a stage works on (``--max-side`` / ``--oversize``, ``data/size_limit.py``).

Shared by ``make-seeds`` and ``refine``: :func:`plan_dataset` reads every image's size from
its header and says which images are skipped or downscaled; :func:`working_hw` and
:func:`read_working` give an image's working size and pixels (downscaled where the plan says).
PIL + numpy only.
"""

from __future__ import annotations

import numpy as np

from ssr_cli.data import Dataset, read_image
from ssr_cli.data.size_limit import SizeLimit, SizePlan, image_size, plan_sizes, read_downscaled


def plan_dataset(dataset: Dataset, max_side: int, oversize: str, *, stage: str) -> tuple[SizePlan, list[str]]:
    """The size plan of every image of ``dataset`` and the ids the stage works on (not skipped)."""
    paths = [dataset.get(i).image for i in dataset.ids]
    plan = plan_sizes(dataset.ids, paths, SizeLimit(max_side, oversize), stage=stage)
    return plan, [i for i in dataset.ids if i not in plan.skipped]


def working_hw(dataset: Dataset, item_id: str, plan: SizePlan | None) -> tuple[int, int]:
    """(height, width) the stage works at: the downscaled size, else the image's (from its header)."""
    target = None if plan is None else plan.target_hw(item_id)
    return target or image_size(dataset.get(item_id).image)


def read_working(dataset: Dataset, item_id: str, plan: SizePlan | None) -> np.ndarray:
    """The image ``[H, W, 3]`` uint8 RGB, downscaled when ``plan`` says so."""
    target = None if plan is None else plan.target_hw(item_id)
    path = dataset.get(item_id).image
    return read_image(path) if target is None else read_downscaled(path, target)
