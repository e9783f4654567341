"""Stage ``train``: single-stage SSR, the paper's regime (``L_SSR = L_proto + gamma L_seg``).

Run folder::

    RUN/
      manifest.json            stage "train", config, fingerprint, completion, summary
      model.safetensors        the segmentation decoder; metadata: its config + the CLIP it reads
      heads.safetensors        the CMPA heads (ISA/TSA/temperature), as train-cmpa writes them
      prototypes.safetensors   the prototypes of the last refresh
      checkpoints/last.pt      full training state every --save-every iterations (atomic)
      checkpoints/best.pt      the decoder at the best validation mIoU (with --val-split)
      log.jsonl                records with a "type": train, val, prototypes, sync

The fingerprint covers the settings that change results, the CLIP and DINO identities and
the dataset's (and validation split's) fingerprint. ``ssr predict --model RUN`` runs frozen
CLIP + the decoder (``RUN/checkpoints/best.pt`` also works as ``--model``).

``--resume`` is crash recovery (exact; a different ``--iters`` is refused), as for train-cmpa.

Imports torch: only import inside command bodies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssr_cli.artefacts import fingerprint, read_manifest
from ssr_cli.artefacts.paths import absolute, locate_inputs
from ssr_cli.artefacts.run import new_manifest
from ssr_cli.artefacts.training import finish_training_manifest, prepare_training_run, start_training_manifest
from ssr_cli.console import info, warn
from ssr_cli.errors import ArtefactError, DataError

STAGE = "train"
TRAIN_VERSION = "ssr-train-1"  # bump when the training computation changes results
CHECKPOINT = Path("checkpoints") / "last.pt"


@dataclass
class TrainOptions:
    """Everything ``ssr train`` takes (plain values, no torch)."""

    data: Path
    out: Path
    layout: str = "auto"
    split: str | None = None
    labels: str = "auto"
    vocab: str | None = None
    val_split: str | None = None
    arch: str = "ViT-B-16"
    weights: str | None = None
    dino_model: str = "dino_vitb16"
    dino_weights: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # SsrConfig fields


def outputs() -> tuple[str, ...]:
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE
    from ssr_cli.onestage.decoder import MODEL_FILE

    return ("checkpoints", "log.jsonl", "tensorboard", MODEL_FILE, HEADS_FILE, PROTOTYPES_FILE)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by ``ssr train``, on the CPU."""
    from ssr_cli.train.state import load_training_state

    return load_training_state(
        path, stage="train", keys=("heads", "decoder", "prototypes"), hint="start again with --overwrite"
    )


