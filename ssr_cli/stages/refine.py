"""Stage ``refine``: seeds -> pseudo-label PNGs (CAA / SGC affinity refinement, background rule, CRF).

Reads a ``seeds`` run folder (``cams/<id>.npz``, ``ssr_cli.artefacts.seeds.load_seed``) and the images;
writes ``labels/<id>.png`` (VOC palette; 0 background, class ids, 255 uncertain) and,
with ``save_cams``, ``cams/<id>.npz`` (refined CAMs, float32 ``[C, h, w]`` on the
seeds' patch grid, seed format). Per image (METHOD.md sections 1, 3, 4):

- main process (the device, batched over images of one size): CLIP attention
  (``[h*w, h*w]``, last ``clip_blocks`` blocks, head-averaged, CLS dropped: read from the
  seeds when they hold it for those blocks (``make-seeds --save-attn``, float16; then no
  CLIP is loaded), else recomputed with the seeds' CLIP; ``clip_attention`` in the
  manifest says which), DINO attention on the same grid, fused into one
  affinity (``fuse_affinity``: each source normalised as CAA does, weighted sum,
  symmetrised, squared);
- worker processes (``pipeline.process_item``): masks, refinement, CLIP-ES
  upsampling, background ``(1 - max CAM) ** bg_alpha``, dense CRF, confidence.

``affinity="clip"`` with ``mask="box"`` is CLIP-ES's CAA exactly.

Defaults and why: ``affinity="clip+dino"`` with weights 0.4 : 0.6 (the SSR paper);
CLIP attention of the last 8 blocks (CLIP-ES); DINO's last block (METHOD.md: our
choice, configurable); ``mask="sgc"`` (SSR; its parameters' reasons are in
``refine/sgc.py``); box threshold 0.4 of the max, 0.7 for the COCO vocabulary, and
``box_style="clip-es"`` (CLIP-ES, to the last quirk); background alpha 1 and the CRF
settings (CLIP-ES, DeepLab: 10 iterations, Gaussian sxy 1 compat 3, bilateral sxy 67
srgb 3 compat 4); ``conf_thresh`` 0.95 of the CRF posterior (CLIP-ES), and none
without the CRF (the normalised CAM stack is no posterior: 0.95 would drop most pixels).
Imports torch: only import inside command bodies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.artefacts import RunFolder, Shard, atomic_write_bytes
from ssr_cli.artefacts.item_checks import png_check
from ssr_cli.artefacts.seeds import load_seed
from ssr_cli.console import ProgressBar, info, progress_enabled, warn
from ssr_cli.data import Dataset
from ssr_cli.data.size_limit import SizePlan, upscale_labels
from ssr_cli.errors import ArtefactError
from ssr_cli.refine.config import BOX_THRESH, BOX_THRESH_DEFAULT, RefineConfig
from ssr_cli.refine.inputs import one_size_batches, prefetch
from ssr_cli.refine.pipeline import (
    ItemFailure,
    ItemFn,
    ItemJob,
    ItemResult,
    RefineParams,
    process_item,
)
from ssr_cli.refine.pool import WorkerPool
from ssr_cli.refine.sources import Attention, SeedsRun, check_dataset, load_attention, open_seeds
from ssr_cli.stages.working_size import plan_dataset

STAGE = "refine"
ITEM_DIR = "labels"
ITEM_SUFFIX = ".png"
CAMS_DIR = "cams"
REFINE_VERSION = "refine-1"  # bump when the computation changes results


def _item_check(out: Path, save_cams: bool) -> Callable[[Path], bool]:
    """A finished item is a readable label PNG and, with ``--save-cams``, a well-formed CAM file."""

    def check(label: Path) -> bool:
        if not png_check(label):
            return False
        if not save_cams:
            return True
        rel = label.relative_to(out / ITEM_DIR).with_suffix(".npz")
        try:
            load_seed(out / CAMS_DIR / rel, with_attn=False)
        except ArtefactError:
            return False
        return True

    return check


def _at_original_size(result: Any, original: tuple[int, int] | None) -> Any:
    """A result computed on a downscaled image, with its label (nearest) and CAMs' ``image_hw``
    brought back to the image's original size."""
    if original is None:
        return result
    import dataclasses
    import io

    from PIL import Image

    from ssr_cli.refine.pipeline import encode_label_png

    with Image.open(io.BytesIO(result.png)) as im:
        labels = np.asarray(im)
    png = encode_label_png(upscale_labels(labels, original))
    cams_npz = result.cams_npz
    if cams_npz is not None:
        with np.load(io.BytesIO(cams_npz)) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["image_hw"] = np.asarray(original, dtype=np.int32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        cams_npz = buf.getvalue()
    return dataclasses.replace(result, png=png, cams_npz=cams_npz)


def main_threads(device: Any, workers: int) -> int | None:
    """Torch threads of the main process on the CPU: the cores the ``workers`` leave free (at least 1).

    The workers run one thread each; without this, the main process's OpenMP threads and
    the workers fight over the same cores, and OpenMP's spinning makes that much slower
    than either alone (measured: ``benchmarks/bench_refine.py``). None (unchanged) on a GPU
    or without workers.
    """
    if getattr(device, "type", "cpu") != "cpu" or workers <= 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - workers)


