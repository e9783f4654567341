"""``ssr train-cmpa``: cross-modal prototype alignment heads (ISA/TSA) for CAMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import (
    DataRoot,
    Device,
    LabelSource,
    Layout,
    Overwrite,
    Quiet,
    Resume,
    Seed,
    Split,
    Vocab,
    Workers,
    parse_range,
)
from ssr_cli.console import set_quiet


@app.command("train-cmpa")
def train_cmpa(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")],
    data: DataRoot,
    layout: Layout = "auto",
    split: Split = None,
    labels: LabelSource = "auto",
    vocab: Vocab = None,
    clip_arch: Annotated[
        str, typer.Option("--clip-arch", help="open_clip architecture name, or a model-config JSON file.")
    ] = "ViT-B-16",
    clip_weights: Annotated[
        Optional[str],
        typer.Option(
            "--clip-weights",
            help="Weights file or folder (OpenAI ViT-B-16.pt, open_clip .pt/.bin, .safetensors); "
            "'random' for an untrained smoke-test model. Default: $SSR_CLIP_WEIGHTS, the local "
            "caches, then a download when online.",
        ),
    ] = None,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Dimension d2 of the shared space.")] = 256,
    hidden: Annotated[
        Optional[int],
        typer.Option("--hidden", min=1, help="Width of the heads' residual MLP (default: --dim)."),
    ] = None,
    head_init: Annotated[
        str,
        typer.Option(
            "--head-init",
            help="Step-0 projection when --dim < CLIP's embedding: pca (keeps the span of the texts and the "
            "principal directions of image embeddings: CAMs start as plain CLIP's) | random (orthonormal).",
        ),
    ] = "pca",
    init_images: Annotated[
        int, typer.Option("--init-images", min=1, help="Images sampled for the pca initial projection.")
    ] = 256,
    protos_per_class: Annotated[
        int, typer.Option("--protos-per-class", min=1, help="K-means image prototypes per class.")
    ] = 1,
    proto_every: Annotated[
        int,
        typer.Option("--proto-every", min=1, help="Recompute the prototypes over the split every N steps."),
    ] = 5000,
    proto_ema: Annotated[
        float,
        typer.Option(
            "--proto-ema", min=0.0, max=0.999999, help="Also move prototypes by EMA each step (0: off)."
        ),
    ] = 0.0,
    pool: Annotated[
        str,
        typer.Option(
            "--pool",
            help="Foreground features: tokens = ISA(CAM-weighted mean of CLIP's patch tokens), the "
            "form the CAM uses (ISA of the mean token) | projected = CAM-weighted mean of ISA(tokens).",
        ),
    ] = "tokens",
    text_target: Annotated[
        str,
        typer.Option(
            "--text-target",
            help="Image features are scored against: live = this step's TSA class features (what "
            "the seeds compare), plus a term that separates the classes' cross-modal prototypes | "
            "snapshot = the text prototypes of the last refresh.",
        ),
    ] = "live",
    temperature: Annotated[
        float, typer.Option("--temperature", help="Initial temperature of the contrastive loss (learnable).")
    ] = 0.05,
    iters: Annotated[
        int, typer.Option("--iters", min=0, help="Optimizer steps (0: step-0 heads only).")
    ] = 10000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per step per process.")
    ] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = 1e-4,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")
    ] = 1e-4,
    size: Annotated[
        int,
        typer.Option("--size", min=16, help="Training side: images are resized to SIZE x SIZE (no crop)."),
    ] = 448,
    scale_range: Annotated[
        str, typer.Option("--scale-range", help="Random per-step scale of --size, MIN,MAX.")
    ] = "0.75,1.25",
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.")] = True,
    jitter: Annotated[
        float, typer.Option("--jitter", min=0.0, max=0.99, help="Colour jitter strength (0: off).")
    ] = 0.2,
    cam_source: Annotated[
        str,
        typer.Option(
            "--cam-source", help="CAMs that weight the features: heads (current heads) | clip (plain CLIP)."
        ),
    ] = "heads",
    precision: Annotated[
        str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on GPU).")
    ] = "auto",
    save_every: Annotated[
        int, typer.Option("--save-every", min=1, help="Write checkpoints/last.pt every N steps.")
    ] = 500,
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Log to log.jsonl every N steps.")
    ] = 10,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard", help="Also write log.jsonl's numbers as TensorBoard scalars (RUN/tensorboard/)."
        ),
    ] = False,
    check_sync_every: Annotated[
        int, typer.Option("--check-sync-every", min=0, hidden=True, help="Compare weights across ranks.")
    ] = 0,
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
    import os

    from ssr_cli.artefacts.quick import finished_unchanged, quick_key, remember
    from ssr_cli.cli.options import check_device
    from ssr_cli.console import info
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
        done = None if overwrite else finished_unchanged(out, key)
        if done is not None:
            if os.environ.get("RANK", "0") == "0":
                info(
                    f"train-cmpa: {out} already holds these trained heads and its inputs are unchanged; "
                    "nothing to do (--overwrite trains again)"
                )
                print(_result_line(out, done))
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
    if os.environ.get("RANK", "0") == "0":
        if manifest.get("completed") and key is not None:
            remember(out, key)
        print(_result_line(out, manifest))


def _result_line(out: Path, manifest: dict) -> str:
    """The line train-cmpa prints on stdout: the heads file, the final loss and temperature."""
    final = (manifest.get("summary") or {}).get("final") or {}
    text = str(out / manifest.get("heads_file", "heads.safetensors"))
    if final.get("loss") is not None:
        text += f"  loss {final['loss']:.4f}  temperature {final['temperature']:.4f}"
    return text
