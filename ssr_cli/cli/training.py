"""What the training commands (``train-cmpa``, ``train``, ``fit-seg``) share: their stage's
options and training config from their own options, and running their stage then printing its
result line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

ResultLine = Callable[[Path, dict[str, Any]], str]


def option_fields(values: Mapping[str, Any], cls: Any, **given: Any) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` (a stage's options, a training config) from a command's
    option ``values`` of the same names; ``given`` are the fields whose value is not an option's
    (renamed, parsed, derived)."""
    return {f.name: given[f.name] if f.name in given else values[f.name] for f in fields(cls)}


def run_stage(
    stage: Any,
    options_cls: Any,
    values: Mapping[str, Any],
    key: str | None,
    result_line: ResultLine,
    **given: Any,
) -> None:
    """Run a training ``stage`` (its ``run``) on its ``options_cls`` made from the command's option
    ``values`` (and ``given``, see :func:`option_fields`), then remember the quick rerun ``key``
    of the complete run and print its result line (main process)."""
    from ssr_cli.artefacts.quick import finish_training_command

    manifest = stage.run(options_cls(**option_fields(values, options_cls, **given)))
    finish_training_command(values["out"], key, manifest, result_line)


def run_summary(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the final log record, the best validation) of a training run's manifest; {} where absent."""
    summary = manifest.get("summary") or {}
    return summary.get("final") or {}, summary.get("best") or {}