def resolved_params(cfg: RefineConfig, dataset: Dataset) -> RefineParams:
    box = (
        cfg.box_thresh
        if cfg.box_thresh is not None
        else BOX_THRESH.get(dataset.vocab.name, BOX_THRESH_DEFAULT)
    )
    conf = cfg.conf_thresh if cfg.conf_thresh is not None else (0.95 if cfg.crf else None)
    return RefineParams(
        mask=cfg.mask,
        box_thresh=float(box),
        box_style=cfg.box_style,
        sgc=cfg.sgc,
        bg_alpha=cfg.bg_alpha,
        crf=dict(cfg.crf_params) if cfg.crf else None,
        conf_thresh=conf,
        save_cams=cfg.save_cams,
    )


def _result_config(
    cfg: RefineConfig,
    params: RefineParams,
    precision: str,
    clip_attention: str | None,
    clip_random: bool,
    dino: Any,
    dino_record: Any,
) -> tuple[dict[str, Any], list[str]]:
    """The settings that change results (only those of the parts in use) and the notices."""
    sources = cfg.sources()
    result_config: dict[str, Any] = {
        "refine": REFINE_VERSION,
        "affinity": cfg.affinity,
        "mask": cfg.mask,
        "bg_alpha": cfg.bg_alpha,
        "crf": params.crf,
        "conf_thresh": params.conf_thresh,
        "save_cams": cfg.save_cams,
    }
    if sources:
        result_config["precision"] = precision
    if clip_attention is not None:  # stored (float16) and recomputed attention differ by rounding
        result_config["clip_blocks"] = cfg.clip_blocks
        result_config["clip_attention"] = clip_attention
    if dino is not None:
        assert dino_record is not None
        weights_id = f"random:seed={cfg.seed}" if dino.is_random else dino_record["weights"]["sha256"]
        result_config["dino"] = {
            "model": dino.name,
            "overrides": dino_record.get("overrides"),
            "weights": weights_id,
            "blocks": cfg.dino_blocks if isinstance(cfg.dino_blocks, int) else list(cfg.dino_blocks),
        }
    if len(sources) == 2:
        result_config["affinity_weights"] = list(cfg.affinity_weights)
    if cfg.mask == "box":
        result_config["box"] = {"thresh": params.box_thresh, "style": cfg.box_style}
    if cfg.mask == "sgc":
        result_config["sgc"] = asdict(cfg.sgc)
    notices = []
    if clip_random:
        notices.append("CLIP weights are RANDOM (the seeds' CLIP): these pseudo-labels are meaningless")
    if dino is not None and dino.is_random:
        notices.append(
            "DINO weights are RANDOM (--dino-weights random): the DINO affinity is meaningless; "
            "use it only to smoke-test the pipeline"
        )
    return result_config, notices


