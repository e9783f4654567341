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
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ssr_cli import __version__
from ssr_cli.artefacts import MANIFEST, atomic_write_json, fingerprint, read_manifest
from ssr_cli.artefacts.atomic import remove_stale_temps
from ssr_cli.artefacts.run import SCHEMA_VERSION
from ssr_cli.console import info, warn
from ssr_cli.errors import ArtefactError, ConfigError, SSRError, WeightsError

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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(set(old) | set(new))
            for k in _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".") or "(value)"]


def prepare_run(out: Path, basis: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Check ``out`` against the new run: "fresh", "resume" or "done" (may clear the folder).

    Refuses a different run without --overwrite, an interrupted run without --resume,
    and --resume with a different --iters (resume is crash recovery, not training longer).
    """
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE

    fp = fingerprint(basis)
    old = None
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.get("stage") != STAGE:
            raise ArtefactError(f"this folder holds a '{old.get('stage')}' run, not '{STAGE}'", path=out,
                                hint="choose another output folder")  # fmt: skip
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtefactError("output folder is not empty and is not an ssr run folder", path=out,
                            hint="choose a new or empty folder; nothing in it was touched")  # fmt: skip
    if old is not None and not overwrite and old.get("fingerprint") != fp:
        old_iters = old.get("fingerprint_basis", {}).get("config", {}).get("train", {}).get("iters")
        new_iters = basis["config"]["train"]["iters"]
        if resume and old_iters is not None and old_iters != new_iters:
            raise ConfigError(
                f"--resume continues an interrupted run exactly: --iters {new_iters} differs from "
                f"the run's {old_iters}",
                hint=f"resume with --iters {old_iters}; to train longer, start a new run in another folder",
            )
        changed = _diff(old.get("fingerprint_basis", {}), basis)
        what = (
            "--resume needs the same settings as the interrupted run" if resume else "holds a train-cmpa run"
        )
        raise ArtefactError(
            f"{what} made with different settings or inputs (changed: {', '.join(changed[:6]) or 'unknown'})",
            path=out / MANIFEST,
            hint="pass --overwrite to replace it, or choose a new output folder",
        )
    if old is not None and overwrite:
        for name in ("checkpoints", "log.jsonl", HEADS_FILE, PROTOTYPES_FILE, MANIFEST):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        old = None
    if old is None:
        return "fresh"
    if old.get("completed") and (out / HEADS_FILE).is_file():
        return "done"
    if (out / CHECKPOINT).is_file():
        if not resume:
            raise ArtefactError(
                "holds an interrupted train-cmpa run with the same settings", path=out,
                hint="pass --resume to continue it from checkpoints/last.pt, or --overwrite to start again",
            )  # fmt: skip
        return "resume"
    return "fresh"  # stopped before the first checkpoint: nothing to keep


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by train-cmpa, on the CPU (``weights_only``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        text = " ".join(str(exc).split())[:200]
        raise WeightsError(f"cannot read checkpoint ({type(exc).__name__}: {text})", path=path,
                           hint="start again with --overwrite") from None  # fmt: skip
    if not isinstance(state, dict) or "heads" not in state or "prototypes" not in state:
        raise WeightsError("not a train-cmpa checkpoint", path=path, hint="start again with --overwrite")
    return state


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    atomic_write_json(out / MANIFEST, manifest)


def run(opts: CmpaOptions) -> dict[str, Any]:
    """Train CMPA heads as ``opts`` says; returns the final manifest (on every rank)."""
    import torch

    from ssr_cli.cmpa.data import TrainItem
    from ssr_cli.cmpa.prototypes import save_prototypes
    from ssr_cli.cmpa.train import CmpaConfig, train
    from ssr_cli.data import open_dataset
    from ssr_cli.models.clip import load_clip
    from ssr_cli.models.cmpa import HEADS_FILE, PROTOTYPES_FILE, clip_identity, save_heads
    from ssr_cli.runtime import resolve_device, resolve_precision
    from ssr_cli.seg import distributed as D
    from ssr_cli.stages.make_seeds import register_arch

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
            notices.append("CLIP weights are RANDOM (untrained, --clip-weights random): these heads are "
                           "meaningless; use them only to smoke-test the pipeline")  # fmt: skip
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
        decision: Any = None
        if env.is_main:
            try:
                decision = prepare_run(out, basis, opts.resume, opts.overwrite)
            except SSRError as exc:
                decision = exc
        decision = D.broadcast_object(env, decision)
        if isinstance(decision, SSRError):
            raise decision
        if decision == "done":
            if env.is_main:
                info(f"train-cmpa: {out} already holds these trained heads; nothing to do "
                     "(--overwrite trains again)")  # fmt: skip
            return read_manifest(out)
        resume_state = None
        if decision == "resume":
            resume_state = load_checkpoint(out / CHECKPOINT)
            if resume_state.get("fingerprint") != fp:
                raise ArtefactError("checkpoints/last.pt belongs to another run", path=out,
                                    hint="start again with --overwrite")  # fmt: skip
            if env.is_main:
                info(f"train-cmpa: resuming {out} at iteration {resume_state['iteration']} of {cfg.iters}")
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "tool": "ssr-cli", "tool_version": __version__, "stage": STAGE,
            "created": _now(), "updated": _now(), "host": socket.gethostname(),
            "config": {
                "data": str(opts.data), "layout": dataset.layout, "split": dataset.split,
                "labels": opts.labels, "vocab": dataset.vocab.name, "arch": arch,
                "clip_arch_option": opts.arch, "weights": opts.weights, "device": str(device),
                "world_size": env.world, "train": cfg.to_dict(),
            },
            "fingerprint_basis": basis, "fingerprint": fp, "upstream": {},
            "inputs": {"dataset": dataset.describe(), "clip": model.describe()},
            "item_dir": "checkpoints", "item_suffix": ".pt", "item_count": cfg.iters, "items_done": 0,
            "completed": False, "notices": notices, "timing": {}, "images": len(items),
            "heads_file": HEADS_FILE, "prototypes_file": PROTOTYPES_FILE,
        }  # fmt: skip
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if resume_state is not None:
                old = read_manifest(out)
                manifest["created"] = old.get("created", manifest["created"])
                manifest["timing"] = old.get("timing", {})
            remove_stale_temps(out)
            _write_manifest(out, manifest)
            for notice in notices:
                warn(notice)
        D.barrier(env)
        if env.is_main:
            info(f"train-cmpa: {len(items)} images, {len(dataset.vocab.classes)} classes, CLIP {arch}, "
                 f"d2 {cfg.dim}, {cfg.iters} iterations on {device} x{env.world}, "
                 f"precision {cfg.precision}")  # fmt: skip
        heads, protos, summary = train(out, model, items, dataset.vocab, cfg, env, resume=resume_state,
                                       run_fingerprint=fp, clip_id=clip_id)  # fmt: skip
        if env.is_main:
            extra = {"iteration": cfg.iters, "fingerprint": fp, "temperature": heads.temperature}
            save_heads(out / HEADS_FILE, heads, clip_id, extra)
            meta = {"classes": json.dumps(list(dataset.vocab.classes)),
                    "background": json.dumps(list(dataset.vocab.background)),
                    "refreshed_at": str(protos.iteration), "fingerprint": fp}  # fmt: skip
            save_prototypes(out / PROTOTYPES_FILE, protos, meta)
        manifest["items_done"] = cfg.iters
        manifest["completed"] = True
        manifest["summary"] = summary
        manifest["timing"].setdefault("runs", []).append(
            {"from_iteration": summary["resumed_from"], "seconds": summary["seconds"], "finished": _now()}
        )
        if env.is_main:
            _write_manifest(out, manifest)
        D.barrier(env)
        return manifest
    finally:
        if torch.distributed.is_available():
            D.shutdown(env)
