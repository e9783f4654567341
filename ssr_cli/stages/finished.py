"""What a command says after its stage ran: the run's state, fingerprint and notices.

Shared by ``make-seeds`` and ``refine``. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssr_cli.artefacts.quick import remember
from ssr_cli.console import info


def run_state(manifest: dict[str, Any]) -> str:
    """``complete``, or ``done/total done`` for a run that is not yet."""
    return "complete" if manifest["completed"] else f"{manifest['items_done']}/{manifest['item_count']} done"


def report_finished(command: str, out: Path, manifest: dict[str, Any], key: str | None) -> None:
    """Remember the quick rerun key ``key`` of a complete run (``artefacts/quick.py``), then one
    line on the run folder ``out`` and one per notice of its manifest."""
    if manifest["completed"] and key is not None:
        remember(out, key)
    info(f"{command}: {out} ({run_state(manifest)}, fingerprint {manifest['fingerprint']})")
    for notice in manifest.get("notices", []):
        info(f"[yellow]note:[/yellow] {notice}")
