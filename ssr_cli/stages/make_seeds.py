"""Stage ``make-seeds``: CLIP GradCAM seeds, one ``cams/<id>.npz`` per image.

Each item file holds (numpy ``.npz``):

- ``cams``      float32 [C, h, w] (float16 in files of earlier versions): min-max normalised
                CAMs of the C present classes at patch resolution of the scale-1.0 input
                (h = H'/16, w = W'/16)
- ``class_ids`` int16 [C]: foreground class ids (1..K) in the order of ``cams``
- ``image_hw``  int32 [2]: original image height, width
- ``scales``    float32 [S]; ``flip`` bool
- ``attn``      float16 [hw, hw] (only with ``save_attn``): CLIP's patch-to-patch attention of
                the scale-1.0 un-flipped input (hw = h*w, CLS dropped), averaged over heads
                and the last ``attn_blocks`` blocks, rows not renormalised
                (``ClipModel.attention``); computed in the CAMs' forward, read by ``refine``
                so that it needs no CLIP forward (~1.2 MB per VOC image)
- ``attn_blocks`` int16 [k]: the block indices averaged into ``attn``

Imports torch: only import inside command bodies.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.artefacts import RunFolder, Shard
from ssr_cli.console import ProgressBar, info, warn
from ssr_cli.data import Dataset, read_image
from ssr_cli.data.size_limit import (
    DEFAULT_MAX_SIDE,
    SizeLimit,
    SizePlan,
    image_size,
    plan_sizes,
    read_downscaled,
)
from ssr_cli.errors import ArtefactError, DataError

STAGE = "seeds"
ITEM_DIR = "cams"
ITEM_SUFFIX = ".npz"
CAM_VERSION = "gradcam-clip-es-2"  # bump when the CAM computation changes results


@dataclass
class SeedsConfig:
    arch: str = "ViT-B-16"
    weights: str | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str = "auto"
    batch_size: int = 1
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    cmpa: str | None = None
    save_attn: bool = True
    attn_blocks: int = 8  # CLIP-ES: the last 8 blocks
    max_side: int = DEFAULT_MAX_SIDE  # longer image side; larger images: see oversize
    oversize: str = "error"  # error | skip | downscale (ssr_cli.data.size_limit)
    cam_target: str = "auto"  # prob | logodds | auto (ssr_cli.cam.gradcam.CAM_TARGETS)
    extra: dict[str, Any] = field(default_factory=dict)


def save_seed(
    path: Path,
    cams: np.ndarray,
    class_ids: Sequence[int],
    image_hw: tuple[int, int],
    scales: Sequence[float],
    flip: bool,
    attn: np.ndarray | None = None,
    attn_blocks: Sequence[int] = (),
) -> None:
    """Write one seeds item (see the module docstring); ``attn`` [hw, hw] is optional."""
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {
        "cams": cams.astype(np.float32),  # float16 moved CAA's box threshold (issue 13)
        "class_ids": np.asarray(class_ids, dtype=np.int16),
        "image_hw": np.asarray(image_hw, dtype=np.int32),
        "scales": np.asarray(scales, dtype=np.float32),
        "flip": np.asarray(flip),
    }
    if attn is not None:
        arrays["attn"] = attn.astype(np.float16)
        arrays["attn_blocks"] = np.asarray(attn_blocks, dtype=np.int16)
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # (numpy stubs: allow_pickle is a keyword too)
    path.write_bytes(buf.getvalue())


def load_seed(path: str | Path, *, with_attn: bool = True) -> dict[str, np.ndarray]:
    """Read one seeds item; a damaged file is a one-line error naming it.

    Keys ``cams``, ``class_ids``, ``image_hw``, ``scales``, ``flip``; also ``attn`` and
    ``attn_blocks`` when the file holds them and ``with_attn`` (seeds made without
    ``--save-attn``, and refined CAMs, have none).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in ("cams", "class_ids", "image_hw", "scales", "flip")}
            if with_attn and "attn" in data.files:
                out["attn"], out["attn_blocks"] = data["attn"], data["attn_blocks"]
    except FileNotFoundError:
        raise ArtefactError(
            "seed file is missing", path=path, hint="rerun make-seeds into that folder"
        ) from None
    except Exception as exc:  # zipfile/BadZip/ValueError/KeyError
        raise ArtefactError(
            f"unreadable seed file ({type(exc).__name__})",
            path=path,
            hint="delete it and rerun make-seeds into the same folder to recompute it",
        ) from None
    problem = seed_problem(out)
    if problem:
        raise ArtefactError(
            f"malformed seed file: {problem}",
            path=path,
            hint="delete it and rerun make-seeds into the same folder to recompute it",
        )
    return out


