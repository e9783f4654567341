"""The per-image CPU part of ``ssr refine``: masks, affinity refinement, labels, CRF.

One :class:`ItemJob` per image carries what the main process prepared: the image
(``[H, W, 3]`` uint8 RGB), the seed (``load_seed``'s dict: ``cams`` float32
``[C, h, w]`` on the CLIP patch grid, ``class_ids``, ``image_hw``, ...) and the fused
affinity (``[h*w, h*w]`` float32, rows = query patches; None = the identity, i.e.
``--affinity none``). :func:`process_item` turns it into an :class:`ItemResult`:
the label PNG's bytes (VOC palette, 255 = uncertain) and, when asked, the refined
CAMs as a seed-format ``.npz`` (float32 ``[C, h, w]``).

Steps (METHOD.md sections 1, 3 and 4):

1. column masks ``[C, h, w]``: ``none``, ``box`` (CLIP-ES's boxes around the CAM
   thresholded at ``box_thresh`` x max, :func:`clip_es_box_mask`) or ``sgc``
   (superpixel regions);
2. ``refined = minmax(A_masked @ vec(CAM))`` per class (``refine_cams``);
3. CLIP-ES's upsampling to the image size (bilinear, half-pixel centres);
4. background ``(1 - max_c CAM_c) ** bg_alpha``; dense CRF (or not); argmax; pixels
   whose posterior max is below ``conf_thresh`` become 255.

:class:`WorkerPool` (``ssr_cli.refine.pool``, also importable from here) runs the jobs in
worker processes. This module imports only numpy at the top (import it anywhere).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ssr_cli.errors import SSRError
from ssr_cli.refine.config import BOX_THRESH_DEFAULT, MASKS


@dataclass(frozen=True)
class RefineParams:
    """Settings of the per-image CPU work (picklable; sent to the workers once per job).

    ``sgc``: an ``ssr_cli.refine.sgc.SGCParams`` (used when ``mask == "sgc"``);
    ``crf``: None for no CRF, else the keyword arguments of ``dense_crf``;
    ``conf_thresh``: None keeps every pixel.
    """

    mask: str = "sgc"
    box_thresh: float = BOX_THRESH_DEFAULT
    box_style: str = "clip-es"
    sgc: Any = None
    bg_alpha: float = 1.0
    crf: dict[str, float] | None = None
    conf_thresh: float | None = 0.95
    save_cams: bool = False


@dataclass
class ItemJob:
    """One image's inputs (see the module docstring for the layouts)."""

    item_id: str
    image: np.ndarray
    seed: dict[str, np.ndarray]
    affinity: np.ndarray | None


@dataclass
class ItemResult:
    """One image's outputs: label PNG bytes, optional CAM ``.npz`` bytes, seconds per part
    (wall: ``mask``, ``refine``, ``crf`` or ``labels``, ``encode``; and ``cpu``, the CPU time)."""

    item_id: str
    png: bytes
    cams_npz: bytes | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class ItemFailure(SSRError):
    """Processing one image failed; the message names the image id and the cause."""

    def __init__(self, item_id: str, cause: str, hint: str | None = None, detail: str = "") -> None:
        self.item_id = item_id
        self.cause = cause
        self.detail = detail  # the traceback text (shown with SSR_DEBUG=1)
        super().__init__(f"refine failed on image {item_id!r}: {cause}", hint=hint)

    def __reduce__(self) -> tuple[Any, ...]:  # exceptions with keyword-only init need this to pickle
        return (ItemFailure, (self.item_id, self.cause, self.hint, self.detail))


ItemFn = Callable[[ItemJob, RefineParams], ItemResult]


def encode_label_png(labels: np.ndarray) -> bytes:
    """``[H, W]`` uint8 class ids -> palette PNG bytes with the VOC palette (``write_label_png``'s format)."""
    from PIL import Image

    from ssr_cli.data.images import voc_palette

    data = np.ascontiguousarray(labels, dtype=np.uint8)
    if data.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {data.shape}")
    image = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())
    image.putpalette(voc_palette())
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_cams(cams: np.ndarray, seed: dict[str, np.ndarray]) -> bytes:
    """Refined CAMs ``[C, h, w]`` as a seeds file (``ssr_cli/artefacts/seeds.py``), no attention."""
    from ssr_cli.artefacts.seeds import encode_seed

    return encode_seed(cams, seed["class_ids"], seed["image_hw"], seed["scales"], bool(seed["flip"]))


