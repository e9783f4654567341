"""``ssr fit-seg``: train the DeepLab-style segmenter on pseudo-labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli import options as opt
from ssr_cli.console import set_quiet
from ssr_cli.seg.config import TrainConfig

_T = TrainConfig  # every fixed default of this command lives there (the recipe ones: seg/recipes.py)


@app.command("fit-seg")
def fit_seg(
    pseudo: Annotated[
        Path,
        typer.Option(
            "--pseudo",
            help="Pseudo-labels: a refine run folder, or a folder of <id>.png palette PNGs "
            "(0 background, 1..K classes, 255 ignored).",
        ),
    ],
    out: opt.RunOut,
    data: opt.DataRoot,
    layout: opt.Layout = "auto",
    split: opt.Split = None,
    vocab: opt.Vocab = None,
    gt: opt.GtDir = None,
    val_split: opt.ValSplit = None,
    backbone: Annotated[
        str,
        typer.Option("--backbone", help="timm backbone, e.g. resnet101, resnet50."),
    ] = "resnet101",
    backbone_weights: Annotated[
        Optional[str],
        typer.Option(
            "--backbone-weights",
            help="Backbone weights file (timm state dict .pth/.bin or .safetensors). Default: "
            "$SSR_BACKBONE_WEIGHTS, the local caches, then a download when online.",
        ),
    ] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random backbone weights.")] = False,
    head: Annotated[
        str,
        typer.Option(
            "--head",
            help="deeplabv3plus | aspp (DeepLabV3) | deeplabv2 (CLIP-ES's baseline). Sets the defaults "
            "of the optimizer options below (the recipe of each head, see above).",
        ),
    ] = "deeplabv3plus",
    output_stride: Annotated[
        Optional[int],
        typer.Option("--output-stride", help="8, 16 or 32. Default: 8 for deeplabv2, else 16."),
    ] = None,
    aspp_channels: Annotated[
        int, typer.Option("--aspp-channels", min=8, help="Width of the ASPP head.")
    ] = 256,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Optimizer steps.")] = _T.iters,
    batch_size: opt.BatchSize = _T.batch_size,
    crop_size: Annotated[
        int, typer.Option("--crop-size", min=16, help="Training crop side in pixels.")
    ] = _T.crop_size,
    accum: Annotated[int, typer.Option("--accum", min=1, help="Gradient accumulation steps.")] = _T.accum,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd | adamw.")] = _T.optimizer,
    lr: Annotated[
        Optional[float],
        typer.Option(
            "--lr",
            help="Backbone learning rate. Default: 1e-3 (deeplabv3plus, aspp), 2.5e-4 (deeplabv2); "
            "adamw 6e-5.",
        ),
    ] = None,
    momentum: Annotated[
        Optional[float], typer.Option("--momentum", help="SGD momentum. Default: 0.9.")
    ] = None,
    weight_decay: Annotated[
        Optional[float],
        typer.Option(
            "--weight-decay", help="Default: 1e-4 (deeplabv3plus, aspp), 5e-4 (deeplabv2); adamw 0.01."
        ),
    ] = None,
    poly_power: Annotated[
        Optional[float], typer.Option("--poly-power", help="Poly learning-rate decay power. Default: 0.9.")
    ] = None,
    head_lr_mult: Annotated[
        Optional[float],
        typer.Option("--head-lr-mult", help="Learning-rate multiplier of the head's weights. Default: 10."),
    ] = None,
    head_bias_lr_mult: Annotated[
        Optional[float],
        typer.Option(
            "--head-bias-lr-mult",
            help="Learning-rate multiplier of the head's biases. Default: --head-lr-mult, twice it "
            "for deeplabv2 (20).",
        ),
    ] = None,
    freeze_bn: Annotated[
        Optional[bool],
        typer.Option(
            "--freeze-bn/--train-bn",
            help="Frozen BatchNorm (eval mode, no gradients). Default: frozen for deeplabv2, else trained.",
        ),
    ] = None,
    bias_decay: Annotated[
        Optional[bool],
        typer.Option("--bias-decay/--no-bias-decay", help="Weight decay on biases. Default: none."),
    ] = None,
    norm_decay: Annotated[
        Optional[bool],
        typer.Option(
            "--norm-decay/--no-norm-decay", help="Weight decay on norm weights and biases. Default: none."
        ),
    ] = None,
    loss: Annotated[
        str,
        typer.Option("--loss", help="balanced (background/foreground halves) | ce."),
    ] = _T.loss,
    scale_range: Annotated[str, typer.Option("--scale-range", help="Random scale MIN,MAX.")] = "0.5,1.5",
    flip: opt.Flip = _T.flip,
    precision: opt.Precision = "auto",
    sync_bn: Annotated[
        bool,
        typer.Option("--sync-bn", help="SyncBatchNorm across torchrun processes."),
    ] = _T.sync_bn,
    save_every: opt.SaveEvery = _T.save_every,
    val_every: opt.ValEvery = _T.val_every,
    log_every: opt.LogEvery = _T.log_every,
    check_sync_every: opt.CheckSyncEvery = _T.check_sync_every,
    resume: opt.Resume = False,
    device: opt.Device = "auto",
    workers: opt.Workers = _T.workers,
    seed: opt.Seed = _T.seed,
    overwrite: opt.Overwrite = False,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write TensorBoard event files (the log.jsonl numbers) to OUT/tensorboard; needs "
            "the tensorboard package (pip install tensorboard).",
        ),
    ] = _T.tensorboard,
    quiet: opt.Quiet = False,
) -> None:
    """Train a DeepLab-style segmenter on a timm backbone (--head deeplabv3plus, the default:
    ASPP + decoder; --head aspp: DeepLabV3; --head deeplabv2: four dilated 3x3 classifiers,
    summed, CLIP-ES's baseline) on pseudo-labels.

    Each head has its reference recipe as defaults; flags you give win. deeplabv3plus and
    aspp: VainF/DeepLabV3Plus-Pytorch (SGD, lr 0.01 on the head and 0.001 on the backbone,
    momentum 0.9, weight decay 1e-4, poly 0.9, output stride 16, BatchNorm trained; no weight
    decay on norms and biases, where VainF decays all). deeplabv2: kazuto1011/deeplab-pytorch
    as CLIP-ES trains it (SGD, lr 2.5e-4 on the backbone, 10x on the head weights, 20x on the
    head biases, momentum 0.9, weight decay 5e-4 but none on biases, poly 0.9, output stride 8,
    BatchNorm frozen). All heads: batch 10, crop 321, 20,000 iterations.

    \b
    Example:
      ssr fit-seg --data VOC2012 --split train_aug --pseudo runs/refine \\
                  --val-split val --out runs/seg

    Several processes: torchrun --nproc-per-node 4 -m ssr_cli fit-seg ... (DistributedDataParallel;
    --batch-size is per process). Writes checkpoints/last.pt, best.pt (with --val-split), log.jsonl and
    model.safetensors; `ssr predict --model RUN` uses the last.
    """
    values = dict(locals())
    set_quiet(quiet)

    from ssr_cli.artefacts.quick import answered_training_rerun
    from ssr_cli.cli.training import run_stage

    key = _quick_key(
        opt.quick_settings(values),
        data,
        layout,
        split,
        vocab,
        gt,
        val_split,
        pseudo,
        backbone_weights,
        no_pretrained,
    )
    if answered_training_rerun("fit-seg", out, key, overwrite, _result_line, "this trained model"):
        return
    from ssr_cli.stages import fit_seg as stage

    train = {
        "iters": iters,
        "batch_size": batch_size,
        "crop_size": crop_size,
        "accum": accum,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "poly_power": poly_power,
        "head_lr_mult": head_lr_mult,
        "head_bias_lr_mult": head_bias_lr_mult,
        "freeze_bn": freeze_bn,
        "bias_decay": bias_decay,
        "norm_decay": norm_decay,
        "loss": loss,
        "scale_range": opt.parse_range(scale_range, "--scale-range"),
        "flip": flip,
        "precision": precision,
        "sync_bn": sync_bn,
        "seed": seed,
        "workers": workers,
        "save_every": save_every,
        "val_every": val_every,
        "log_every": log_every,
        "check_sync_every": check_sync_every,
        "tensorboard": tensorboard,
    }
    given = {"pretrained": not no_pretrained, "device": opt.check_device(device), "train": train}
    run_stage(stage, stage.FitSegOptions, values, key, _result_line, **given)


def _result_line(out: Path, manifest: dict) -> str:
    """The line fit-seg prints on stdout: the model file and the best validation mIoU."""
    from ssr_cli.cli.training import run_summary

    _, best = run_summary(manifest)
    text = f"{out / 'model.safetensors'}"
    if best.get("miou") is not None:
        text += f"  best val mIoU {100 * best['miou']:.2f} % at iteration {best['iteration']}"
        text += " (checkpoints/best.pt)"
    return text


def _quick_key(
    options: dict,
    data: Path,
    layout: str,
    split: str | None,
    vocab: str | None,
    gt: Path | None,
    val_split: str | None,
    pseudo: Path,
    backbone_weights: str | None,
    no_pretrained: bool,
) -> str | None:
    """The quick rerun key (``artefacts/quick.py``) of this fit-seg command, computed without torch;
    None when the backbone weights would come from the caches (finding them needs timm)."""
    import os

    from ssr_cli.artefacts.quick import quick_key
    from ssr_cli.data import open_dataset

    if backbone_weights is None and not no_pretrained and not os.environ.get("SSR_BACKBONE_WEIGHTS"):
        return None
    dataset = open_dataset(data, layout=layout, split=split, labels="none", vocab=vocab, gt=gt)
    fps = [dataset.fingerprint()]
    if val_split:
        val = open_dataset(data, layout=layout, split=val_split, labels="none", vocab=vocab, gt=gt)
        fps.append(val.fingerprint())
    pseudo_is_run = (pseudo / "manifest.json").is_file()
    env_weights = os.environ.get("SSR_BACKBONE_WEIGHTS")
    files = [None if pseudo_is_run else pseudo, gt, backbone_weights, env_weights]
    return quick_key(
        "fit-seg",
        options,
        dataset_fingerprint="+".join(fps),
        files=files,
        runs=[pseudo] if pseudo_is_run else [],
        env=["SSR_BACKBONE_WEIGHTS", "WORLD_SIZE"],
    )
