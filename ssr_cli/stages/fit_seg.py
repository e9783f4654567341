"""Stage ``fit-seg``: train the DeepLab-style segmenter on pseudo-labels.

Run folder::

    RUN/
      manifest.json          stage "fit-seg", config, fingerprint, completion, summary
      checkpoints/last.pt    full training state, every --save-every iterations (atomic)
      checkpoints/best.pt    best validation mIoU (with --val-split)
      log.jsonl              one JSON record per log step / validation / sync check
      model.safetensors      final weights + the model config in the metadata

``--resume`` is crash recovery: it continues an interrupted run with the same
settings from ``last.pt``, exactly as if it had not stopped. It does not train
longer: a different ``--iters`` is refused.

Imports torch: only import inside command bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssr_cli.artefacts import fingerprint
from ssr_cli.artefacts.fingerprint import file_sha256
from ssr_cli.artefacts.manifest import is_run, open_run
from ssr_cli.artefacts.paths import absolute
from ssr_cli.artefacts.training import finish_training_manifest
from ssr_cli.console import info, warn
from ssr_cli.errors import ArtefactError, ConfigError, DataError
from ssr_cli.stages.training_common import (
    RunKind,
    begin_run,
    distributed,
    input_fingerprints,
    start_run,
    train_config,
    training_manifest,
    validation_samples,
)

STAGE = "fit-seg"


@dataclass
class FitSegOptions:
    """Everything ``ssr fit-seg`` takes (plain values, no torch)."""

    data: Path
    pseudo: Path
    out: Path
    layout: str = "auto"
    split: str | None = None
    vocab: str | None = None
    gt: Path | None = None
    val_split: str | None = None
    backbone: str = "resnet101"
    output_stride: int | None = None  # None: the head's recipe (ssr_cli.seg.recipes)
    head: str = "deeplabv3plus"
    aspp_channels: int = 256
    backbone_weights: str | None = None
    pretrained: bool = True
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; None: the head's recipe


def resolve_pseudo(path: Path) -> tuple[Path, dict[str, Any]]:
    """(folder of <id>.png, description) of ``--pseudo``: a run folder or a plain folder of PNGs."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(
            "pseudo-label folder not found", path=path, hint="pass a refine run folder or PNG folder"
        )
    if is_run(path):
        run = open_run(path)
        manifest = run.data
        if run.item_suffix != ".png":
            raise ArtefactError(
                f"this '{manifest.get('stage')}' run holds no label PNGs",
                path=path,
                hint="pass the output folder of ssr refine (or ssr predict)",
            )
        if not manifest.get("completed"):
            warn(
                f"pseudo-label run {path} is not complete ({manifest.get('items_done')}/"
                f"{manifest.get('item_count')} items); training on the finished ones"
            )
        desc = {"kind": "run", "stage": manifest.get("stage"), "fingerprint": manifest.get("fingerprint")}
        dataset = (manifest.get("inputs") or {}).get("dataset") or {}
        desc["split"] = dataset.get("split") or (manifest.get("config") or {}).get("split")
        return run.item_dir, desc
    return path, {"kind": "folder", "fingerprint": None, "split": None}


def _folder_fingerprint(files: list[Path]) -> str:
    return fingerprint([[f.name, file_sha256(str(f))] for f in files])


