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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.artefacts import RunFolder, Shard, atomic_write_bytes
from ssr_cli.artefacts.item_checks import png_check
from ssr_cli.artefacts.seeds import load_seed
from ssr_cli.console import ProgressBar, info, progress_enabled, warn
from ssr_cli.data import Dataset, read_image
from ssr_cli.data.size_limit import (
    SizeLimit,
    SizePlan,
    image_size,
    plan_sizes,
    read_downscaled,
    upscale_labels,
)
from ssr_cli.errors import ArtefactError
from ssr_cli.parallel import bounded_map
from ssr_cli.refine.config import BOX_THRESH, BOX_THRESH_DEFAULT, RefineConfig
from ssr_cli.refine.pipeline import (
    ItemFailure,
    ItemFn,
    ItemJob,
    RefineParams,
    WorkerPool,
    process_item,
)
from ssr_cli.refine.sources import (
    SeedsRun,
    batch_affinity,
    check_dataset,
    load_dino_model,
    open_seeds,
    resolve_clip,
)

STAGE = "refine"
ITEM_DIR = "labels"
ITEM_SUFFIX = ".png"
CAMS_DIR = "cams"
REFINE_VERSION = "refine-1"  # bump when the computation changes results


def _batches(
    dataset: Dataset, ids: Sequence[str], batch_size: int, plan: SizePlan | None = None
) -> list[list[str]]:
    """Consecutive ids of one (working) image size, at most ``batch_size`` each (fixed by the id
    order, so a resumed run forms the same batches and computes the same numbers)."""
    if batch_size == 1:
        return [[i] for i in ids]
    batches: list[list[str]] = []
    last: tuple[int, int] | None = None
    for item_id in ids:
        target = None if plan is None else plan.target_hw(item_id)
        size = target or image_size(dataset.get(item_id).image)
        if batches and len(batches[-1]) < batch_size and size == last:
            batches[-1].append(item_id)
        else:
            batches.append([item_id])
        last = size
    return batches


