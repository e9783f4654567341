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
from ssr_cli.refine.config import AFFINITY_WEIGHTS, SGCParams

_SGC = SGCParams()


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
    val_every: opt.ValEvery = 1000,
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
    ] = 0.1,
    iters: opt.Iters = 20000,
    batch_size: opt.BatchSize = 4,
    size: opt.TrainSize = 448,
    scale_range: opt.ScaleRange = "0.75,1.25",
    flip: opt.Flip = True,
    jitter: opt.Jitter = 0.2,
    lr: opt.HeadsLr = 1e-4,
    weight_decay: opt.HeadsWeightDecay = 1e-4,
    dim: opt.CmpaDim = 256,
    hidden: opt.CmpaHidden = None,
    head_init: opt.HeadInit = "pca",
    init_images: opt.InitImages = 256,
    protos_per_class: opt.ProtosPerClass = 1,
    proto_every: opt.ProtoEvery = 5000,
    proto_ema: opt.ProtoEma = 0.0,
    temperature: opt.Temperature = 0.05,
    pool: opt.Pool = "tokens",
    text_target: opt.TextTarget = "live",
    cam_target: Annotated[
        str,
        typer.Option(
            "--cam-target", help="GradCAM target: auto (log-odds in CMPA's space) | prob | logodds."
        ),
    ] = "auto",
    seg_loss: Annotated[
        str, typer.Option("--seg-loss", help="balanced (mean of background and foreground CE) | ce.")
    ] = "balanced",
    decoder_dim: Annotated[int, typer.Option("--decoder-dim", min=8, help="Decoder channels.")] = 256,
    decoder_layers: Annotated[
        Optional[str],
        typer.Option(
            "--decoder-layers", help="CLIP blocks the decoder reads, e.g. -4,-3,-2,-1 (default: all)."
        ),
    ] = None,
    decoder_convs: Annotated[
        int, typer.Option("--decoder-convs", min=0, help="3x3 convolutions after the fusion.")
    ] = 2,
    seg_lr: Annotated[
        float, typer.Option("--seg-lr", min=0.0, help="AdamW learning rate of the decoder.")
    ] = 2e-4,
    seg_weight_decay: Annotated[
        float, typer.Option("--seg-weight-decay", min=0.0, help="AdamW weight decay of the decoder.")
    ] = 1e-2,
    poly_power: Annotated[
        float, typer.Option("--poly-power", min=0.0, help="Poly decay of the decoder's learning rate.")
    ] = 0.9,
    affinity: Annotated[
        str, typer.Option("--affinity", help="Online affinity: clip+dino | clip | none.")
    ] = "clip+dino",
    affinity_weights: Annotated[
        str, typer.Option("--affinity-weights", help="CLIP,DINO fusion weights (paper: 0.4,0.6).")
    ] = ",".join(f"{w:g}" for w in AFFINITY_WEIGHTS),
    clip_blocks: Annotated[
        int, typer.Option("--clip-blocks", min=1, help="CLIP attention: the last N blocks.")
    ] = 8,
    dino_blocks: Annotated[
        str,
        typer.Option(
            "--dino-blocks",
            help="DINO attention blocks, averaged: N = the last N, or block indices (default -1: the last).",
        ),
    ] = "-1",
    mask: Annotated[
        str, typer.Option("--mask", help="Column mask of the affinity: sgc | box (CLIP-ES) | none.")
    ] = "sgc",
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
    ] = 1.0,
    conf_thresh: Annotated[
        float,
        typer.Option(
            "--conf-thresh",
            min=0.0,
            max=1.0,
            help="Pseudo-mask pixels whose top normalised score is below this are ignored (0: none).",
        ),
    ] = 0.0,
    precision: opt.Precision = "auto",
    save_every: opt.SaveEvery = 500,
    log_every: opt.LogEvery = 10,
    tensorboard: opt.Tensorboard = False,
    check_sync_every: opt.CheckSyncEvery = 0,
    resume: opt.Resume = False,
    device: opt.Device = "auto",
    workers: opt.Workers = 2,
    seed: opt.Seed = 0,
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
    from ssr_cli.onestage.config import SsrConfig

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