def run(opts: TrainOptions) -> dict[str, Any]:
    """Train single-stage SSR as ``opts`` says; returns the final manifest (on every rank)."""
    import torch

    from ssr_cli.cmpa.data import TrainItem
    from ssr_cli.cmpa.prototypes import save_prototypes
    from ssr_cli.data import open_dataset
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE, clip_identity, save_heads
    from ssr_cli.onestage.config import SsrConfig
    from ssr_cli.onestage.decoder import MODEL_FILE, DecoderConfig, resolve_layers
    from ssr_cli.onestage.train import save_decoder, train
    from ssr_cli.runtime import resolve_device, resolve_precision
    from ssr_cli.seg.data import Sample
    from ssr_cli.train import distributed as D

    out = Path(opts.out)
    dataset = open_dataset(
        opts.data, layout=opts.layout, split=opts.split, labels=opts.labels, vocab=opts.vocab
    )
    items = [TrainItem(i.id, i.image, tuple(c - 1 for c in i.labels)) for i in dataset.items if i.labels]
    if len(items) < len(dataset):
        missing = len(dataset) - len(items)
        warn(f"{missing} of {len(dataset)} images have no image-level label; training without them")
    val_samples: list[Any] = []
    val_desc = None
    if opts.val_split:
        val = open_dataset(
            opts.data, layout=opts.layout, split=opts.val_split, labels="none", vocab=opts.vocab
        )
        val_samples = [Sample(i.id, i.image, i.gt) for i in val.items if i.gt is not None]
        if not val_samples:
            raise DataError(
                f"none of the {len(val)} images of --val-split {opts.val_split} has a ground-truth mask",
                path=val.root,
                hint="drop --val-split",
            )
        val_desc = val.describe()
    device = resolve_device(opts.device)
    tdict = dict(opts.train)
    tdict["precision"] = resolve_precision(tdict.get("precision", "auto"), device)
    cfg = SsrConfig(**tdict)
    arch = register_arch(opts.arch)
    env = D.init_distributed(device)
    try:
        model = load_clip(arch, opts.weights, device, seed=cfg.seed)
        clip_id = clip_identity(model)
        dino, dino_record = None, None
        if "dino" in cfg.affinity:
            from ssr_cli.refine.sources import load_dino_model

            dino, dino_record = load_dino_model(opts.dino_model, opts.dino_weights, device, seed=cfg.seed)
        notices = []
        if model.is_random:
            notices.append(
                "CLIP weights are RANDOM (untrained, --clip-weights random): this run is "
                "meaningless; use it only to smoke-test the pipeline"
            )
        if dino is not None and dino.is_random:
            notices.append("DINO weights are RANDOM (--dino-weights random): the affinity is meaningless")
        layers = resolve_layers(cfg.decoder_layers, len(model.blocks))
        classes = tuple(dataset.vocab.classes)
        dino_id = None
        if dino_record is not None:
            dino_id = {k: v for k, v in dino_record.items() if k != "weights"}
            assert dino is not None
            dino_id["weights"] = dino.source.sha256 if not dino.is_random else f"random:seed={cfg.seed}"
        basis = {
            "stage": STAGE,
            "config": {
                "version": TRAIN_VERSION,
                "train": cfg.result_dict(),
                "clip": clip_id,
                "dino": dino_id,
                "decoder_layers": list(layers),
                "world_size": env.world,
            },
            "upstream": {},
            "inputs": {
                "dataset": dataset.fingerprint(),
                "val": None if val_desc is None else val_desc["fingerprint"],
            },
        }
        fp = fingerprint(basis)
        decision = D.decide_on_main(
            env,
            lambda: prepare_training_run(
                out,
                stage=STAGE,
                basis=basis,
                resume=opts.resume,
                overwrite=opts.overwrite,
                outputs=outputs(),
                final=MODEL_FILE,
            ),
        )
        if decision == "done":
            if env.is_main:
                info(
                    f"train: {out} already holds this trained model; nothing to do (--overwrite trains again)"
                )
            return read_manifest(out)
        resume_state = None
        if decision == "resume":
            resume_state = load_checkpoint_file(out / CHECKPOINT)
            if resume_state.get("fingerprint") != fp:
                raise ArtefactError(
                    "checkpoints/last.pt belongs to another run",
                    path=out,
                    hint="start again with --overwrite",
                )
            if env.is_main:
                info(f"train: resuming {out} at iteration {resume_state['iteration']} of {cfg.iters}")
        weights_path = model.weights_source.path
        decoder_cfg = DecoderConfig(
            num_classes=len(classes) + 1,
            width=int(model.width),
            layers=layers,
            dim=cfg.decoder_dim,
            convs=cfg.decoder_convs,
            class_names=("background", *classes),
            clip={
                "arch": arch,
                "arch_option": str(absolute(opts.arch)) if opts.arch.endswith(".json") else arch,
                "weights_path": None if weights_path is None else str(absolute(weights_path)),
                "seed": cfg.seed,
                "identity": clip_id,
            },
        )
        if model.is_random:
            decoder_cfg.clip["weights_path"] = "random"
        manifest = new_manifest(
            STAGE,
            config={
                "data": str(absolute(opts.data)),
                "layout": dataset.layout,
                "split": dataset.split,
                "labels": opts.labels,
                "vocab": dataset.vocab.name,
                "val_split": opts.val_split,
                "arch": arch,
                "clip_arch_option": opts.arch,
                "weights": opts.weights,
                "dino_model": opts.dino_model,
                "dino_weights": opts.dino_weights,
                "device": str(device),
                "world_size": env.world,
                "train": cfg.to_dict(),
                "decoder": decoder_cfg.to_dict(),
            },
            basis=basis,
            upstream={},
            inputs=locate_inputs(
                {
                    "dataset": dataset.describe(),
                    "val": val_desc,
                    "clip": model.describe(),
                    "dino": dino_record,
                },
                out,
            ),
            item_dir="checkpoints",
            item_suffix=".pt",
            item_count=cfg.iters,
            notices=notices,
            images=len(items),
            model_file=MODEL_FILE,
            heads_file=HEADS_FILE,
            prototypes_file=PROTOTYPES_FILE,
        )
        if env.is_main:
            start_training_manifest(out, manifest, resumed=resume_state is not None)
            for notice in notices:
                warn(notice)
        D.barrier(env)
        if env.is_main:
            info(
                f"train: single-stage SSR on {len(items)} images, {len(classes)} classes, CLIP {arch}, "
                f"affinity {cfg.affinity}, mask {cfg.mask}, gamma {cfg.gamma:g}, {cfg.iters} iterations on "
                f"{device} x{env.world}, precision {cfg.precision}"
            )
        heads, protos, decoder, summary = train(
            out,
            model,
            dino,
            items,
            val_samples,
            dataset.vocab,
            cfg,
            decoder_cfg,
            env,
            resume=resume_state,
            run_fingerprint=fp,
            clip_id=clip_id,
        )
        if env.is_main:
            extra = {"iteration": cfg.iters, "fingerprint": fp}
            save_decoder(out, decoder, extra)
            save_heads(out / HEADS_FILE, heads, clip_id, extra | {"temperature": heads.temperature})
            meta = {
                "classes": json.dumps(list(classes)),
                "background": json.dumps(list(dataset.vocab.background)),
                "refreshed_at": str(protos.iteration),
                "fingerprint": fp,
            }
            save_prototypes(out / PROTOTYPES_FILE, protos, meta)
        finish_training_manifest(out, manifest, iters=cfg.iters, summary=summary, write=env.is_main)
        D.barrier(env)
        return manifest
    finally:
        if torch.distributed.is_available():
            D.shutdown(env)