def seed_problem(seed: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a loaded seed (shapes, types, values), or None."""
    cams, class_ids, hw = seed["cams"], seed["class_ids"], seed["image_hw"]
    if cams.ndim != 3 or cams.dtype.kind != "f":
        return f"cams must be a float array [C, h, w], not {cams.dtype} {list(cams.shape)}"
    if class_ids.ndim != 1 or class_ids.dtype.kind not in "iu" or len(class_ids) != cams.shape[0]:
        found = f"{class_ids.dtype} {list(class_ids.shape)}"
        return f"class_ids must be {cams.shape[0]} integers (one per CAM), not {found}"
    if len(class_ids) and (class_ids.min() < 1 or class_ids.max() > 254):
        return "class_ids must be in 1..254"
    if hw.shape != (2,) or hw.dtype.kind not in "iu" or hw.min() < 1:
        return f"image_hw must be two positive integers, not {hw.tolist()}"
    if cams.size and not np.isfinite(cams).all():
        return "cams hold NaN or infinite values"
    return None


def _seed_readable(path: Path) -> bool:
    """``check_item`` of seeds runs: the file loads and is well formed (attention not read)."""
    try:
        load_seed(path, with_attn=False)
    except ArtefactError:
        return False
    return True


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


def register_arch(arch: str) -> str:
    """``arch`` is an open_clip model name, or a model-config JSON file (registered, then
    used by its file stem), e.g. a custom or tiny test architecture."""
    if not arch.endswith(".json"):
        return arch
    import open_clip

    path = Path(arch)
    if not path.is_file():
        raise DataError(
            "CLIP architecture config file not found",
            path=path,
            hint="pass an open_clip model name or an existing config JSON",
        )
    try:
        open_clip.add_model_config(path)
    except Exception as exc:
        raise DataError(
            f"unreadable CLIP architecture config ({type(exc).__name__})",
            path=path,
            hint="it must be an open_clip model config JSON",
        ) from None
    return path.stem


def _read(dataset: Dataset, item_id: str, plan: SizePlan | None) -> np.ndarray:
    """The image, downscaled when ``plan`` says so."""
    target = None if plan is None else plan.target_hw(item_id)
    path = dataset.get(item_id).image
    return read_image(path) if target is None else read_downscaled(path, target)


def _prefetch(
    dataset: Dataset, batches: list[list[str]], workers: int, plan: SizePlan | None = None
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Decode the images of upcoming batches in a thread pool (bounded look-ahead)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures: list = []
        ahead = max(2, workers * 2)
        it = iter(batches)

        def submit() -> None:
            batch = next(it, None)
            if batch is not None:
                futures.append((batch, [pool.submit(_read, dataset, i, plan) for i in batch]))

        for _ in range(ahead):
            submit()
        while futures:
            batch, fs = futures.pop(0)
            submit()
            yield batch, [f.result() for f in fs]


def cams_for_batch(
    model: Any,
    images: Sequence[np.ndarray],
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    precision: str = "fp32",
    image_head: Any = None,
    text_head: Any = None,
    target: str | None = None,
) -> list[torch.Tensor]:
    """CAMs [C_i, h, w] for images of one network size (h, w: the scale-1.0 patch grid).

    One GradCAM call per (scale, flip) variant covers every image and class of the
    batch. With one scale and no flip the CAMs are GradCAM's as they are (CLIP-ES);
    otherwise they are merged by ``merge_scales`` (resize to the scale-1.0 grid, sum,
    min-max normalise).
    """
    cams, _ = cams_and_attention(
        model,
        images,
        present,
        fg,
        bg,
        scales=scales,
        flip=flip,
        precision=precision,
        image_head=image_head,
        text_head=text_head,
        target=target,
    )
    return cams


def cams_and_attention(
    model: Any,
    images: Sequence[np.ndarray],
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    precision: str = "fp32",
    image_head: Any = None,
    text_head: Any = None,
    attn_blocks: int | None = None,
    target: str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``cams_for_batch``'s CAMs and, with ``attn_blocks`` (n = the last n blocks), CLIP's
    attention [N, h*w, h*w] float32 (CPU) of the scale-1.0 un-flipped input (``ClipModel.attention``).

    The attention comes from the same forward as the scale-1.0 un-flipped CAMs
    (``ImageTokens`` passed to GradCAM), which it does not change: the trunk's tokens
    are the same with or without it. Without a scale 1.0 it costs a forward of its own.
    """
    from ssr_cli.cam.gradcam import gradcam, merge_scales

    p = model.patch_size
    h0, w0 = model.resized_size(*images[0].shape[:2], 1.0)
    grid = (h0 // p, w0 // p)
    variants: list[list[tuple[torch.Tensor, bool]]] = [[] for _ in images]
    attn: torch.Tensor | None = None
    for scale in scales:
        x = torch.stack([model.preprocess(im, scale) for im in images]).to(model.device)
        for flipped in (False, True) if flip else (False,):
            source: Any = x.flip(-1) if flipped else x
            if attn_blocks is not None and attn is None and scale == 1.0 and not flipped:
                source = model.image_tokens(
                    x, grad_last_block=False, attn_blocks=attn_blocks, precision=precision
                )
                attn = source.attn.float().cpu()
            cams = gradcam(
                model,
                source,
                present,
                fg,
                bg,
                image_head=image_head,
                text_head=text_head,
                precision=precision,
                target=target,
            )
            for i, cam in enumerate(cams):
                variants[i].append((cam, flipped))
    if attn_blocks is not None and attn is None:  # no scale 1.0: a forward of its own
        x = torch.stack([model.preprocess(im, 1.0) for im in images]).to(model.device)
        attn = model.attention(x, blocks=attn_blocks, precision=precision).cpu()
    out = []
    for parts in variants:
        if len(parts) == 1 and tuple(parts[0][0].shape[-2:]) == grid:
            out.append(parts[0][0])
        elif parts[0][0].shape[0] == 0:
            out.append(torch.zeros(0, *grid))
        else:
            out.append(merge_scales([c for c, _ in parts], grid, [f for _, f in parts]))
    return out, attn


def run(
    dataset: Dataset, out: str | Path, cfg: SeedsConfig, *, shard: Shard, overwrite: bool
) -> dict[str, Any]:
    """Compute CAM seeds for ``dataset`` into the run folder ``out``; returns the manifest."""
    from ssr_cli.cam.prompts import cached_text_embeddings
    from ssr_cli.models.clip import load_clip
    from ssr_cli.runtime import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if cfg.save_attn and cfg.attn_blocks < 1:
        raise DataError("--attn-blocks must be at least 1")
    paths = [dataset.get(i).image for i in dataset.ids]
    plan = plan_sizes(dataset.ids, paths, SizeLimit(cfg.max_side, cfg.oversize), stage="make-seeds")
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
    from ssr_cli.cam.gradcam import resolve_target

    cam_target = resolve_target(cfg.cam_target, heads)
    if cam_target != "prob":  # CLIP-ES's target keeps the fingerprints of earlier runs
        result_config["cam_target"] = cam_target
    attn_indices: list[int] = []
    if cfg.save_attn:
        depth = len(model.blocks)  # the last n blocks, as ClipModel.attention(x, blocks=n)
        attn_indices = list(range(max(0, depth - cfg.attn_blocks), depth))
        result_config["attn_blocks"] = cfg.attn_blocks
    notices = []
    if model.is_random:
        notices.append(
            "CLIP weights are RANDOM (untrained, --clip-weights random): these CAMs are meaningless; "
            "use them only to smoke-test the pipeline"
        )
    config = {**asdict(cfg), "precision_resolved": precision, "device_resolved": str(device)}
    ids = [i for i in dataset.ids if i not in plan.skipped]
    run_folder = RunFolder.open(
        out,
        stage=STAGE,
        item_dir=ITEM_DIR,
        item_suffix=ITEM_SUFFIX,
        config=config,
        result_config=result_config,
        upstream={"cmpa": cmpa_fp} if cmpa_fp else {},
        inputs={"dataset": dataset.describe(), "clip": clip_desc},
        ids=ids,
        shard=shard,
        overwrite=overwrite,
        notices=notices,
        check_item=_seed_readable,
    )
    for notice in notices:
        warn(notice)
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
    sizes = {i: model.resized_size(*(plan.target_hw(i) or image_size(dataset.get(i).image))) for i in mine}
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
                target=cam_target,
            )
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
                        attn_blocks=attn_indices,
                    )

                run_folder.write_item(item_id, write)
                bar.update(1)
    manifest = run_folder.finish(ids, loop_seconds=time.perf_counter() - loop_started)
    return manifest
