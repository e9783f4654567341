"""Stage ``make-seeds``: CLIP GradCAM seeds, one ``cams/<id>.npz`` per image.

Each item file is a seeds file (``ssr_cli/artefacts/seeds.py`` describes the format).

Imports torch: only import inside command bodies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.artefacts import RunFolder, Shard
from ssr_cli.artefacts.seeds import save_seed, seed_readable
from ssr_cli.cam.config import SeedsConfig
from ssr_cli.cam.multiscale import cams_and_attention
from ssr_cli.console import ProgressBar, info, warn
from ssr_cli.data import Dataset
from ssr_cli.data.size_limit import SizePlan
from ssr_cli.errors import DataError
from ssr_cli.models.clip import register_arch
from ssr_cli.parallel import bounded_map
from ssr_cli.stages.working_size import plan_dataset, read_working, working_hw

STAGE = "seeds"
ITEM_DIR = "cams"
ITEM_SUFFIX = ".npz"
CAM_VERSION = "gradcam-clip-es-2"  # bump when the CAM computation changes results


def _batches(ids: Sequence[str], sizes: dict[str, tuple[int, int]], batch_size: int) -> list[list[str]]:
    """Consecutive ids with the same network input size, at most ``batch_size`` each.

    Depends only on the (fixed) id order, so a resumed run forms the same batches
    and so computes bit-identical CAMs.
    """
    batches: list[list[str]] = []
    for item_id in ids:
        if batches and len(batches[-1]) < batch_size and sizes[batches[-1][0]] == sizes[item_id]:
            batches[-1].append(item_id)
        else:
            batches.append([item_id])
    return batches


def _prefetch(
    dataset: Dataset, batches: list[list[str]], workers: int, plan: SizePlan | None = None
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Decode the images of upcoming batches on ``workers`` threads (at least one, in the background:
    the one bounded parallel map, ``ssr_cli.parallel``), a few batches ahead, in order."""

    def read(batch: list[str]) -> tuple[list[str], list[np.ndarray]]:
        return batch, [read_working(dataset, i, plan) for i in batch]

    ahead = max(2, workers * 2)
    yield from bounded_map(read, batches, workers, ahead=ahead, name="ssr-seeds-read", inline=False)


@dataclass
class SeedsModel:
    """The CLIP of a make-seeds run, its CMPA heads (or None) and what the run's fingerprint
    records of them (``result_config``), with the resolved CAM target and stored attention blocks."""

    model: Any
    description: dict[str, Any]  # model.describe(), for the manifest's inputs
    heads: Any
    cmpa_fp: str | None
    result_config: dict[str, Any]
    cam_target: str
    attn_indices: list[int]


def load_seeds_model(cfg: SeedsConfig, device: Any, precision: str, plan: SizePlan) -> SeedsModel:
    """CLIP (and ``--cmpa``'s heads) as ``cfg`` says, and the settings that change the seeds."""
    from ssr_cli.cam.gradcam import resolve_target
    from ssr_cli.models.clip import load_clip

    arch = register_arch(cfg.arch)
    model = load_clip(arch, cfg.weights, device, seed=cfg.seed)
    heads, cmpa_fp = None, None
    if cfg.cmpa:
        from ssr_cli.models.cmpa import load_heads  # written with the CMPA stage

        heads, cmpa_fp = load_heads(cfg.cmpa, device, clip=model)  # refuses heads of another CLIP
    clip_desc = model.describe()
    weights_desc = clip_desc.get("weights", {})
    weights_id = f"random:seed={cfg.seed}" if model.is_random else weights_desc.get("sha256")
    if not weights_id:
        raise RuntimeError("CLIP weights have no SHA-256: the run could not be fingerprinted")
    result_config = {
        "cam": CAM_VERSION,
        "arch": arch,
        "quick_gelu": clip_desc.get("quick_gelu"),
        "weights": weights_id,
        "scales": list(cfg.scales),
        "flip": cfg.flip,
        "precision": precision,
        "save_attn": cfg.save_attn,
    }
    if plan.record() is not None:
        result_config["oversize"] = plan.record()
    cam_target = resolve_target(cfg.cam_target, heads)
    if cam_target != "prob":  # CLIP-ES's target keeps the fingerprints of earlier runs
        result_config["cam_target"] = cam_target
    attn_indices: list[int] = []
    if cfg.save_attn:
        depth = len(model.blocks)  # the last n blocks, as ClipModel.attention(x, blocks=n)
        attn_indices = list(range(max(0, depth - cfg.attn_blocks), depth))
        result_config["attn_blocks"] = cfg.attn_blocks
    return SeedsModel(model, clip_desc, heads, cmpa_fp, result_config, cam_target, attn_indices)


