"""What the training stages (``train-cmpa``, ``train``, ``fit-seg``) share.

Their inputs (the labelled images, the validation split), the resolved training config, the
process group, the decision to start, resume or answer a complete run, the run's manifest
from its first write to its completion, and the CMPA heads and prototypes that
``train-cmpa`` and ``train`` both save. Each stage names its kind of run folder once, as a
:class:`RunKind`.

Imports torch only inside its functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssr_cli.artefacts import fingerprint
from ssr_cli.artefacts.paths import absolute, locate_inputs
from ssr_cli.artefacts.run import new_manifest
from ssr_cli.artefacts.training import finish_training_manifest, prepare_training_run, start_training_manifest
from ssr_cli.console import info, warn
from ssr_cli.errors import ArtefactError, DataError

CHECKPOINT = Path("checkpoints") / "last.pt"


@dataclass
class ClipTrainingOptions:
    """What the stages that train on CLIP (train-cmpa, train) take (plain values, no torch): the
    dataset, the CLIP, the device, the run folder's handling and ``train``, the fields of the
    stage's training config."""

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
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunKind:
    """A training stage's kind of run folder: its manifest's ``stage``; ``command`` prefixes its
    log lines, ``what`` a complete one holds; ``files()`` gives (the files and folders a run
    writes, which --overwrite removes; the file whose presence means a complete run: the import
    of its name may need torch); ``load_checkpoint(path)`` reads its ``last.pt``;
    ``log_every_rank``: every process logs, not only the main one."""

    stage: str
    command: str
    what: str
    files: Callable[[], tuple[tuple[str, ...], str]]
    load_checkpoint: Callable[[Path], dict[str, Any]]
    log_every_rank: bool = False

    def prepare(self, out: Path, basis: dict[str, Any], resume: bool, overwrite: bool) -> str:
        """Check ``out`` against the new run: "fresh", "resume" or "done" (may clear the folder).
        Refuses a different run without --overwrite, an interrupted run without --resume, and
        --resume with a different --iters (resume is crash recovery, not training longer)."""
        outputs, final = self.files()
        return prepare_training_run(
            out,
            stage=self.stage,
            basis=basis,
            resume=resume,
            overwrite=overwrite,
            outputs=outputs,
            final=final,
        )


def labelled_items(dataset: Any) -> list[Any]:
    """The images of ``dataset`` that have image-level labels, as CMPA training items (0-based
    classes); warns about the ones left out."""
    from ssr_cli.cmpa.data import TrainItem

    items = [TrainItem(i.id, i.image, tuple(c - 1 for c in i.labels)) for i in dataset.items if i.labels]
    if len(items) < len(dataset):
        missing = len(dataset) - len(items)
        warn(f"{missing} of {len(dataset)} images have no image-level label; training without them")
    return items


def validation_samples(
    data: Path,
    *,
    layout: str,
    split: str | None,
    vocab: str | None,
    hint: str,
    gt: Path | None = None,
    warn_partial: bool = False,
) -> tuple[list[Any], dict[str, Any] | None]:
    """(samples with a ground-truth mask, the split's description) of ``--val-split``; ([], None)
    without one. No image with a mask is an error (``hint`` says what to do); ``warn_partial``
    says when only some of them have one."""
    from ssr_cli.data import open_dataset
    from ssr_cli.seg.data import Sample

    if not split:
        return [], None
    val = open_dataset(data, layout=layout, split=split, labels="none", vocab=vocab, gt=gt)
    samples = [Sample(i.id, i.image, i.gt) for i in val.items if i.gt is not None]
    if not samples:
        raise DataError(
            f"none of the {len(val)} images of --val-split {split} has a ground-truth mask",
            path=val.root,
            hint=hint,
        )
    if warn_partial and len(samples) < len(val):  # partial ground truth: validate on the images that have it
        warn(
            f"validating on the {len(samples)} of {len(val)} images of split {split} "
            "that have a ground-truth mask"
        )
    return samples, val.describe()


def input_fingerprints(dataset: Any, val_desc: dict[str, Any] | None) -> dict[str, Any]:
    """The ``inputs`` of a fingerprint basis: the training dataset's and the validation split's."""
    return {
        "dataset": dataset.fingerprint(),
        "val": None if val_desc is None else val_desc["fingerprint"],
    }


def train_config(config_cls: Callable[..., Any], train: dict[str, Any], device: Any) -> Any:
    """``config_cls(**train)`` with ``precision`` "auto" resolved for ``device``."""
    from ssr_cli.runtime import resolve_precision

    tdict = dict(train)
    tdict["precision"] = resolve_precision(tdict.get("precision", "auto"), device)
    return config_cls(**tdict)


