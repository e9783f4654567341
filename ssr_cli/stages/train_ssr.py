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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssr_cli.artefacts import fingerprint
from ssr_cli.artefacts.paths import absolute
from ssr_cli.console import info
from ssr_cli.stages import training_common as common

STAGE = "train"
TRAIN_VERSION = "ssr-train-1"  # bump when the training computation changes results


@dataclass
class TrainOptions(common.ClipTrainingOptions):
    """Everything ``ssr train`` takes (plain values, no torch); ``train``: SsrConfig fields."""

    val_split: str | None = None
    dino_model: str = "dino_vitb16"
    dino_weights: str | None = None


def output_files() -> dict[str, str]:
    """The manifest's names of the run's weight files."""
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE
    from ssr_cli.onestage.decoder import MODEL_FILE

    return {"model_file": MODEL_FILE, "heads_file": HEADS_FILE, "prototypes_file": PROTOTYPES_FILE}


def run_files() -> tuple[tuple[str, ...], str]:
    """(the files and folders a run writes, the decoder file of a complete run)."""
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE
    from ssr_cli.onestage.decoder import MODEL_FILE

    return ("checkpoints", "log.jsonl", "tensorboard", MODEL_FILE, HEADS_FILE, PROTOTYPES_FILE), MODEL_FILE


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by ``ssr train``, on the CPU."""
    from ssr_cli.train.state import load_training_state

    return load_training_state(
        path, stage="train", keys=("heads", "decoder", "prototypes"), hint="start again with --overwrite"
    )


RUN_KIND = common.RunKind(STAGE, "train", "this trained model", run_files, load_checkpoint_file)


def run(opts: TrainOptions) -> dict[str, Any]:
    """Train single-stage SSR as ``opts`` says; returns the final manifest (on every rank)."""
    from ssr_cli.models.clip import load_clip, register_arch
    from ssr_cli.models.cmpa import clip_identity
    from ssr_cli.onestage.config import SsrConfig
    from ssr_cli.onestage.decoder import resolve_layers
    from ssr_cli.onestage.train import save_decoder, train
    from ssr_cli.runtime import resolve_device

    out = Path(opts.out)
    dataset, items, val_samples, val_desc = open_inputs(opts)
    device = resolve_device(opts.device)
    cfg = common.train_config(SsrConfig, opts.train, device)
    arch = register_arch(opts.arch)
    with common.distributed(device) as env:
        model = load_clip(arch, opts.weights, device, seed=cfg.seed)
        clip_id = clip_identity(model)
        dino, dino_record = load_dino(opts, cfg, device)
        notices = random_weights_notices(model, dino)
        layers = resolve_layers(cfg.decoder_layers, len(model.blocks))
        dino_id = dino_identity(dino, dino_record, cfg.seed)
        basis = run_basis(
            cfg, clip_id, dino_id, layers, env.world, common.input_fingerprints(dataset, val_desc)
        )
        fp = fingerprint(basis)
        start = common.begin_run(RUN_KIND, env, opts, basis, iters=cfg.iters)
        if start.done is not None:
            return start.done
        decoder_cfg = decoder_config(opts, arch, model, clip_id, cfg, layers, dataset.vocab.classes)
        config = manifest_config(opts, dataset, cfg, decoder_cfg, arch=arch, device=device, world=env.world)
        manifest = common.training_manifest(
            STAGE,
            out,
            config=config,
            basis=basis,
            upstream={},
            inputs={
                "dataset": dataset.describe(),
                "val": val_desc,
                "clip": model.describe(),
                "dino": dino_record,
            },
            iters=cfg.iters,
            notices=notices,
            images=len(items),
            **output_files(),
        )
        common.start_run(env, out, manifest, resumed=start.resume_state is not None, notices=notices)
        if env.is_main:
            info(
                f"train: single-stage SSR on {len(items)} images, {len(dataset.vocab.classes)} classes, "
                f"CLIP {arch}, affinity {cfg.affinity}, mask {cfg.mask}, gamma {cfg.gamma:g}, {cfg.iters} "
                f"iterations on {device} x{env.world}, precision {cfg.precision}"
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
            resume=start.resume_state,
            run_fingerprint=fp,
            clip_id=clip_id,
        )
        if env.is_main:
            extra = {"iteration": cfg.iters, "fingerprint": fp}
            save_decoder(out, decoder, extra)
            common.save_cmpa_outputs(out, heads, protos, clip_id=clip_id, vocab=dataset.vocab, extra=extra)
        return common.finish_run(env, out, manifest, iters=cfg.iters, summary=summary)


def open_inputs(opts: TrainOptions) -> tuple[Any, list[Any], list[Any], dict[str, Any] | None]:
    """(dataset, its labelled training items, validation samples, the validation split's
    description) of ``opts``."""
    from ssr_cli.data import open_dataset

    dataset = open_dataset(
        opts.data, layout=opts.layout, split=opts.split, labels=opts.labels, vocab=opts.vocab
    )
    items = common.labelled_items(dataset)
    val_samples, val_desc = common.validation_samples(
        opts.data, layout=opts.layout, split=opts.val_split, vocab=opts.vocab, hint="drop --val-split"
    )
    return dataset, items, val_samples, val_desc


def load_dino(opts: TrainOptions, cfg: Any, device: Any) -> tuple[Any, dict[str, Any] | None]:
    """(DINO model, its record) for the affinity of ``cfg``; (None, None) when it reads no DINO."""
    if "dino" not in cfg.affinity:
        return None, None
    from ssr_cli.refine.sources import load_dino_model

    return load_dino_model(opts.dino_model, opts.dino_weights, device, seed=cfg.seed)


def random_weights_notices(model: Any, dino: Any) -> list[str]:
    """The manifest's notices of a run on RANDOM (untrained) CLIP or DINO weights."""
    notices = []
    if model.is_random:
        notices.append(
            "CLIP weights are RANDOM (untrained, --clip-weights random): this run is "
            "meaningless; use it only to smoke-test the pipeline"
        )
    if dino is not None and dino.is_random:
        notices.append("DINO weights are RANDOM (--dino-weights random): the affinity is meaningless")
    return notices


