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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssr_cli.artefacts import fingerprint
from ssr_cli.console import info
from ssr_cli.stages.training_common import (
    ClipTrainingOptions,
    RunKind,
    begin_run,
    dataset_config,
    distributed,
    finish_run,
    labelled_items,
    save_cmpa_outputs,
    start_run,
    train_config,
    training_manifest,
)

STAGE = "cmpa"
CMPA_VERSION = "cmpa-1"  # bump when the training computation changes results


@dataclass
class CmpaOptions(ClipTrainingOptions):
    """Everything ``ssr train-cmpa`` takes (plain values, no torch); ``train``: CmpaConfig fields."""


def run_files() -> tuple[tuple[str, ...], str]:
    """(the files and folders a run writes, the heads file of a complete run)."""
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE

    return ("checkpoints", "log.jsonl", HEADS_FILE, PROTOTYPES_FILE), HEADS_FILE


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by train-cmpa, on the CPU."""
    from ssr_cli.train.state import load_training_state

    return load_training_state(
        path, stage="train-cmpa", keys=("heads", "prototypes"), hint="start again with --overwrite"
    )


RUN_KIND = RunKind(STAGE, "train-cmpa", "these trained heads", run_files, load_checkpoint_file)


def run(opts: CmpaOptions) -> dict[str, Any]:
    """Train CMPA heads as ``opts`` says; returns the final manifest (on every rank)."""
    from ssr_cli.cmpa.train import CmpaConfig, train
    from ssr_cli.data import open_dataset
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE, clip_identity
    from ssr_cli.runtime import resolve_device

    out = Path(opts.out)
    dataset = open_dataset(
        opts.data, layout=opts.layout, split=opts.split, labels=opts.labels, vocab=opts.vocab
    )
    items = labelled_items(dataset)
    device = resolve_device(opts.device)
    cfg = train_config(CmpaConfig, opts.train, device)
    arch = register_arch(opts.arch)
    with distributed(device) as env:
        model = load_clip(arch, opts.weights, device, seed=cfg.seed)
        clip_id = clip_identity(model)
        notices = []
        if model.is_random:
            notices.append(
                "CLIP weights are RANDOM (untrained, --clip-weights random): these heads are "
                "meaningless; use them only to smoke-test the pipeline"
            )
        basis = run_basis(cfg, clip_id, env.world, dataset)
        fp = fingerprint(basis)
        start = begin_run(RUN_KIND, env, opts, basis, iters=cfg.iters)
        if start.done is not None:
            return start.done
        config = manifest_config(opts, dataset, arch=arch, device=device, world=env.world, cfg=cfg)
        manifest = training_manifest(
            STAGE,
            out,
            config=config,
            basis=basis,
            upstream={},
            inputs={"dataset": dataset.describe(), "clip": model.describe()},
            iters=cfg.iters,
            notices=notices,
            images=len(items),
            heads_file=HEADS_FILE,
            prototypes_file=PROTOTYPES_FILE,
        )
        start_run(env, out, manifest, resumed=start.resume_state is not None, notices=notices)
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
            resume=start.resume_state,
            run_fingerprint=fp,
            clip_id=clip_id,
        )
        if env.is_main:
            extra = {"iteration": cfg.iters, "fingerprint": fp}
            save_cmpa_outputs(out, heads, protos, clip_id=clip_id, vocab=dataset.vocab, extra=extra)
        return finish_run(env, out, manifest, iters=cfg.iters, summary=summary)


def run_basis(cfg: Any, clip_id: dict[str, Any], world: int, dataset: Any) -> dict[str, Any]:
    """What the run's fingerprint hashes: the settings that change results, the CLIP identity,
    the number of processes and the dataset's fingerprint."""
    return {
        "stage": STAGE,
        "config": {
            "version": CMPA_VERSION,
            "train": cfg.result_dict(),
            "clip": clip_id,
            "world_size": world,
        },
        "upstream": {},
        "inputs": {"dataset": dataset.fingerprint()},
    }


def manifest_config(
    opts: CmpaOptions, dataset: Any, *, arch: str, device: Any, world: int, cfg: Any
) -> dict[str, Any]:
    """The ``config`` of the run's manifest: the options as resolved."""
    return {
        **dataset_config(opts, dataset),
        "arch": arch,
        "clip_arch_option": opts.arch,
        "weights": opts.weights,
        "device": str(device),
        "world_size": world,
        "train": cfg.to_dict(),
    }