def clip_es_box_mask(cam: np.ndarray, threshold: float = BOX_THRESH_DEFAULT) -> np.ndarray:
    """CLIP-ES's class mask exactly (its ``scoremap2bbox``, every contour): ``[h, w]`` -> {0, 1}.

    The CAM is cast to 8 bits as ``uint8(cam * 255)`` (truncation; CLIP-ES's CAMs are
    min-max normalised with ``/ (max + 1e-7)``, so their maximum is just below 1 and
    the 8-bit maximum may be below 255); a patch is on when its 8-bit value is above
    ``int(threshold * 8-bit max)``; each contour's bounding box ``[x, x + w) x [y, y + h)``
    has its exclusive end clipped to ``width - 1`` / ``height - 1`` (so a box that
    touches the right or bottom edge loses that column or row). No contour: all zero.
    ``ssr_cli.refine.affinity.box_mask`` differs in the threshold (relative to the
    float maximum) unless the maximum is exactly 1; ``--box-style full`` uses it.
    """
    import cv2

    height, width = cam.shape
    scoremap = (np.asarray(cam, dtype=np.float32) * 255).astype(np.uint8)
    mask = np.zeros((height, width), np.float32)
    if scoremap.size == 0:
        return mask
    _, binary = cv2.threshold(scoremap, int(threshold * int(scoremap.max())), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        mask[y : min(y + h, height - 1), x : min(x + w, width - 1)] = 1.0
    return mask


def column_masks(image: np.ndarray, cams: np.ndarray, params: RefineParams) -> np.ndarray | None:
    """``[C, h, w]`` float32 {0, 1} masks for ``cams`` ``[C, h, w]`` (None for ``mask == "none"``)."""
    if params.mask == "none":
        return None
    if params.mask == "box":
        from ssr_cli.refine.affinity import box_mask

        if not len(cams):
            return np.zeros_like(cams)
        if params.box_style == "clip-es":
            return np.stack([clip_es_box_mask(c, params.box_thresh) for c in cams])
        return np.stack([np.asarray(box_mask(c, params.box_thresh)) for c in cams])
    if params.mask == "sgc":
        from ssr_cli.refine.sgc import sgc_masks

        grid = (int(cams.shape[1]), int(cams.shape[2]))
        return sgc_masks(image, cams, grid, params.sgc).astype(np.float32)
    raise ValueError(f"unknown mask {params.mask!r}; one of {MASKS}")


def process_item(job: ItemJob, params: RefineParams) -> ItemResult:
    """The CPU work for one image (steps in the module docstring); see :class:`ItemJob`."""
    import torch

    from ssr_cli.cam.labels import upsample_cams
    from ssr_cli.refine.affinity import refine_cams
    from ssr_cli.refine.crf import cams_to_probs, crf_image, dense_crf, labels_with_confidence

    seconds: dict[str, float] = {}
    clock, cpu_start = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    seed, image = job.seed, job.image
    cams = np.asarray(seed["cams"], dtype=np.float32)
    class_ids = [int(c) for c in seed["class_ids"]]
    height, width = (int(v) for v in seed["image_hw"])
    n_cls, gh, gw = cams.shape
    masks = column_masks(image, cams, params) if n_cls else None
    lap("mask")
    if n_cls:
        affinity = torch.eye(gh * gw) if job.affinity is None else torch.from_numpy(job.affinity)
        with one_torch_thread():
            refined = refine_cams(
                affinity, torch.from_numpy(cams), None if masks is None else torch.from_numpy(masks)
            ).numpy()
    else:
        refined = np.zeros((0, gh, gw), np.float32)
    up = upsample_cams(refined, (height, width))
    probs = cams_to_probs(up, alpha=params.bg_alpha)
    lap("refine")
    if params.crf is not None:
        crf = dict(params.crf)
        crf_input = crf_image(image, str(crf.pop("image", "rgb")))
        probs = dense_crf(crf_input, probs, iters=int(crf.pop("iters", 10)), **crf)
    labels = labels_with_confidence(probs, [0, *class_ids], params.conf_thresh)
    lap("crf" if params.crf is not None else "labels")
    png = encode_label_png(labels)
    cams_npz = encode_cams(refined, seed) if params.save_cams else None
    lap("encode")
    seconds["cpu"] = time.process_time() - cpu_start  # this process's CPU time (vs the laps' wall time)
    return ItemResult(job.item_id, png, cams_npz, seconds)


class one_torch_thread:
    """Run torch ops on one thread (results then do not depend on the thread count)."""

    def __enter__(self) -> None:
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.old)


#: the worker pool's names, importable from here as before (``ssr_cli.refine.pool`` is their home)
_POOL_NAMES = ("WorkerPool", "run_job", "single_threaded", "worker_init", "worker_context", "WORKER_PRELOAD")


def __getattr__(name: str) -> Any:
    """``from ssr_cli.refine.pipeline import WorkerPool`` (and the pool's other names) still works;
    imported lazily, as ``ssr_cli.refine.pool`` imports this module."""
    if name in _POOL_NAMES:
        from ssr_cli.refine import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