def run_files() -> tuple[tuple[str, ...], str]:
    """(the files and folders a run writes, the model file of a complete run)."""
    return ("checkpoints", "log.jsonl", "model.safetensors"), "model.safetensors"


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by fit-seg, on the CPU."""
    from ssr_cli.seg.checkpoint import load_checkpoint_file as load_segmenter_checkpoint

    return load_segmenter_checkpoint(path)


RUN_KIND = RunKind(
    STAGE, "fit-seg", "this trained model", run_files, load_checkpoint_file, log_every_rank=True
)


def run(opts: FitSegOptions) -> dict[str, Any]:
    """Train the segmenter as ``opts`` says; returns the final manifest (on every rank)."""
    from ssr_cli.models.backbone_weights import resolve_backbone_state
    from ssr_cli.runtime import resolve_device
    from ssr_cli.seg.checkpoint import MODEL_FILE
    from ssr_cli.seg.recipes import fill_defaults
    from ssr_cli.seg.train import TrainConfig, train

    out = Path(opts.out)
    dataset, samples, label_dir, pseudo = open_pseudo_labels(opts)
    val_samples, val_desc = validation_samples(
        opts.data,
        layout=opts.layout,
        split=opts.val_split,
        vocab=opts.vocab,
        gt=opts.gt,
        hint="add masks for some of them, pass --gt DIR, or drop --val-split",
        warn_partial=True,
    )
    device = resolve_device(opts.device)
    tdict, output_stride, recipe = fill_defaults(opts.head, opts.train, opts.output_stride)
    tcfg = train_config(TrainConfig, tdict, device)
    model_cfg = segmenter_config(opts, dataset.vocab, output_stride)
    backbone_state, weights_src = resolve_backbone_state(
        opts.backbone, opts.backbone_weights, opts.pretrained
    )
    weights_desc = weights_src.describe()
    with distributed(device) as env:
        check_sync_bn(tcfg, env, device)
        inputs = input_fingerprints(dataset, val_desc)
        basis = run_basis(model_cfg, tcfg, env.world, weights_src.is_random, weights_desc, pseudo, inputs)
        fp = fingerprint(basis)
        start = begin_run(RUN_KIND, env, opts, basis, iters=tcfg.iters)
        if start.done is not None:
            return start.done
        manifest = training_manifest(
            STAGE,
            out,
            config=manifest_config(opts, dataset, device, env.world, model_cfg, tcfg, weights_desc, recipe),
            basis=basis,
            upstream={"pseudo": pseudo["fingerprint"]},
            inputs={
                "dataset": dataset.describe(),
                "val": val_desc,
                "pseudo": {**pseudo, "dir": str(label_dir)},
            },
            iters=tcfg.iters,
            samples=len(samples),
            model_file=MODEL_FILE,
        )
        start_run(env, out, manifest, resumed=start.resume_state is not None)
        info(
            f"fit-seg: {len(samples)} images, {model_cfg.num_classes} classes, backbone {opts.backbone} "
            f"({weights_desc['origin']}), {tcfg.iters} iterations on {device} x{env.world}"
        )
        describe_recipe(opts.head, recipe, tcfg, output_stride)
        if tcfg.freeze_bn and weights_src.is_random and env.is_main:
            warn(
                "--freeze-bn with random backbone weights keeps BatchNorm at its initial statistics "
                "(mean 0, variance 1); the recipe assumes pretrained weights"
            )
        summary = train(
            out, model_cfg, tcfg, samples, val_samples, env, backbone_state, start.resume_state, fp
        )
        return finish_training_manifest(out, manifest, iters=tcfg.iters, summary=summary, write=env.is_main)


def open_pseudo_labels(opts: FitSegOptions) -> tuple[Any, list[Any], Path, dict[str, Any]]:
    """(dataset, its samples that have a pseudo-label, the pseudo-labels' folder, their
    description with a fingerprint) of ``opts``; warns about the images left out."""
    from ssr_cli.data import open_dataset
    from ssr_cli.seg.data import Sample

    label_dir, pseudo = resolve_pseudo(opts.pseudo)
    split = opts.split or pseudo.get("split")
    dataset = open_dataset(opts.data, layout=opts.layout, split=split, labels="none", vocab=opts.vocab)
    candidates = [Sample(i.id, i.image, label_dir / f"{i.id}.png") for i in dataset.items]
    samples = [s for s in candidates if s.label.is_file()]
    if not samples:
        raise DataError(
            f"none of the {len(dataset)} images of split {dataset.split!r} has a pseudo-label <id>.png here",
            path=label_dir,
            hint="pass the --split the pseudo-labels were made for",
        )
    if len(samples) < len(dataset):
        warn(
            f"{len(dataset) - len(samples)} of {len(dataset)} images have no pseudo-label; "
            "training without them"
        )
    if pseudo["fingerprint"] is None:
        pseudo["fingerprint"] = _folder_fingerprint([s.label for s in samples])
    return dataset, samples, label_dir, pseudo


def check_sync_bn(tcfg: Any, env: Any, device: Any) -> None:
    """Refuse --sync-bn where PyTorch cannot run it: several processes on the CPU."""
    if tcfg.sync_bn and env.enabled and device.type == "cpu":
        raise ConfigError(
            "--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU",
            hint="drop --sync-bn for CPU runs",
        )


def segmenter_config(opts: FitSegOptions, vocab: Any, output_stride: int) -> Any:
    """The segmenter's config: backbone, head, the backbone's input normalisation, the classes."""
    from ssr_cli.models.segmenter import SegmenterConfig, backbone_normalisation

    mean, std = backbone_normalisation(opts.backbone)
    return SegmenterConfig(
        num_classes=vocab.num_classes,
        backbone=opts.backbone,
        output_stride=output_stride,
        head=opts.head,
        aspp_channels=opts.aspp_channels,
        mean=mean,
        std=std,
        class_names=("background", *vocab.classes),
    )


def run_basis(
    model_cfg: Any,
    tcfg: Any,
    world: int,
    random_weights: bool,
    weights_desc: dict[str, Any],
    pseudo: dict[str, Any],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """What the run's fingerprint hashes: the model and the settings that change results, the
    number of processes, the backbone weights, the pseudo-labels and the ``inputs``."""
    return {
        "stage": STAGE,
        "config": {
            "model": model_cfg.to_dict(),
            "train": tcfg.result_dict(),
            "world_size": world,
            "backbone_weights": {
                "origin_random": random_weights,
                "sha256": weights_desc["sha256"],
            },
        },
        "upstream": {"pseudo": pseudo["fingerprint"]},
        "inputs": inputs,
    }


def manifest_config(
    opts: FitSegOptions,
    dataset: Any,
    device: Any,
    world: int,
    model_cfg: Any,
    tcfg: Any,
    weights_desc: dict[str, Any],
    recipe: dict[str, Any],
) -> dict[str, Any]:
    """The ``config`` of the run's manifest: the options as resolved, the model, the recipe."""
    return {
        "data": str(absolute(opts.data)),
        "layout": dataset.layout,
        "split": dataset.split,
        "pseudo": str(absolute(opts.pseudo)),
        "val_split": opts.val_split,
        "device": str(device),
        "world_size": world,
        "model": model_cfg.to_dict(),
        "train": tcfg.to_dict(),
        "backbone_weights": weights_desc,
        "recipe": recipe,
    }


def describe_recipe(head: str, recipe: dict[str, Any], tcfg: Any, output_stride: int) -> None:
    """Log the optimizer settings of the run and where their defaults came from."""
    info(
        f"fit-seg: head {head}, recipe of {recipe['source']}; backbone lr {tcfg.lr:g}, "
        f"head x{tcfg.head_lr_mult:g} (biases x{tcfg.head_bias_lr_mult:g}), weight decay "
        f"{tcfg.weight_decay:g}, BatchNorm {'frozen' if tcfg.freeze_bn else 'trained'}, "
        f"output stride {output_stride}"
    )
