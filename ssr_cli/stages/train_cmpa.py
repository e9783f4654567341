"""Stage ``train-cmpa``: train the CMPA heads (ISA, TSA) and prototypes on a labelled split.

Run folder::

    RUN/
      manifest.json            stage "cmpa", config, fingerprint, completion, summary
      heads.safetensors        ISA/TSA/temperature weights; metadata: head config + CLIP identity
      prototypes.safetensors   image [K, M, d2], text [K, d2], background [B, d2], valid, counts
      checkpoints/last.pt      full training state every --save-every iterations (atomic)
      log.jsonl                one record per logging step (+ prototype refreshes, sync checks)

The fingerprint covers the settings that change results, the CLIP identity (architecture,
QuickGELU, weights SHA-256) and the dataset's fingerprint. ``ssr make-seeds --cmpa RUN``
reads ``heads.safetensors`` and records this fingerprint upstream.

``--resume`` is crash recovery: it continues an interrupted run with the same settings
from ``last.pt``, exactly as if it had not stopped. It does not train longer: a
different ``--iters`` is refused.

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
from ssr_cli.errors import ArtefactError

STAGE = "cmpa"
CMPA_VERSION = "cmpa-1"  # bump when the training computation changes results
CHECKPOINT = Path("checkpoints") / "last.pt"


@dataclass
class CmpaOptions:
    """Everything ``ssr train-cmpa`` takes (plain values, no torch)."""

    data: Path
    out: Path
    layout: str = "auto"
    split: str | None = None
    labels: str = "auto"
    vocab: str | None = None
    arch: str = "ViT-B-16"
    weights: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # CmpaConfig fields


def prepare_run(out: Path, basis: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Check ``out`` against the new run: "fresh", "resume" or "done" (may clear the folder).

    Refuses a different run without --overwrite, an interrupted run without --resume,
    and --resume with a different --iters (resume is crash recovery, not training longer).
    """
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE

    return prepare_training_run(
        out,
        stage=STAGE,
        basis=basis,
        resume=resume,
        overwrite=overwrite,
        outputs=("checkpoints", "log.jsonl", HEADS_FILE, PROTOTYPES_FILE),
        final=HEADS_FILE,
    )


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by train-cmpa, on the CPU."""
    from ssr_cli.train.state import load_training_state

    return load_training_state(
        path, stage="train-cmpa", keys=("heads", "prototypes"), hint="start again with --overwrite"
    )


def run(opts: CmpaOptions) -> dict[str, Any]:
    """Train CMPA heads as ``opts`` says; returns the final manifest (on every rank)."""
    import torch

    from ssr_cli.cmpa.data import TrainItem
    from ssr_cli.cmpa.prototypes import save_prototypes
    from ssr_cli.cmpa.train import CmpaConfig, train
    from ssr_cli.data import open_dataset
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE, clip_identity, save_heads
    from ssr_cli.runtime import resolve_device, resolve_precision
    from ssr_cli.train import distributed as D

    out = Path(opts.out)
    dataset = open_dataset(
        opts.data, layout=opts.layout, split=opts.split, labels=opts.labels, vocab=opts.vocab
    )
    items = [TrainItem(i.id, i.image, tuple(c - 1 for c in i.labels)) for i in dataset.items if i.labels]
    if len(items) < len(dataset):
        missing = len(dataset) - len(items)
        warn(f"{missing} of {len(dataset)} images have no image-level label; training without them")
    device = resolve_device(opts.device)
    tdict = dict(opts.train)
    tdict["precision"] = resolve_precision(tdict.get("precision", "auto"), device)
    cfg = CmpaConfig(**tdict)
    arch = register_arch(opts.arch)
    env = D.init_distributed(device)
    try:
        model = load_clip(arch, opts.weights, device, seed=cfg.seed)
        clip_id = clip_identity(model)
        notices = []
        if model.is_random:
            notices.append(
                "CLIP weights are RANDOM (untrained, --clip-weights random): these heads are "
                "meaningless; use them only to smoke-test the pipeline"
            )
        basis = {
            "stage": STAGE,
            "config": {
                "version": CMPA_VERSION,
                "train": cfg.result_dict(),
                "clip": clip_id,
                "world_size": env.world,
            },
            "upstream": {},
            "inputs": {"dataset": dataset.fingerprint()},
        }
        fp = fingerprint(basis)
        decision = D.decide_on_main(env, lambda: prepare_run(out, basis, opts.resume, opts.overwrite))
        if decision == "done":
            if env.is_main:
                info(
                    f"train-cmpa: {out} already holds these trained heads; nothing to do "
                    "(--overwrite trains again)"
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
                info(f"train-cmpa: resuming {out} at iteration {resume_state['iteration']} of {cfg.iters}")
        manifest = new_manifest(
            STAGE,
            config={
                "data": str(absolute(opts.data)),
                "layout": dataset.layout,
                "split": dataset.split,
                "labels": opts.labels,
                "vocab": dataset.vocab.name,
                "arch": arch,
                "clip_arch_option": opts.arch,
                "weights": opts.weights,
                "device": str(device),
                "world_size": env.world,
                "train": cfg.to_dict(),
            },
            basis=basis,
            upstream={},
            inputs=locate_inputs({"dataset": dataset.describe(), "clip": model.describe()}, out),
            item_dir="checkpoints",
            item_suffix=".pt",
            item_count=cfg.iters,
            notices=notices,
            images=len(items),
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
                f"train-cmpa: {len(items)} images, {len(dataset.vocab.classes)} classes, CLIP {arch}, "
                f"d2 {cfg.dim}, {cfg.iters} iterations on {device} x{env.world}, "
                f"precision {cfg.precision}"
            )
        heads, protos, summary = train(
            out,
            model,
            items,
            dataset.vocab,
            cfg,
            env,
            resume=resume_state,
            run_fingerprint=fp,
            clip_id=clip_id,
        )
        if env.is_main:
            extra = {"iteration": cfg.iters, "fingerprint": fp, "temperature": heads.temperature}
            save_heads(out / HEADS_FILE, heads, clip_id, extra)
            meta = {
                "classes": json.dumps(list(dataset.vocab.classes)),
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
