"""Shared option aliases and conventions for every stage command.

Every stage command takes ``--device``, ``--workers``, ``--seed``,
``--overwrite``, ``--shard`` and ``--quiet`` with the same meaning; the
dataset commands take ``--data``, ``--layout``, ``--split``, ``--labels``,
``--vocab``, ``--gt``. Parsing helpers here turn the raw values into typed ones
without importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

Device = Annotated[
    str,
    typer.Option("--device", help="auto | cpu | cuda | cuda:N. auto = the first GPU when there is one."),
]
Workers = Annotated[
    int, typer.Option("--workers", "-j", min=0, help="Worker processes/threads for CPU-side work.")
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (results are reproducible per seed).")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing run in the output folder made with different settings. "
        "Without it, a matching run is resumed and a different one is refused.",
    ),
]


def _check_shard(value: Optional[str]) -> Optional[str]:
    """A malformed --shard is a usage error (exit code 2), like any bad flag."""
    if value:
        from ssr_cli.artefacts.shard import parse_shard
        from ssr_cli.errors import ConfigError

        try:
            parse_shard(value)
        except ConfigError as exc:
            raise typer.BadParameter(f"{exc.what} ({exc.hint})" if exc.hint else exc.what) from None
    return value


ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--shard",
        metavar="i/n",
        callback=_check_shard,
        help="Process only shard i of n (0-based). Default: from torchrun's RANK/WORLD_SIZE, else all.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")]

DataRoot = Annotated[
    Path,
    typer.Option(
        "--data", "-d", help="Dataset root (VOC2012 folder, COCO-as-PNG folder, or a custom folder)."
    ),
]
Layout = Annotated[
    str, typer.Option("--layout", help="auto | voc | coco | custom (auto detects from the folder).")
]
Split = Annotated[
    Optional[str],
    typer.Option("--split", help="Split name, e.g. train, train_aug, val (VOC); train2014 (COCO)."),
]
LabelSource = Annotated[
    str,
    typer.Option(
        "--labels",
        help="Image-level labels from: auto | mask | xml | a label file PATH "
        "(auto: the label file of a custom layout, else GT masks, else VOC XML).",
    ),
]
Vocab = Annotated[
    Optional[str],
    typer.Option("--vocab", help="Class vocabulary: voc | coco | PATH to a vocabulary JSON file."),
]
MaxSide = Annotated[
    int,
    typer.Option(
        "--max-side",
        min=32,
        help="Largest image side in pixels (default 1024; VOC and COCO images are at most 640). "
        "Sizes are read from the headers before any work; see --oversize.",
    ),
]
Oversize = Annotated[
    str,
    typer.Option(
        "--oversize",
        help="Images larger than --max-side: error (stop with the file's name, before any work) | "
        "skip (leave them out, with a notice) | downscale (work at --max-side; outputs keep the "
        "original size).",
    ),
]
GtDir = Annotated[
    Optional[Path], typer.Option("--gt", help="Folder of ground-truth label PNGs (overrides the layout's).")
]


def quick_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The settings a command's quick rerun key hashes (``artefacts/quick.py``): its options
    ``values`` (``locals()`` on entry) but --out, --resume, --overwrite and --quiet; paths as text."""
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in values.items()
        if k not in ("out", "resume", "overwrite", "quiet")
    }


def clip_files(clip_arch: str, clip_weights: str | None) -> list[Path | None] | None:
    """[weights file, model-config file or None] of --clip-arch/--clip-weights, found without
    torch (missing weights fail here, at once); None when a config file names its model and
    no --clip-weights is given (only loading finds its weights)."""
    config_file = Path(clip_arch) if Path(clip_arch).suffix == ".json" else None
    if config_file is not None and clip_weights is None:
        return None
    from ssr_cli.models.sources import clip_weights_source

    return [clip_weights_source(clip_arch, clip_weights).path, config_file]


def check_device(device: str) -> str:
    """Validate the --device text (no torch import). Returns it normalised."""
    from ssr_cli.errors import ConfigError

    text = device.strip().lower()
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ConfigError(f"--device {device!r} is not understood", hint="use auto, cpu, cuda or cuda:N")


Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Crash recovery: continue an interrupted run from checkpoints/last.pt with the SAME "
        "settings, exactly as if it had not stopped. Not for training longer (a changed --iters "
        "is refused).",
    ),
]