def _check_seeds_cover(seeds: SeedsRun, mine: Sequence[str]) -> None:
    """Refuse a shard whose images the seeds run does not (yet) all have."""
    missing = [i for i in mine if not seeds.item_path(i).is_file()]
    if missing:
        raise ArtefactError(
            f"the seeds run lacks {len(missing)} of this shard's {len(mine)} images (e.g. {missing[0]!r})",
            path=seeds.root,
            hint="finish make-seeds first (rerun the same make-seeds command)",
        )


def _open_run_folder(
    out: str | Path,
    dataset: Dataset,
    seeds: SeedsRun,
    seeds_dir: str | Path,
    cfg: RefineConfig,
    params: RefineParams,
    att: Attention,
    plan: SizePlan,
    ids: list[str],
    *,
    shard: Shard,
    overwrite: bool,
) -> tuple[RunFolder, list[str]]:
    """The refine run folder ``out`` (created, resumed or refused as its manifest says) and the notices."""
    clip_random = (att.clip_record or {}).get("weights", {}).get("origin") == "random"
    result_config, notices = _result_config(
        cfg, params, att.precision, att.clip_attention, clip_random, att.dino, att.dino_record
    )
    if plan.record() is not None:
        result_config["oversize"] = plan.record()
    inputs: dict[str, Any] = {
        "dataset": dataset.describe(),
        "seeds": {"path": str(seeds.root), "fingerprint": seeds.fingerprint},
    }
    if att.clip_record is not None:
        inputs["clip"] = att.clip_record
    if att.dino_record is not None:
        inputs["dino"] = att.dino_record
    config = {
        **asdict(cfg),
        "seeds": str(seeds_dir),
        "precision_resolved": att.precision,
        "device_resolved": str(att.device),
        "box_thresh_resolved": params.box_thresh,
        "conf_thresh_resolved": params.conf_thresh,
    }
    run_folder = RunFolder.open(
        out,
        stage=STAGE,
        item_dir=ITEM_DIR,
        item_suffix=ITEM_SUFFIX,
        config=config,
        result_config=result_config,
        upstream={"seeds": seeds.fingerprint},
        inputs=inputs,
        ids=ids,
        shard=shard,
        overwrite=overwrite,
        notices=notices,
        extra_items={CAMS_DIR: ".npz"},
        check_item=_item_check(Path(out), cfg.save_cams),
    )
    return run_folder, notices


class _ResultWriter:
    """Writes the workers' results into the run folder (the CAMs first: the label file marks the
    item done), back at the original size of a downscaled image; sums their ``seconds``."""

    def __init__(self, run_folder: RunFolder, cams_dir: Path, plan: SizePlan, seconds: dict[str, float]):
        self.run_folder, self.cams_dir, self.plan, self.seconds = run_folder, cams_dir, plan, seconds
        self.bar: Any = None
        self.first_result = True

    def __call__(self, result: ItemResult) -> None:
        start = time.perf_counter()
        result = _at_original_size(result, self.plan.downscaled.get(result.item_id))
        if result.cams_npz is not None:  # before the label: the label file marks the item done
            self.run_folder.check_still_ours()
            atomic_write_bytes(self.cams_dir / f"{result.item_id}.npz", result.cams_npz)
        self.run_folder.write_item(result.item_id, lambda p: p.write_bytes(result.png))
        seconds = self.seconds
        for key, value in result.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
        seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - start
        self.bar.update(1, status="" if self.first_result else None)  # the first ends the start-up status
        self.first_result = False


def _show_start(bar: ProgressBar, workers: int, batch_size: int, pending: int) -> None:
    """A start-up status (the bar would sit at 0 while the workers start and the first attention runs)."""
    starting = f"starting {workers} worker process(es), " if workers else ""
    status = f"{starting}attention of the first {min(batch_size, pending)} image(s)"
    bar.update(0, status=status)
    if not progress_enabled():
        info(f"refine: {status}")


