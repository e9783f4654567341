"""The per-image CPU part of ``ssr refine``: masks, affinity refinement, labels, CRF; and its worker pool.

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

:class:`WorkerPool` runs jobs in ``workers`` processes (0 = inline) with at most
``2 * workers`` in flight, so memory does not grow with the number of images. The
workers are forked from a fork server that has imported torch, OpenCV, scikit-learn
and pydensecrf once (:data:`WORKER_PRELOAD`; spawn where there is no fork server);
each runs torch, OpenCV and every OpenMP/BLAS pool on one thread (threadpoolctl), and
inline work does the same, so the results do not depend on the number of workers. A
job's exception comes back as :class:`ItemFailure` naming the image id. This module
imports only numpy at the top (import it anywhere).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ssr_cli.errors import SSRError
from ssr_cli.refine.config import BOX_THRESH_DEFAULT, MASKS

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


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
        with _one_torch_thread():
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


class _one_torch_thread:
    """Run torch ops on one thread (results then do not depend on the thread count)."""

    def __enter__(self) -> None:
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.old)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch, OpenCV and OpenMP/BLAS on one thread for a while, as in the workers (so that
    ``--workers 0`` computes the same numbers as worker processes)."""
    import cv2
    import sklearn.cluster  # noqa: F401  (load its OpenMP runtime so that the limit covers it)
    from threadpoolctl import threadpool_limits

    old_cv = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with _one_torch_thread(), threadpool_limits(1):
            yield
    finally:
        cv2.setNumThreads(old_cv)


#: Imported once by the fork server, so each worker starts without importing them again.
WORKER_PRELOAD = [
    "ssr_cli.refine.forkserver_guard",  # first: the fork server dies with the main process
    "ssr_cli.refine.pipeline",
    "numpy",
    "torch",
    "cv2",
    "sklearn.cluster",
    "pydensecrf.densecrf",
]


def worker_init(main_pid: int | None = None) -> None:
    """Process-pool initializer: the worker dies with the main process ``main_pid``
    (``ssr_cli.procs``); one thread for torch, OpenCV and every OpenMP/BLAS library here."""
    import warnings

    from ssr_cli.procs import guard_helper

    guard_helper(main_pid)
    warnings.simplefilter("ignore")  # library noise; a failing image comes back as ItemFailure
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import cv2
    import sklearn.cluster  # noqa: F401  (load its OpenMP runtime so that the limit below covers it)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    threadpool_limits(1)


def worker_context() -> Any:
    """The multiprocessing context of the workers: a fork server with :data:`WORKER_PRELOAD`
    where there is one (a clean single-threaded process to fork from: the main process has
    torch/OpenMP thread pools and maybe CUDA, which forking breaks), else spawn."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


ItemFn = Callable[[ItemJob, RefineParams], ItemResult]


def run_job(fn: ItemFn, job: ItemJob, params: RefineParams) -> ItemResult:
    """``fn(job, params)`` with any exception turned into :class:`ItemFailure` (picklable, names the id)."""
    try:
        return fn(job, params)
    except ItemFailure:
        raise
    except SSRError as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise ItemFailure(job.item_id, where + exc.what, exc.hint, traceback.format_exc()) from None
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ItemFailure(job.item_id, cause, None, traceback.format_exc()) from None


class WorkerPool:
    """Jobs on ``workers`` processes (0 = inline), at most ``2 * workers`` in flight.

    :meth:`submit` returns the results that finished meanwhile; :meth:`drain` the rest.
    Failures (:class:`ItemFailure`, or a worker that died) are collected in
    ``failures``; after the first one, :meth:`submit` accepts no more work, and the
    jobs already in flight still finish (their results are returned).
    """

    def __init__(self, workers: int, params: RefineParams, fn: ItemFn = process_item) -> None:
        self.workers = max(0, int(workers))
        self.params = params
        self.fn = fn
        self.failures: list[ItemFailure] = []
        self._inflight: dict[Future[ItemResult], str] = {}
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 0:
            from ssr_cli.procs import export_main_pid

            main_pid = export_main_pid()  # before the fork server starts: it reads it
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=worker_context(),
                initializer=worker_init,
                initargs=(main_pid,),
            )

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def submit(self, job: ItemJob) -> list[ItemResult]:
        if self.failed:
            return []
        if self._pool is None:
            try:
                with single_threaded():
                    return [run_job(self.fn, job, self.params)]
            except ItemFailure as exc:
                self.failures.append(exc)
                return []
        done: list[ItemResult] = []
        while len(self._inflight) >= 2 * self.workers:
            done += self._collect(wait(list(self._inflight), return_when=FIRST_COMPLETED).done)
        if not self.failed:
            try:
                future = self._pool.submit(run_job, self.fn, job, self.params)
            except BrokenProcessPool:
                self._broken([job.item_id])
            else:
                self._inflight[future] = job.item_id
        return done

    def drain(self) -> Iterator[ItemResult]:
        """Wait for the jobs in flight; yields their results as they finish."""
        while self._inflight:
            yield from self._collect(wait(list(self._inflight), return_when=FIRST_COMPLETED).done)

    def _collect(self, futures: Any) -> list[ItemResult]:
        out: list[ItemResult] = []
        broken: list[str] = []
        for future in futures:
            item_id = self._inflight.pop(future)
            try:
                out.append(future.result())
            except ItemFailure as exc:
                self.failures.append(exc)
            except BrokenProcessPool:
                broken.append(item_id)
        if broken:
            self._broken(broken)
        return out

    def _broken(self, ids: list[str]) -> None:
        shown = ", ".join(repr(i) for i in sorted(ids)[:4])
        self.failures.append(
            ItemFailure(
                sorted(ids)[0],
                f"a worker process died (killed, e.g. out of memory, or crashed) while working on {shown}",
                "finished items are kept: rerun the same command to resume, with fewer --workers "
                "if memory is short",
            )
        )

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(cancel=exc_type is not None)
