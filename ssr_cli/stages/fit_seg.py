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

from ssr_cli.artefacts import fingerprint, read_manifest
from ssr_cli.artefacts.fingerprint import file_sha256
from ssr_cli.artefacts.manifest import is_run, open_run
from ssr_cli.artefacts.paths import absolute, locate_inputs
from ssr_cli.artefacts.run import new_manifest
from ssr_cli.artefacts.training import finish_training_manifest, prepare_training_run, start_training_manifest
from ssr_cli.console import info, warn
from ssr_cli.errors import ArtefactError, ConfigError, DataError

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


def prepare_run(out: Path, basis: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Check ``out`` against the new run; returns "fresh", "resume" or "done". May clear the folder.

    Refuses (ArtefactError/ConfigError) a different run without --overwrite, an
    interrupted run without --resume, and --resume with a different --iters.
    """
    return prepare_training_run(
        out,
        stage=STAGE,
        basis=basis,
        resume=resume,
        overwrite=overwrite,
        outputs=("checkpoints", "log.jsonl", "model.safetensors"),
        final="model.safetensors",
    )


def run(opts: FitSegOptions) -> dict[str, Any]:
    """Train the segmenter as ``opts`` says; returns the final manifest (on every rank)."""
    import torch

    from ssr_cli.data import open_dataset
    from ssr_cli.models.backbone_weights import resolve_backbone_state
    from ssr_cli.models.segmenter import SegmenterConfig, backbone_normalisation
    from ssr_cli.runtime import resolve_device, resolve_precision
    from ssr_cli.seg.checkpoint import MODEL_FILE, load_checkpoint_file
    from ssr_cli.seg.data import Sample
    from ssr_cli.seg.recipes import fill_defaults
    from ssr_cli.seg.train import TrainConfig, train
    from ssr_cli.train import distributed as D

    out = Path(opts.out)
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
    val_samples: list[Sample] = []
    val_desc = None
    if opts.val_split:
        val = open_dataset(
            opts.data, layout=opts.layout, split=opts.val_split, labels="none", vocab=opts.vocab, gt=opts.gt
        )
        val_samples = [Sample(i.id, i.image, i.gt) for i in val.items if i.gt is not None]
        if not val_samples:
            raise DataError(
                f"none of the {len(val)} images of --val-split {opts.val_split} has a ground-truth mask",
                path=val.root,
                hint="add masks for some of them, pass --gt DIR, or drop --val-split",
            )
        if len(val_samples) < len(val):  # partial ground truth: validate on the images that have it
            warn(
                f"validating on the {len(val_samples)} of {len(val)} images of split {opts.val_split} "
                "that have a ground-truth mask"
            )
        val_desc = val.describe()

    device = resolve_device(opts.device)
    tdict, output_stride, recipe = fill_defaults(opts.head, opts.train, opts.output_stride)
    tdict["precision"] = resolve_precision(tdict.get("precision", "auto"), device)
    tcfg = TrainConfig(**tdict)
    mean, std = backbone_normalisation(opts.backbone)
    model_cfg = SegmenterConfig(
        num_classes=dataset.vocab.num_classes,
        backbone=opts.backbone,
        output_stride=output_stride,
        head=opts.head,
        aspp_channels=opts.aspp_channels,
        mean=mean,
        std=std,
        class_names=("background", *dataset.vocab.classes),
    )
    backbone_state, weights_src = resolve_backbone_state(
        opts.backbone, opts.backbone_weights, opts.pretrained
    )
    weights_desc = weights_src.describe()
    env = D.init_distributed(device)
    try:
        if tcfg.sync_bn and env.enabled and device.type == "cpu":
            raise ConfigError(
                "--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU",
                hint="drop --sync-bn for CPU runs",
            )
        basis = {
            "stage": STAGE,
            "config": {
                "model": model_cfg.to_dict(),
                "train": tcfg.result_dict(),
                "world_size": env.world,
                "backbone_weights": {
                    "origin_random": weights_src.is_random,
                    "sha256": weights_desc["sha256"],
                },
            },
            "upstream": {"pseudo": pseudo["fingerprint"]},
            "inputs": {
                "dataset": dataset.fingerprint(),
                "val": None if val_desc is None else val_desc["fingerprint"],
            },
        }
        fp = fingerprint(basis)
        decision = D.decide_on_main(env, lambda: prepare_run(out, basis, opts.resume, opts.overwrite))
        if decision == "done":
            info(f"fit-seg: {out} already holds this trained model; nothing to do (--overwrite trains again)")
            return read_manifest(out)
        resume_state = None
        if decision == "resume":
            resume_state = load_checkpoint_file(out / "checkpoints" / "last.pt")
            if resume_state.get("fingerprint") != fp:
                raise ArtefactError(
                    "checkpoints/last.pt belongs to another run",
                    path=out,
                    hint="start again with --overwrite",
                )
            info(f"fit-seg: resuming {out} at iteration {resume_state['iteration']} of {tcfg.iters}")
        manifest = new_manifest(
            STAGE,
            config={
                "data": str(absolute(opts.data)),
                "layout": dataset.layout,
                "split": dataset.split,
                "pseudo": str(absolute(opts.pseudo)),
                "val_split": opts.val_split,
                "device": str(device),
                "world_size": env.world,
                "model": model_cfg.to_dict(),
                "train": tcfg.to_dict(),
                "backbone_weights": weights_desc,
                "recipe": recipe,
            },
            basis=basis,
            upstream={"pseudo": pseudo["fingerprint"]},
            inputs=locate_inputs(
                {"dataset": dataset.describe(), "val": val_desc, "pseudo": {**pseudo, "dir": str(label_dir)}},
                out,
            ),
            item_dir="checkpoints",
            item_suffix=".pt",
            item_count=tcfg.iters,
            samples=len(samples),
            model_file=MODEL_FILE,
        )
        if env.is_main:
            start_training_manifest(out, manifest, resumed=resume_state is not None)
        D.barrier(env)
        info(
            f"fit-seg: {len(samples)} images, {model_cfg.num_classes} classes, backbone {opts.backbone} "
            f"({weights_desc['origin']}), {tcfg.iters} iterations on {device} x{env.world}"
        )
        info(
            f"fit-seg: head {opts.head}, recipe of {recipe['source']}; backbone lr {tcfg.lr:g}, "
            f"head x{tcfg.head_lr_mult:g} (biases x{tcfg.head_bias_lr_mult:g}), weight decay "
            f"{tcfg.weight_decay:g}, BatchNorm {'frozen' if tcfg.freeze_bn else 'trained'}, "
            f"output stride {output_stride}"
        )
        if tcfg.freeze_bn and weights_src.is_random and env.is_main:
            warn(
                "--freeze-bn with random backbone weights keeps BatchNorm at its initial statistics "
                "(mean 0, variance 1); the recipe assumes pretrained weights"
            )
        summary = train(out, model_cfg, tcfg, samples, val_samples, env, backbone_state, resume_state, fp)
        return finish_training_manifest(out, manifest, iters=tcfg.iters, summary=summary, write=env.is_main)
    finally:
        if torch.distributed.is_available():
            D.shutdown(env)
