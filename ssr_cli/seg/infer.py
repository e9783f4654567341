"""Inference with the segmenter: multi-scale + flip class probabilities, and validation mIoU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.runtime import autocast
from ssr_cli.seg.data import Sample, read_pair
from ssr_cli.seg.transforms import normalize
from ssr_cli.train.distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Class probabilities (K, H, W) float32 on the CPU for one HxWx3 uint8 RGB image.

    For each scale the image is resized (bilinear), normalised and run through the
    model (with its horizontal mirror in the same batch when ``flip``); the logits
    are resized back to H x W, turned into probabilities with a softmax, and the
    probabilities of all scales and flips are averaged. ``model`` must be in eval mode.
    """
    device = device or next(model.parameters()).device
    h, w = image.shape[:2]
    total: torch.Tensor | None = None
    count = 0
    for scale in scales:
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        scaled = image if (sh, sw) == (h, w) else cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(normalize(scaled, mean, std))[None].to(device)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1).sum(dim=0)
        total = probs if total is None else total + probs
        count += logits.shape[0]
    assert total is not None, "scales must not be empty"
    return (total / count).cpu()


def validation_miou(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    env: DistEnv,
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Single-scale mIoU of ``model`` on ``samples`` (their ``label`` is the ground truth).

    ``progress(done, total)`` is called after each sample of this rank (a status line).

    Under DistributedDataParallel each rank scores every ``world``-th sample and the
    confusion matrices are summed, so every rank returns the same scores. The model
    is left in the mode it had.
    """
    from ssr_cli.metrics import confusion_matrix, scores

    was_training = model.training
    model.eval()
    conf = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    try:
        mine = list(samples)[env.rank :: env.world]
        for done, sample in enumerate(mine, start=1):
            image, gt = read_pair(sample, num_classes)
            pred = predict_probs(model, image, mean, std, device=env.device, precision=precision).argmax(0)
            conf += torch.from_numpy(confusion_matrix(gt, pred.numpy(), num_classes))
            if progress is not None:
                progress(done, len(mine))
    finally:
        model.train(was_training)
    if env.enabled:
        conf = conf.to(env.device if env.backend == "nccl" else "cpu")
        all_reduce_sum(env, conf)
    return scores(conf.cpu().numpy(), list(class_names))