@contextmanager
def distributed(device: Any) -> Iterator[Any]:
    """The process group of this run (torchrun's, or a single process): its ``DistEnv``, shut
    down on the way out."""
    import torch

    from ssr_cli.train import distributed as D

    env = D.init_distributed(device)
    try:
        yield env
    finally:
        if torch.distributed.is_available():
            D.shutdown(env)


@dataclass
class RunStart:
    """How a training run begins: ``done`` is the manifest of a complete run (nothing to do),
    else ``resume_state`` is the state of ``checkpoints/last.pt`` to continue from (None: from
    the start)."""

    done: dict[str, Any] | None = None
    resume_state: dict[str, Any] | None = None


def begin_run(kind: RunKind, env: Any, opts: Any, basis: dict[str, Any], *, iters: int) -> RunStart:
    """Decide on the main process how the run of ``kind`` in ``opts.out`` begins (``opts``: a
    stage's options, with ``out``, ``resume`` and ``overwrite``), and say so; a checkpoint of
    another run is refused."""
    from ssr_cli.artefacts import read_manifest
    from ssr_cli.train import distributed as D

    out = Path(opts.out)
    log = info if (kind.log_every_rank or env.is_main) else _silent
    decision = D.decide_on_main(env, lambda: kind.prepare(out, basis, opts.resume, opts.overwrite))
    if decision == "done":
        log(f"{kind.command}: {out} already holds {kind.what}; nothing to do (--overwrite trains again)")
        return RunStart(done=read_manifest(out))
    if decision != "resume":
        return RunStart()
    state = kind.load_checkpoint(out / CHECKPOINT)
    if state.get("fingerprint") != fingerprint(basis):
        raise ArtefactError(
            "checkpoints/last.pt belongs to another run",
            path=out,
            hint="start again with --overwrite",
        )
    log(f"{kind.command}: resuming {out} at iteration {state['iteration']} of {iters}")
    return RunStart(resume_state=state)


def _silent(message: str) -> None:
    """The log of a process that does not log."""


def training_manifest(
    stage: str,
    out: Path,
    *,
    config: dict[str, Any],
    basis: dict[str, Any],
    upstream: dict[str, Any],
    inputs: dict[str, Any],
    iters: int,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a training run in ``out``: ``iters`` checkpointed steps; ``inputs`` are
    located relative to ``out``; ``extra`` are the stage's own keys (and ``notices``)."""
    return new_manifest(
        stage,
        config=config,
        basis=basis,
        upstream=upstream,
        inputs=locate_inputs(inputs, out),
        item_dir="checkpoints",
        item_suffix=".pt",
        item_count=iters,
        **extra,
    )


def dataset_config(opts: ClipTrainingOptions, dataset: Any) -> dict[str, Any]:
    """The dataset part of the ``config`` of a CLIP training run's manifest: the data folder, its
    layout, split, label source and vocabulary."""
    return {
        "data": str(absolute(opts.data)),
        "layout": dataset.layout,
        "split": dataset.split,
        "labels": opts.labels,
        "vocab": dataset.vocab.name,
    }


def start_run(
    env: Any, out: Path, manifest: dict[str, Any], *, resumed: bool, notices: Iterable[str] = ()
) -> None:
    """Write the manifest of the starting run and show its ``notices`` (main process), then wait
    for every process."""
    from ssr_cli.train import distributed as D

    if env.is_main:
        start_training_manifest(out, manifest, resumed=resumed)
        for notice in notices:
            warn(notice)
    D.barrier(env)


def finish_run(
    env: Any, out: Path, manifest: dict[str, Any], *, iters: int, summary: dict[str, Any]
) -> dict[str, Any]:
    """Mark the run complete (written by the main process), wait for every process; returns the
    final manifest."""
    from ssr_cli.train import distributed as D

    finish_training_manifest(out, manifest, iters=iters, summary=summary, write=env.is_main)
    D.barrier(env)
    return manifest


def save_cmpa_outputs(
    out: Path, heads: Any, protos: Any, *, clip_id: dict[str, Any], vocab: Any, extra: dict[str, Any]
) -> None:
    """Write the CMPA heads (``extra`` and the learnt temperature in their metadata) and the
    prototypes of the last refresh (the vocabulary and ``extra["fingerprint"]`` in theirs)."""
    from ssr_cli.cmpa.prototypes import save_prototypes
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE, save_heads

    save_heads(out / HEADS_FILE, heads, clip_id, extra | {"temperature": heads.temperature})
    meta = {
        "classes": json.dumps(list(vocab.classes)),
        "background": json.dumps(list(vocab.background)),
        "refreshed_at": str(protos.iteration),
        "fingerprint": extra["fingerprint"],
    }
    save_prototypes(out / PROTOTYPES_FILE, protos, meta)
