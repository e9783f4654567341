"""``ssr train``: single-stage SSR (CMPA heads + a segmentation decoder on online pseudo-masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli import options as opt
from ssr_cli.cli.refine_settings import parse_weights
from ssr_cli.console import set_quiet
from ssr_cli.models.attention import parse_blocks
from ssr_cli.onestage.config import SsrConfig
from ssr_cli.refine.config import AFFINITY_WEIGHTS, SGCParams

_SGC = SGCParams()


_S = SsrConfig  # every default of this command lives there


def _layers(text: str) -> tuple[int, ...]:
    """``--decoder-layers "3,7,11"`` -> (3, 7, 11): the CLIP blocks the decoder reads."""
    from ssr_cli.errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"--decoder-layers {text!r} is not a list of comma-separated numbers")
    return values


@app.command("train")
def train(
    out: opt.RunOut,
    data: opt.DataRoot,
    layout: opt.Layout = "auto",
    split: opt.Split = None,
    labels: opt.LabelSource = "auto",
    vocab: opt.Vocab = None,
    val_split: opt.ValSplit = None,
    val_every: opt.ValEvery = _S.val_every,
    clip_arch: opt.ClipArch = "ViT-B-16",
    clip_weights: opt.ClipWeights = None,
    dino_model: Annotated[
        str, typer.Option("--dino-model", help="DINO for the affinity: a name, or a JSON model spec.")
    ] = "dino_vitb16",
    dino_weights: Annotated[
        Optional[str], typer.Option("--dino-weights", help="DINO weights file; 'random' for a smoke test.")
    ] = None,
    gamma: Annotated[
        float,
        typer.Option("--gamma", min=0.0, help="Weight of the segmentation loss: L_proto + gamma L_seg."),
    ] = _S.gamma,
    iters: opt.Iters = _S.iters,
    batch_size: opt.BatchSize = _S.batch_size,
    size: opt.TrainSize = _S.size,
    scale_range: opt.ScaleRange = "0.75,1.25",
    flip: opt.Flip = _S.flip,
    jitter: opt.Jitter = _S.jitter,
    lr: opt.HeadsLr = _S.lr,
    weight_decay: opt.HeadsWeightDecay = _S.weight_decay,
    dim: opt.CmpaDim = _S.dim,
    hidden: opt.CmpaHidden = None,
    head_init: opt.HeadInit = _S.head_init,
    init_images: opt.InitImages = _S.init_images,
    protos_per_class: opt.ProtosPerClass = _S.protos_per_class,
    proto_every: opt.ProtoEvery = _S.proto_every,
    proto_ema: opt.ProtoEma = _S.proto_ema,
    temperature: opt.Temperature = _S.temperature,
    pool: opt.Pool = _S.pool,
    text_target: opt.TextTarget = _S.text_target,
    cam_target: Annotated[
        str,
        typer.Option(
            "--cam-target", help="GradCAM target: auto (log-odds in CMPA's space) | prob | logodds."
        ),
    ] = _S.cam_target,
    seg_loss: Annotated[
        str, typer.Option("--seg-loss", help="balanced (mean of background and foreground CE) | ce.")
    ] = _S.seg_loss,
    decoder_dim: Annotated[
        int, typer.Option("--decoder-dim", min=8, help="Decoder channels.")
    ] = _S.decoder_dim,
    decoder_layers: Annotated[
        Optional[str],
        typer.Option(
            "--decoder-layers", help="CLIP blocks the decoder reads, e.g. -4,-3,-2,-1 (default: all)."
        ),
    ] = None,
    decoder_convs: Annotated[
        int, typer.Option("--decoder-convs", min=0, help="3x3 convolutions after the fusion.")
    ] = _S.decoder_convs,
    seg_lr: Annotated[
        float, typer.Option("--seg-lr", min=0.0, help="AdamW learning rate of the decoder.")
    ] = _S.seg_lr,
    seg_weight_decay: Annotated[
        float, typer.Option("--seg-weight-decay", min=0.0, help="AdamW weight decay of the decoder.")
    ] = _S.seg_weight_decay,
    poly_power: Annotated[
        float, typer.Option("--poly-power", min=0.0, help="Poly decay of the decoder's learning rate.")
    ] = _S.poly_power,
    affinity: Annotated[
        str, typer.Option("--affinity", help="Online affinity: clip+dino | clip | none.")
    ] = _S.affinity,
    affinity_weights: Annotated[
        str, typer.Option("--affinity-weights", help="CLIP,DINO fusion weights (paper: 0.4,0.6).")
    ] = ",".join(f"{w:g}" for w in AFFINITY_WEIGHTS),
    clip_blocks: Annotated[
        int, typer.Option("--clip-blocks", min=1, help="CLIP attention: the last N blocks.")
    ] = _S.clip_blocks,
    dino_blocks: Annotated[
        str,
        typer.Option(
            "--dino-blocks",
            help="DINO attention blocks, averaged: N = the last N, or block indices (default -1: the last).",
        ),
    ] = "-1",
    mask: Annotated[
        str, typer.Option("--mask", help="Column mask of the affinity: sgc | box (CLIP-ES) | none.")
    ] = _S.mask,
    sgc_clusters: Annotated[
        int, typer.Option("--sgc-clusters", min=1, help="SGC: colour clusters of the superpixels.")
    ] = _SGC.n_clusters,
    sgc_region_size: Annotated[
        int, typer.Option("--sgc-region-size", min=2, help="SGC: SLIC superpixel size in pixels.")
    ] = _SGC.region_size,
    sgc_region_thresh: Annotated[
        float, typer.Option("--sgc-region-thresh", min=0.0, max=1.0, help="SGC: target-region share.")
    ] = _SGC.region_thresh,
    bg_alpha: Annotated[
        float, typer.Option("--bg-alpha", min=0.0, help="Background score (1 - max CAM) ** ALPHA.")
    ] = _S.bg_alpha,
    conf_thresh: Annotated[
        float,
        typer.Option(
            "--conf-thresh",
            min=0.0,
            max=1.0,
            help="Pseudo-mask pixels whose top normalised score is below this are ignored (0: none).",
        ),
    ] = _S.conf_thresh,
    precision: opt.Precision = "auto",
    save_every: opt.SaveEvery = _S.save_every,
    log_every: opt.LogEvery = _S.log_every,
    tensorboard: opt.Tensorboard = _S.tensorboard,
    check_sync_every: opt.CheckSyncEvery = _S.check_sync_every,
    resume: opt.Resume = False,
    device: opt.Device = "auto",
    workers: opt.Workers = _S.workers,
    seed: opt.Seed = _S.seed,
    overwrite: opt.Overwrite = False,
    quiet: opt.Quiet = False,
) -> None:
    """Single-stage SSR, the paper's regime: CMPA heads and a segmentation decoder trained together
    (L_proto + gamma L_seg) on pseudo-masks made online from the heads' CAMs.

    Example:

    \b
        ssr train --data VOC2012 --split train_aug --val-split val --out runs/ssr
        ssr predict --model runs/ssr --data VOC2012 --split val --scales 0.75,1.0,1.25 --flip --out runs/pred
        ssr eval runs/pred --data VOC2012 --split val

    Several processes: torchrun --nproc-per-node 4 -m ssr_cli train ... (--batch-size is per
    process). Writes model.safetensors (the decoder), heads.safetensors, prototypes.safetensors,
    log.jsonl and checkpoints/last.pt (best.pt with --val-split).
    """
    values = dict(locals())
    set_quiet(quiet)

    from ssr_cli.artefacts.quick import answered_training_rerun, quick_key
    from ssr_cli.cli.training import option_fields, run_stage
    from ssr_cli.data import open_dataset

    # Before torch is imported: a complete run with the same inputs answers at once.
    dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab)
    key = None
    dino_file = Path(dino_model) if Path(dino_model).suffix == ".json" else None
    dino_found = affinity != "clip+dino" or dino_weights  # else only loading finds DINO's weights
    files = opt.clip_files(clip_arch, clip_weights) if dino_found else None
    if files is not None:
        val_fp = None
        if val_split:
            val_fp = open_dataset(
                data, layout=layout, split=val_split, labels="none", vocab=vocab
            ).fingerprint()
        key = quick_key(
            "train",
            {**opt.quick_settings(values), "val_fingerprint": val_fp},
            dataset_fingerprint=dataset.fingerprint(),
            files=[
                *files,
                dino_file,
                Path(dino_weights) if dino_weights and dino_weights != "random" else None,
            ],
            env=["SSR_CLIP_WEIGHTS", "SSR_DINO_WEIGHTS", "WORLD_SIZE"],
        )
        if answered_training_rerun("train", out, key, overwrite, _result_line, "this trained model"):
            return
    from ssr_cli.stages import train_ssr as stage

    sgc = {
        **SGCParams().__dict__,
        "n_clusters": sgc_clusters,
        "region_size": sgc_region_size,
        "region_thresh": sgc_region_thresh,
        "seed": seed,
    }
    cfg = option_fields(
        values,
        SsrConfig,
        scale_range=opt.parse_range(scale_range, "--scale-range"),
        hidden=hidden or dim,
        decoder_layers=_layers(decoder_layers) if decoder_layers else (),
        affinity_weights=parse_weights(affinity_weights),
        dino_blocks=parse_blocks(dino_blocks, "--dino-blocks"),
        sgc=sgc,
    )
    given = {"arch": clip_arch, "weights": clip_weights, "device": opt.check_device(device), "train": cfg}
    run_stage(stage, stage.TrainOptions, values, key, _result_line, **given)


def _result_line(out: Path, manifest: dict) -> str:
    """The line ``ssr train`` prints on stdout: the model file, the final loss, the best val mIoU."""
    from ssr_cli.cli.training import run_summary

    final, best = run_summary(manifest)
    text = str(out / manifest.get("model_file", "model.safetensors"))
    if final.get("loss") is not None:
        text += f"  loss {final['loss']:.4f}"
    if best.get("miou") is not None:
        text += f"  best val mIoU {100 * best['miou']:.2f} %"
    return text