def _open_run_folder(
    out: str | Path,
    dataset: Dataset,
    cfg: SeedsConfig,
    clip: SeedsModel,
    config: dict[str, Any],
    ids: list[str],
    *,
    shard: Shard,
    overwrite: bool,
) -> RunFolder:
    """The seeds run folder ``out`` (created, resumed or refused as its manifest says); warns the notices."""
    notices = []
    if clip.model.is_random:
        notices.append(
            "CLIP weights are RANDOM (untrained, --clip-weights random): these CAMs are meaningless; "
            "use them only to smoke-test the pipeline"
        )
    run_folder = RunFolder.open(
        out,
        stage=STAGE,
        item_dir=ITEM_DIR,
        item_suffix=ITEM_SUFFIX,
        config=config,
        result_config=clip.result_config,
        upstream={"cmpa": clip.cmpa_fp} if clip.cmpa_fp else {},
        inputs={"dataset": dataset.describe(), "clip": clip.description},
        ids=ids,
        shard=shard,
        overwrite=overwrite,
        notices=notices,
        check_item=seed_readable,
    )
    for notice in notices:
        warn(notice)
    return run_folder


def _write_batch(
    run_folder: RunFolder,
    dataset: Dataset,
    cfg: SeedsConfig,
    clip: SeedsModel,
    plan: SizePlan,
    batch: list[str],
    images: list[np.ndarray],
    cams: Sequence[torch.Tensor],
    attn: torch.Tensor | None,
    pending: set[str],
    bar: ProgressBar,
) -> None:
    """Save the seeds of a batch's pending images (with the original image size)."""
    for k, (item_id, image, cam) in enumerate(zip(batch, images, cams, strict=True)):
        if item_id not in pending:
            continue
        labels = dataset.get(item_id).labels
        item_attn = None if attn is None else attn[k].numpy()

        def write(
            path: Path,
            cam: torch.Tensor = cam,
            labels: Any = labels,
            hw: Any = plan.downscaled.get(item_id, image.shape[:2]),  # the original size
            item_attn: np.ndarray | None = item_attn,
        ) -> None:
            save_seed(
                path,
                cam.float().cpu().numpy(),
                labels,
                hw,
                cfg.scales,
                cfg.flip,
                attn=item_attn,
                attn_blocks=clip.attn_indices,
            )

        run_folder.write_item(item_id, write)
        bar.update(1)


def run(
    dataset: Dataset, out: str | Path, cfg: SeedsConfig, *, shard: Shard, overwrite: bool
) -> dict[str, Any]:
    """Compute CAM seeds for ``dataset`` into the run folder ``out``; returns the manifest."""
    from ssr_cli.cam.prompts import cached_text_embeddings
    from ssr_cli.runtime import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if cfg.save_attn and cfg.attn_blocks < 1:
        raise DataError("--attn-blocks must be at least 1")
    plan, ids = plan_dataset(dataset, cfg.max_side, cfg.oversize, stage="make-seeds")
    clip = load_seeds_model(cfg, device, precision, plan)
    model, heads = clip.model, clip.heads
    config = {**asdict(cfg), "precision_resolved": precision, "device_resolved": str(device)}
    run_folder = _open_run_folder(out, dataset, cfg, clip, config, ids, shard=shard, overwrite=overwrite)
    fg, bg = cached_text_embeddings(
        model, dataset.vocab, run_folder.extra_path("text_embeddings.safetensors")
    )
    if heads is not None:
        fg, bg = heads.project_text(fg), heads.project_text(bg)

    mine = shard.select(ids)
    pending = set(run_folder.pending(ids))
    info(
        f"make-seeds: {len(mine)} images in shard {shard}, {len(mine) - len(pending)} already done, "
        f"precision {precision} on {device}"
    )
    sizes = {i: model.resized_size(*working_hw(dataset, i, plan)) for i in mine}
    batches = [b for b in _batches(mine, sizes, cfg.batch_size) if any(i in pending for i in b)]
    loop_started = time.perf_counter()
    with ProgressBar("make-seeds", total=len(pending)) as bar:
        for batch, images in _prefetch(dataset, batches, cfg.workers, plan):
            present = [[c - 1 for c in dataset.get(i).labels] for i in batch]
            cams, attn = cams_and_attention(
                model,
                images,
                present,
                fg,
                bg,
                scales=cfg.scales,
                flip=cfg.flip,
                precision=precision,
                image_head=None if heads is None else heads.project_image,
                text_head=None,
                attn_blocks=cfg.attn_blocks if cfg.save_attn else None,
                target=clip.cam_target,
            )
            _write_batch(run_folder, dataset, cfg, clip, plan, batch, images, cams, attn, pending, bar)
    manifest = run_folder.finish(ids, loop_seconds=time.perf_counter() - loop_started)
    return manifest
