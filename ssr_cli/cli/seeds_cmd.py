"""``ssr make-seeds``: CLIP GradCAM seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.cam.config import SeedsConfig
from ssr_cli.cli import app
from ssr_cli.cli.options import (
    ClipArch,
    ClipWeights,
    DataRoot,
    Device,
    GtDir,
    LabelSource,
    Layout,
    MaxSide,
    Oversize,
    Overwrite,
    Precision,
    Quiet,
    Seed,
    ShardOpt,
    Split,
    Vocab,
    Workers,
    check_device,
    parse_scales,
)
from ssr_cli.console import set_quiet

_S = SeedsConfig  # every default of this command lives there


@app.command("make-seeds")
def make_seeds(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder to write (created; resumed if it exists).")
    ],
    data: DataRoot,
    layout: Layout = "auto",
    split: Split = None,
    labels: LabelSource = "auto",
    vocab: Vocab = None,
    gt: GtDir = None,
    clip_arch: ClipArch = _S.arch,
    clip_weights: ClipWeights = _S.weights,
    cmpa: Annotated[
        Optional[Path],
        typer.Option(
            "--cmpa", help="A train-cmpa or train run folder: CAMs in the projected space of its heads."
        ),
    ] = None,
    scales: Annotated[str, typer.Option("--scales", help="Comma-separated input scales, merged.")] = ",".join(
        f"{v:g}" for v in _S.scales
    ),
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Also use the mirrored image.")] = _S.flip,
    precision: Precision = _S.precision,
    save_attn: Annotated[
        bool,
        typer.Option(
            "--save-attn/--no-save-attn",
            help="Also store CLIP's patch attention (float16, from the same forward as the CAMs) in "
            "each cams/<id>.npz, so that refine needs no CLIP forward (it saves refine a whole "
            "CLIP forward per image): ~1.2 MB per VOC image on disk (500x375: 1.19 MB, against "
            "7 KB without; it grows with the square of the number of patches).",
        ),
    ] = _S.save_attn,
    attn_blocks: Annotated[
        int,
        typer.Option(
            "--attn-blocks", min=1, help="Stored attention: mean of the last N blocks (CLIP-ES: 8)."
        ),
    ] = _S.attn_blocks,
    cam_target: Annotated[
        str,
        typer.Option(
            "--cam-target",
            help="What GradCAM differentiates: prob (the softmax probability, CLIP-ES) | logodds "
            "(log p/(1-p): the same CAMs, but no vanishing gradient once a class wins by a wide "
            "margin) | auto (prob for plain CLIP, logodds with --cmpa).",
        ),
    ] = _S.cam_target,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per forward.")
    ] = _S.batch_size,
    max_side: MaxSide = _S.max_side,
    oversize: Oversize = _S.oversize,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    shard: ShardOpt = None,
    quiet: Quiet = False,
) -> None:
    """Compute CLIP GradCAM seeds (one cams/<id>.npz per image) for a dataset split.

    Example:

        ssr make-seeds --data VOC2012 --split train --out runs/seeds

    Interrupted runs resume when rerun with the same command; `--shard i/n` or
    torchrun split the images across processes.
    """
    set_quiet(quiet)
    from ssr_cli.artefacts import parse_shard
    from ssr_cli.artefacts.quick import finished_unchanged, nothing_to_do, quick_key
    from ssr_cli.console import info
    from ssr_cli.data import open_dataset

    # Before torch is imported: the dataset, the weights file and a complete run with the
    # same inputs answer in well under a second (missing weights: one line, at once).
    shard_ = parse_shard(shard)
    dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab, gt=gt)
    key = None
    config_file = Path(clip_arch) if Path(clip_arch).suffix == ".json" else None
    if config_file is None or clip_weights is not None:  # a config file's model is named inside it
        from ssr_cli.models.sources import clip_weights_source

        weights_file = clip_weights_source(clip_arch, clip_weights).path
        settings = {
            "arch": clip_arch,
            "weights": clip_weights,
            "cmpa": None if cmpa is None else str(cmpa),
            "scales": scales,
            "flip": flip,
            "precision": precision,
            "save_attn": save_attn,
            "attn_blocks": attn_blocks,
            "cam_target": cam_target,
            "max_side": max_side,
            "oversize": oversize,
            "device": device,
            "seed": seed,
            "batch_size": batch_size,
        }
        key = quick_key(
            "seeds",
            settings,
            dataset_fingerprint=dataset.fingerprint(),
            files=[weights_file, config_file],
            runs=[cmpa],
            env=["SSR_CLIP_WEIGHTS"],
        )
        done = None if overwrite else finished_unchanged(out, key)
        if done is not None:
            info(nothing_to_do("make-seeds", out, done, dataset.ids, shard_))
            return

    from ssr_cli.stages import make_seeds as stage

    cfg = SeedsConfig(
        arch=clip_arch,
        weights=clip_weights,
        scales=parse_scales(scales),
        flip=flip,
        precision=precision,
        batch_size=batch_size,
        device=check_device(device),
        workers=workers,
        seed=seed,
        cmpa=None if cmpa is None else str(cmpa),
        save_attn=save_attn,
        attn_blocks=attn_blocks,
        max_side=max_side,
        oversize=oversize,
        cam_target=cam_target,
    )
    manifest = stage.run(dataset, out, cfg, shard=shard_, overwrite=overwrite)
    from ssr_cli.stages.finished import report_finished

    report_finished("make-seeds", out, manifest, key)