def _refine_batches(
    dataset: Dataset,
    seeds: SeedsRun,
    plan: SizePlan,
    batches: list[list[str]],
    pending: set[str],
    att: Attention,
    pool: WorkerPool,
    write: _ResultWriter,
) -> None:
    """The attention of each batch here, the rest of each pending image on the pool; writes the
    results as they come, and what the workers finished even when something fails."""
    try:
        for batch, read in prefetch(dataset, seeds, batches, att.stored, plan):
            if pool.failed:
                break
            fused = att.fused(batch, read, seeds, write.seconds)
            for k, (item_id, (image, seed)) in enumerate(zip(batch, read, strict=True)):
                if item_id in pending:
                    job = ItemJob(item_id, image, seed, None if fused is None else fused[k])
                    for result in pool.submit(job):
                        write(result)
    except Exception:
        for result in pool.drain():  # keep what the workers finished, then report the error
            write(result)
        raise
    for result in pool.drain():
        write(result)


def _raise_failures(failures: list[ItemFailure]) -> None:
    """The first failed image's error (with the count of the others), if any failed."""
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ItemFailure(
            first.item_id,
            first.cause + more,
            first.hint or "finished items are kept: fix the cause and rerun the same command to resume",
            first.detail,
        )


def run(
    dataset: Dataset,
    seeds_dir: str | Path,
    out: str | Path,
    cfg: RefineConfig,
    *,
    shard: Shard,
    overwrite: bool,
    item_fn: ItemFn = process_item,
    seeds_run: SeedsRun | None = None,
) -> dict[str, Any]:
    """Refine the seeds in ``seeds_dir`` into pseudo-labels in the run folder ``out``; returns the manifest.

    ``item_fn`` is the per-image CPU work (a module-level function when ``workers`` > 0);
    ``seeds_run``: ``seeds_dir`` already opened (``open_seeds``), not read again.
    """
    from ssr_cli.runtime import torch_threads

    cfg.check()
    seeds = open_seeds(seeds_dir) if seeds_run is None else seeds_run
    check_dataset(seeds, dataset)
    plan, ids = plan_dataset(dataset, cfg.max_side, cfg.oversize, stage="refine")
    mine = shard.select(ids)
    _check_seeds_cover(seeds, mine)
    params = resolved_params(cfg, dataset)
    att = load_attention(cfg, seeds)
    run_folder, notices = _open_run_folder(
        out, dataset, seeds, seeds_dir, cfg, params, att, plan, ids, shard=shard, overwrite=overwrite
    )
    cams_dir = run_folder.extra_path(CAMS_DIR)
    for notice in notices:
        warn(notice)

    pending = set(run_folder.pending(ids))
    info(
        f"refine: {len(mine)} images in shard {shard}, {len(mine) - len(pending)} already done; "
        f"affinity {cfg.affinity}"
        + (f" (CLIP attention {att.clip_attention})" if att.clip_attention else "")
        + f", mask {cfg.mask}, CRF {'on' if cfg.crf else 'off'}, "
        f"{cfg.workers} worker(s), {att.precision} on {att.device}"
    )
    batches = [
        b for b in one_size_batches(dataset, mine, cfg.batch_size, plan) if any(i in pending for i in b)
    ]
    write = _ResultWriter(run_folder, cams_dir, plan, {})
    with (
        ProgressBar("refine", total=len(pending)) as bar,
        WorkerPool(cfg.workers, params, item_fn) as pool,
        torch_threads(main_threads(att.device, cfg.workers)),
    ):
        write.bar = bar
        if pending:
            _show_start(bar, cfg.workers, cfg.batch_size, len(pending))
        _refine_batches(dataset, seeds, plan, batches, pending, att, pool, write)
    extra: dict[str, Any] = {"last_run_seconds": {k: round(v, 3) for k, v in write.seconds.items()}}
    if att.clip_attention is not None:
        extra["clip_attention"] = att.clip_attention
    manifest = run_folder.finish(ids, extra=extra)
    _raise_failures(pool.failures)
    return manifest
