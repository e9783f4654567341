"""``ssr train-cmpa``: cross-modal prototype alignment heads (ISA/TSA) for CAMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssr_cli.cli import app
from ssr_cli.cli import options as opt
from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.console import set_quiet

_C = CmpaConfig  # every default of this command lives there


@app.command("train-cmpa")
def train_cmpa(
    out: opt.RunOut,
    data: opt.DataRoot,
    layout: opt.Layout = "auto",
    split: opt.Split = None,
    labels: opt.LabelSource = "auto",
    vocab: opt.Vocab = None,
    clip_arch: opt.ClipArch = "ViT-B-16",
    clip_weights: opt.ClipWeights = None,
    dim: opt.CmpaDim = _C.dim,
    hidden: opt.CmpaHidden = None,
    head_init: opt.HeadInit = _C.head_init,
    init_images: opt.InitImages = _C.init_images,
    protos_per_class: opt.ProtosPerClass = _C.protos_per_class,
    proto_every: opt.ProtoEvery = _C.proto_every,
    proto_ema: opt.ProtoEma = _C.proto_ema,
    pool: opt.Pool = _C.pool,
    text_target: opt.TextTarget = _C.text_target,
    temperature: opt.Temperature = _C.temperature,
    iters: opt.Iters = _C.iters,
    batch_size: opt.BatchSize = _C.batch_size,
    lr: opt.HeadsLr = _C.lr,
    weight_decay: opt.HeadsWeightDecay = _C.weight_decay,
    size: opt.TrainSize = _C.size,
    scale_range: opt.ScaleRange = ",".join(f"{v:g}" for v in _C.scale_range),
    flip: opt.Flip = _C.flip,
    jitter: opt.Jitter = _C.jitter,
    cam_source: Annotated[
        str,
        typer.Option(
            "--cam-source", help="CAMs that weight the features: heads (current heads) | clip (plain CLIP)."
        ),
    ] = _C.cam_source,
    precision: opt.Precision = "auto",
    save_every: opt.SaveEvery = _C.save_every,
    log_every: opt.LogEvery = _C.log_every,
    tensorboard: opt.Tensorboard = _C.tensorboard,
    check_sync_every: opt.CheckSyncEvery = _C.check_sync_every,
    resume: opt.Resume = False,
    device: opt.Device = "auto",
    workers: opt.Workers = 2,
    seed: opt.Seed = 0,
    overwrite: opt.Overwrite = False,
    quiet: opt.Quiet = False,
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
    values = dict(locals())
    set_quiet(quiet)

    from ssr_cli.artefacts.quick import answered_training_rerun, quick_key
    from ssr_cli.cli.training import option_fields, run_stage
    from ssr_cli.data import open_dataset

    # Before torch is imported: a complete run with the same inputs answers at once, and
    # missing weights fail at once.
    dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab)
    key = None
    files = opt.clip_files(clip_arch, clip_weights)
    if files is not None:
        key = quick_key(
            "cmpa",
            opt.quick_settings(values),
            dataset_fingerprint=dataset.fingerprint(),
            files=files,
            env=["SSR_CLIP_WEIGHTS", "WORLD_SIZE"],
        )
        if answered_training_rerun("train-cmpa", out, key, overwrite, _result_line, "these trained heads"):
            return
    from ssr_cli.stages import train_cmpa as stage

    train = option_fields(
        values, CmpaConfig, hidden=hidden or dim, scale_range=opt.parse_range(scale_range, "--scale-range")
    )
    given = {"arch": clip_arch, "weights": clip_weights, "device": opt.check_device(device), "train": train}
    run_stage(stage, stage.CmpaOptions, values, key, _result_line, **given)


def _result_line(out: Path, manifest: dict) -> str:
    """The line train-cmpa prints on stdout: the heads file, the final loss and temperature."""
    from ssr_cli.cli.training import run_summary

    final, _ = run_summary(manifest)
    text = str(out / manifest.get("heads_file", "heads.safetensors"))
    if final.get("loss") is not None:
        text += f"  loss {final['loss']:.4f}  temperature {final['temperature']:.4f}"
    return text
