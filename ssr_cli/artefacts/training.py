"""Run folders of training stages (train-cmpa, fit-seg): one run, checkpointed, resumable.

Unlike per-item stages, a training run is resumed only on request (``--resume``,
crash recovery) and never with different settings, not even a different
``--iters`` (resume is not "train longer").
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssr_cli.artefacts.atomic import remove_stale_temps
from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.artefacts.manifest_file import (
    KNOWN_EXTRAS,
    MANIFEST,
    changed_keys,
    now_utc,
    read_manifest,
    read_old_manifest,
    write_manifest,
)
from ssr_cli.errors import ArtefactError, ConfigError


def prepare_training_run(
    out: Path,
    *,
    stage: str,
    basis: dict[str, Any],
    resume: bool,
    overwrite: bool,
    outputs: Sequence[str],
    final: str,
    checkpoint: str = "checkpoints/last.pt",
) -> str:
    """Check ``out`` against the new run; returns "fresh", "resume" or "done".

    ``basis`` is the fingerprint basis (its ``config.train.iters`` is compared on
    resume); ``outputs`` are the files/folders the stage writes (removed with
    ``overwrite``); ``final`` is the file whose presence with a completed manifest
    means the run is done. Refuses a different run without ``overwrite``, an
    interrupted run without ``resume``, and ``resume`` with a different ``--iters``.
    """
    fp = fingerprint(basis)
    old = read_old_manifest(out, stage=stage, overwrite=overwrite, known=[*outputs, *KNOWN_EXTRAS])
    if old is not None and not overwrite and old.get("fingerprint") != fp:
        old_iters = old.get("fingerprint_basis", {}).get("config", {}).get("train", {}).get("iters")
        new_iters = basis["config"]["train"]["iters"]
        if resume and old_iters is not None and old_iters != new_iters:
            raise ConfigError(
                f"--resume continues an interrupted run exactly: --iters {new_iters} differs from "
                f"the run's {old_iters}",
                hint=f"resume with --iters {old_iters}; to train longer, start a new run in another folder",
            )
        changed = changed_keys(old.get("fingerprint_basis", {}), basis)
        what = "--resume needs the same settings as the interrupted run" if resume else f"holds a {stage} run"
        raise ArtefactError(
            f"{what} made with different settings or inputs (changed: {', '.join(changed[:6]) or 'unknown'})",
            path=out / MANIFEST,
            hint="pass --overwrite to replace it, or choose a new output folder",
        )
    if old is not None and overwrite:
        for name in (*outputs, MANIFEST):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        old = None
    if old is None:
        return "fresh"
    if old.get("completed") and (out / final).is_file():
        return "done"
    if (out / checkpoint).is_file():
        if not resume:
            raise ArtefactError(
                f"holds an interrupted {stage} run with the same settings",
                path=out,
                hint=f"pass --resume to continue it from {checkpoint}, or --overwrite to start again",
            )
        return "resume"
    return "fresh"  # stopped before the first checkpoint: nothing to keep


def start_training_manifest(out: Path, manifest: dict[str, Any], *, resumed: bool) -> None:
    """Write the manifest of a training run that starts (main process only): a resumed run
    keeps its creation time and the timing of its earlier attempts; stale temporary files of
    an interrupted write go."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed:
        old = read_manifest(out)
        manifest["created"] = old.get("created", manifest["created"])
        manifest["timing"] = old.get("timing", {})
    remove_stale_temps(out)
    write_manifest(out, manifest)


def finish_training_manifest(
    out: Path, manifest: dict[str, Any], *, iters: int, summary: dict[str, Any], write: bool
) -> dict[str, Any]:
    """Mark a training run complete with its summary and this attempt's timing; ``write`` on the
    main process only (every rank returns the same manifest)."""
    manifest["items_done"] = iters
    manifest["completed"] = True
    manifest["summary"] = summary
    manifest["timing"].setdefault("runs", []).append(
        {"from_iteration": summary["resumed_from"], "seconds": summary["seconds"], "finished": now_utc()}
    )
    if write:
        write_manifest(out, manifest)
    return manifest