def parse_range(text: str, name: str) -> tuple[float, float]:
    """``"0.5,1.5"`` (an option's MIN,MAX) -> (0.5, 1.5); a one-line error naming ``name``."""
    from ssr_cli.errors import ConfigError

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not MIN,MAX", hint=f"e.g. {name} 0.5,1.5") from None
    return low, high


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.75,1.0,1.25"`` (``--scales`` of make-seeds and predict) -> the scales, each in (0, 4]."""
    from ssr_cli.errors import ConfigError

    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            f"--scales {text!r} is not a comma-separated list of numbers",
            hint="e.g. --scales 1.0 or --scales 0.75,1.0,1.25",
        ) from None
    if not scales or any(s <= 0 or s > 4 for s in scales):
        raise ConfigError(f"--scales {text!r}: each scale must be in (0, 4]")
    return scales


# -- options shared by the training commands (train-cmpa, train; fit-seg for the run ones) ------

RunOut = Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")]
ValSplit = Annotated[
    Optional[str],
    typer.Option("--val-split", help="Split with ground truth for periodic validation mIoU (best.pt)."),
]
ValEvery = Annotated[
    int, typer.Option("--val-every", min=0, help="Validate every N steps (0: only at the end).")
]

ClipArch = Annotated[
    str, typer.Option("--clip-arch", help="open_clip architecture name, or a model-config JSON file.")
]
ClipWeights = Annotated[
    Optional[str],
    typer.Option(
        "--clip-weights",
        help="Weights file or folder (OpenAI ViT-B-16.pt, open_clip .pt/.bin, .safetensors); "
        "'random' for an untrained smoke-test model. Default: $SSR_CLIP_WEIGHTS, the local "
        "caches, then a download when online.",
    ),
]
Precision = Annotated[
    str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on GPU).")
]
Iters = Annotated[int, typer.Option("--iters", min=0, help="Optimizer steps (0: the step-0 model only).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per step per process.")]
TrainSize = Annotated[
    int, typer.Option("--size", min=16, help="Training side: images are resized to SIZE x SIZE (no crop).")
]
ScaleRange = Annotated[str, typer.Option("--scale-range", help="Random per-step scale of --size, MIN,MAX.")]
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.")]
Jitter = Annotated[
    float, typer.Option("--jitter", min=0.0, max=0.99, help="Colour jitter strength (0: off).")
]
HeadsLr = Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate of the CMPA heads.")]
HeadsWeightDecay = Annotated[
    float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay of the CMPA heads.")
]
CmpaDim = Annotated[int, typer.Option("--dim", min=1, help="Dimension d2 of CMPA's shared space.")]
CmpaHidden = Annotated[
    Optional[int], typer.Option("--hidden", min=1, help="Width of the heads' residual MLP (default: --dim).")
]
HeadInit = Annotated[
    str,
    typer.Option(
        "--head-init",
        help="Step-0 projection when --dim < CLIP's embedding: pca (keeps the span of the texts and the "
        "principal directions of image embeddings: CAMs start as plain CLIP's) | random (orthonormal).",
    ),
]
InitImages = Annotated[
    int, typer.Option("--init-images", min=1, help="Images sampled for the pca initial projection.")
]
ProtosPerClass = Annotated[
    int, typer.Option("--protos-per-class", min=1, help="K-means image prototypes per class.")
]
ProtoEvery = Annotated[
    int, typer.Option("--proto-every", min=1, help="Recompute the prototypes over the split every N steps.")
]
ProtoEma = Annotated[
    float,
    typer.Option(
        "--proto-ema", min=0.0, max=0.999999, help="Also move prototypes by EMA each step (0: off)."
    ),
]
Temperature = Annotated[
    float, typer.Option("--temperature", help="Initial temperature tau of the prototype loss (learnable).")
]
Pool = Annotated[
    str,
    typer.Option(
        "--pool",
        help="Foreground features: tokens = ISA(CAM-weighted mean of CLIP's patch tokens), the "
        "form the CAM uses (ISA of the mean token) | projected = CAM-weighted mean of ISA(tokens).",
    ),
]
TextTarget = Annotated[
    str,
    typer.Option(
        "--text-target",
        help="Image features are scored against: live = this step's TSA class features (what "
        "the seeds compare), plus a term that separates the classes' cross-modal prototypes | "
        "snapshot = the text prototypes of the last refresh.",
    ),
]
SaveEvery = Annotated[
    int, typer.Option("--save-every", min=1, help="Write checkpoints/last.pt every N steps.")
]
LogEvery = Annotated[int, typer.Option("--log-every", min=1, help="Log to log.jsonl every N steps.")]
Tensorboard = Annotated[
    bool,
    typer.Option(
        "--tensorboard", help="Also write log.jsonl's numbers as TensorBoard scalars (RUN/tensorboard/)."
    ),
]
CheckSyncEvery = Annotated[
    int, typer.Option("--check-sync-every", min=0, hidden=True, help="Compare weights across ranks.")
]