def dino_identity(dino: Any, dino_record: dict[str, Any] | None, seed: int) -> dict[str, Any] | None:
    """What the fingerprint records of the DINO model: its record with the weights' SHA-256 (or
    the seed of random weights) in place of their path; None without DINO."""
    if dino_record is None:
        return None
    dino_id = {k: v for k, v in dino_record.items() if k != "weights"}
    assert dino is not None
    dino_id["weights"] = dino.source.sha256 if not dino.is_random else f"random:seed={seed}"
    return dino_id


def run_basis(
    cfg: Any,
    clip_id: dict[str, Any],
    dino_id: dict[str, Any] | None,
    layers: Any,
    world: int,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """What the run's fingerprint hashes: the settings that change results, the CLIP and DINO
    identities, the decoder's CLIP blocks, the number of processes and the ``inputs``."""
    return {
        "stage": STAGE,
        "config": {
            "version": TRAIN_VERSION,
            "train": cfg.result_dict(),
            "clip": clip_id,
            "dino": dino_id,
            "decoder_layers": list(layers),
            "world_size": world,
        },
        "upstream": {},
        "inputs": inputs,
    }


def decoder_config(
    opts: TrainOptions, arch: str, model: Any, clip_id: dict[str, Any], cfg: Any, layers: Any, classes: Any
) -> Any:
    """The segmentation decoder's config: its shape (``layers``: the CLIP blocks it reads), its
    ``classes`` and the CLIP it reads (``arch`` as registered, ``clip_id`` its identity)."""
    from ssr_cli.onestage.decoder import DecoderConfig

    classes = tuple(classes)
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
    return decoder_cfg


def manifest_config(
    opts: TrainOptions, dataset: Any, cfg: Any, decoder_cfg: Any, *, arch: str, device: Any, world: int
) -> dict[str, Any]:
    """The ``config`` of the run's manifest: the options as resolved, the decoder's config."""
    return {
        **common.dataset_config(opts, dataset),
        "val_split": opts.val_split,
        "arch": arch,
        "clip_arch_option": opts.arch,
        "weights": opts.weights,
        "dino_model": opts.dino_model,
        "dino_weights": opts.dino_weights,
        "device": str(device),
        "world_size": world,
        "train": cfg.to_dict(),
        "decoder": decoder_cfg.to_dict(),
    }