def _read(
    dataset: Dataset, seeds: SeedsRun, item_id: str, attn: bool = False, plan: SizePlan | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The image and its seed; with ``attn`` the seed must hold the stored CLIP attention ``[hw, hw]``.

    An image that ``plan`` downscales comes at its working size, and so does the seed's ``image_hw``."""
    target = None if plan is None else plan.target_hw(item_id)
    image_path, path = dataset.get(item_id).image, seeds.item_path(item_id)
    image = read_image(image_path) if target is None else read_downscaled(image_path, target)
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


def _prefetch(
    dataset: Dataset,
    seeds: SeedsRun,
    batches: list[list[str]],
    attn: bool = False,
    plan: SizePlan | None = None,
) -> Iterator[tuple[list[str], list]]:
    """Read the images and seeds of upcoming batches on two threads (a few batches ahead)."""

    def read(batch: list[str]) -> tuple[list[str], list]:
        return batch, [_read(dataset, seeds, i, attn, plan) for i in batch]

    yield from bounded_map(read, batches, 2, ahead=3, name="ssr-refine-read")


def _item_check(out: Path, save_cams: bool) -> Callable[[Path], bool]:
    """A finished item is a readable label PNG and, with ``--save-cams``, a well-formed CAM file."""
    from ssr_cli.artefacts.seeds import load_seed

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


def run(
    dataset: Dataset,
    seeds_dir: str | Path,
    out: str | Path,
    cfg: RefineConfig,
    *,
    shard: Shard,
    overwrite: bool,
    item_fn: ItemFn = process_item,
) -> dict[str, Any]:
    """Refine the seeds in ``seeds_dir`` into pseudo-labels in the run folder ``out``; returns the manifest.

    ``item_fn`` is the per-image CPU work (a module-level function when ``workers`` > 0).
    """
    from ssr_cli.runtime import resolve_device, resolve_precision, torch_threads

    cfg.check()
    seeds = open_seeds(seeds_dir)
    check_dataset(seeds, dataset)
    paths = [dataset.get(i).image for i in dataset.ids]
    plan = plan_sizes(dataset.ids, paths, SizeLimit(cfg.max_side, cfg.oversize), stage="refine")
    ids = [i for i in dataset.ids if i not in plan.skipped]
    mine = shard.select(ids)
    missing = [i for i in mine if not seeds.item_path(i).is_file()]
    if missing:
        raise ArtefactError(
            f"the seeds run lacks {len(missing)} of this shard's {len(mine)} images (e.g. {missing[0]!r})",
            path=seeds.root,
            hint="finish make-seeds first (rerun the same make-seeds command)",
        )
    device = resolve_device(cfg.device)
    sources = cfg.sources()
    precision = resolve_precision(cfg.precision, device) if sources else "fp32"
    params = resolved_params(cfg, dataset)
    clip, clip_record, clip_attention = resolve_clip(
        seeds,
        device,
        use_clip="clip" in sources,
        clip_blocks=cfg.clip_blocks,
        mode=cfg.clip_attention,
        clip_arch=cfg.clip_arch,
        clip_weights=cfg.clip_weights,
    )
    dino, dino_record = (None, None)
    if "dino" in sources:
        dino, dino_record = load_dino_model(cfg.dino_model, cfg.dino_weights, device, cfg.seed)

    clip_random = (clip_record or {}).get("weights", {}).get("origin") == "random"
    result_config, notices = _result_config(
        cfg, params, precision, clip_attention, clip_random, dino, dino_record
    )
    if plan.record() is not None:
        result_config["oversize"] = plan.record()
    inputs: dict[str, Any] = {
        "dataset": dataset.describe(),
        "seeds": {"path": str(seeds.root), "fingerprint": seeds.fingerprint},
    }
    if clip_record is not None:
        inputs["clip"] = clip_record
    if dino_record is not None:
        inputs["dino"] = dino_record
    config = {
        **asdict(cfg),
        "seeds": str(seeds_dir),
        "precision_resolved": precision,
        "device_resolved": str(device),
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
    cams_dir = run_folder.extra_path(CAMS_DIR)
    for notice in notices:
        warn(notice)

    pending = set(run_folder.pending(ids))
    info(
        f"refine: {len(mine)} images in shard {shard}, {len(mine) - len(pending)} already done; "
        f"affinity {cfg.affinity}"
        + (f" (CLIP attention {clip_attention})" if clip_attention else "")
        + f", mask {cfg.mask}, CRF {'on' if cfg.crf else 'off'}, "
        f"{cfg.workers} worker(s), {precision} on {device}"
    )
    batches = [b for b in _batches(dataset, mine, cfg.batch_size, plan) if any(i in pending for i in b)]
    seconds: dict[str, float] = {}
    first_result = [True]

    def write(result: Any) -> None:
        start = time.perf_counter()
        result = _at_original_size(result, plan.downscaled.get(result.item_id))
        if result.cams_npz is not None:  # before the label: the label file marks the item done
            run_folder.check_still_ours()
            atomic_write_bytes(cams_dir / f"{result.item_id}.npz", result.cams_npz)
        run_folder.write_item(result.item_id, lambda p: p.write_bytes(result.png))
        for key, value in result.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
        seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - start
        bar.update(1, status="" if first_result else None)  # the first result ends the start-up status
        first_result.clear()

    threads = main_threads(device, cfg.workers)
    with (
        ProgressBar("refine", total=len(pending)) as bar,
        WorkerPool(cfg.workers, params, item_fn) as pool,
        torch_threads(threads),
    ):
        if pending:  # the bar would sit at 0 while the workers start and the first attention runs
            starting = f"starting {cfg.workers} worker process(es), " if cfg.workers else ""
            status = f"{starting}attention of the first {min(cfg.batch_size, len(pending))} image(s)"
            bar.update(0, status=status)
            if not progress_enabled():
                info(f"refine: {status}")
        try:
            stored = clip_attention == "seeds"
            for batch, read in _prefetch(dataset, seeds, batches, stored, plan):
                if pool.failed:
                    break
                images = [image for image, _ in read]
                grid = (int(read[0][1]["cams"].shape[1]), int(read[0][1]["cams"].shape[2]))
                if any(tuple(s["cams"].shape[1:]) != grid for _, s in read):
                    raise ArtefactError(f"seeds of images {batch} have different grids", path=seeds.root)
                fused = None
                attn = np.stack([s.pop("attn") for _, s in read]) if stored else None  # not to the workers
                if sources:
                    fused = batch_affinity(
                        images,
                        grid,
                        clip,
                        dino,
                        clip_blocks=cfg.clip_blocks,
                        dino_blocks=cfg.dino_blocks,
                        weights=cfg.affinity_weights,
                        precision=precision,
                        seconds=seconds,
                        ids=batch,
                        stored_clip=attn,
                        device=device,
                    )
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
    extra: dict[str, Any] = {"last_run_seconds": {k: round(v, 3) for k, v in seconds.items()}}
    if clip_attention is not None:
        extra["clip_attention"] = clip_attention
    manifest = run_folder.finish(ids, extra=extra)
    if pool.failures:
        first = pool.failures[0]
        more = f" (and {len(pool.failures) - 1} more)" if len(pool.failures) > 1 else ""
        raise ItemFailure(
            first.item_id,
            first.cause + more,
            first.hint or "finished items are kept: fix the cause and rerun the same command to resume",
            first.detail,
        )
    return manifest
