"""``ssr train-cmpa``: cross-modal prototype alignment heads (ISA/TSA) for CAMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import (
    BatchSize,
    CheckSyncEvery,
    ClipArch,
    ClipWeights,
    CmpaDim,
    CmpaHidden,
    DataRoot,
    Device,
    Flip,
    HeadInit,
    HeadsLr,
    HeadsWeightDecay,
    InitImages,
    Iters,
    Jitter,
    LabelSource,
    Layout,
    LogEvery,
    Overwrite,
    Pool,
    Precision,
    ProtoEma,
    ProtoEvery,
    ProtosPerClass,
    Quiet,
    Resume,
    SaveEvery,
    ScaleRange,
    Seed,
    Split,
    Temperature,
    Tensorboard,
    TextTarget,
    TrainSize,
    Vocab,
    Workers,
    parse_range,
)
from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.console import set_quiet

_C = CmpaConfig  # every default of this command lives there


@app.command("train-cmpa")
def train_cmpa(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")],
    data: DataRoot,
    layout: Layout = "auto",
    split: Split = None,
    labels: LabelSource = "auto",
    vocab: Vocab = None,
    clip_arch: ClipArch = "ViT-B-16",
    clip_weights: ClipWeights = None,
    dim: CmpaDim = _C.dim,
    hidden: CmpaHidden = None,
    head_init: HeadInit = _C.head_init,
    init_images: InitImages = _C.init_images,
    protos_per_class: ProtosPerClass = _C.protos_per_class,
    proto_every: ProtoEvery = _C.proto_every,
    proto_ema: ProtoEma = _C.proto_ema,
    pool: Pool = _C.pool,
    text_target: TextTarget = _C.text_target,
    temperature: Temperature = _C.temperature,
    iters: Iters = _C.iters,
    batch_size: BatchSize = _C.batch_size,
    lr: HeadsLr = _C.lr,
    weight_decay: HeadsWeightDecay = _C.weight_decay,
    size: TrainSize = _C.size,
    scale_range: ScaleRange = ",".join(f"{v:g}" for v in _C.scale_range),
    flip: Flip = _C.flip,
    jitter: Jitter = _C.jitter,
    cam_source: Annotated[
        str,
        typer.Option(
            "--cam-source", help="CAMs that weight the features: heads (current heads) | clip (plain CLIP)."
        ),
    ] = _C.cam_source,
    precision: Precision = "auto",
    save_every: SaveEvery = _C.save_every,
    log_every: LogEvery = _C.log_every,
    tensorboard: Tensorboard = _C.tensorboard,
    check_sync_every: CheckSyncEvery = _C.check_sync_every,
    resume: Resume = False,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train CMPA heads (ISA/TSA projections + prototypes) so CAMs come from a rectified space.

    Example:

    \b
        ssr train-cmpa --data VOC2012 --split train_aug --out runs/cmpa
        ssr make-seeds --data VOC2012 --split train --cmpa runs/cmpa --out runs/seeds

    Several processes: torchrun --nproc-per-node 4 -m ssr_cli train-cmpa ... (DistributedDataParallel;
    --batch-size is per process). Writes heads.safetensors, prototypes.safetensors, log.jsonl and
    checkpoints/last.pt.
    """
    options = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in locals().items()
        if k not in ("out", "resume", "overwrite", "quiet")
    }
    set_quiet(quiet)

    from ssr_cli.artefacts.quick import answered_training_rerun, finish_training_command, quick_key
    from ssr_cli.cli.options import check_device
    from ssr_cli.data import open_dataset

    # Before torch is imported: a complete run with the same inputs answers at once, and
    # missing weights fail at once.
    dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab)
    key = None
    config_file = Path(clip_arch) if Path(clip_arch).suffix == ".json" else None
    if config_file is None or clip_weights is not None:  # a config file's model is named inside it
        from ssr_cli.models.sources import clip_weights_source

        weights_file = clip_weights_source(clip_arch, clip_weights).path
        key = quick_key(
            "cmpa",
            options,
            dataset_fingerprint=dataset.fingerprint(),
            files=[weights_file, config_file],
            env=["SSR_CLIP_WEIGHTS", "WORLD_SIZE"],
        )
        if answered_training_rerun("train-cmpa", out, key, overwrite, _result_line, "these trained heads"):
            return
    from ssr_cli.stages import train_cmpa as stage

    train = {
        "iters": iters,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "dim": dim,
        "hidden": hidden or dim,
        "head_init": head_init,
        "init_images": init_images,
        "protos_per_class": protos_per_class,
        "proto_every": proto_every,
        "proto_ema": proto_ema,
        "temperature": temperature,
        "size": size,
        "scale_range": parse_range(scale_range, "--scale-range"),
        "flip": flip,
        "jitter": jitter,
        "cam_source": cam_source,
        "pool": pool,
        "text_target": text_target,
        "precision": precision,
        "seed": seed,
        "workers": workers,
        "save_every": save_every,
        "log_every": log_every,
        "check_sync_every": check_sync_every,
        "tensorboard": tensorboard,
    }
    opts = stage.CmpaOptions(
        data=data,
        out=out,
        layout=layout,
        split=split,
        labels=labels,
        vocab=vocab,
        arch=clip_arch,
        weights=clip_weights,
        device=check_device(device),
        resume=resume,
        overwrite=overwrite,
        train=train,
    )
    manifest = stage.run(opts)
    finish_training_command(out, key, manifest, _result_line)


def _result_line(out: Path, manifest: dict) -> str:
    """The line train-cmpa prints on stdout: the heads file, the final loss and temperature."""
    final = (manifest.get("summary") or {}).get("final") or {}
    text = str(out / manifest.get("heads_file", "heads.safetensors"))
    if final.get("loss") is not None:
        text += f"  loss {final['loss']:.4f}  temperature {final['temperature']:.4f}"
    return text
