"""The dataset and vocabulary a run recorded in its manifest (``inputs.dataset``), opened again.

A run folder must work from any directory: the dataset root is looked up as recorded
(absolute, then relative to the run folder; see ``artefacts/paths.py``), and the class
names come from the recorded vocabulary, never from a default one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssr_cli.artefacts.paths import recorded_candidates, recorded_path
from ssr_cli.data.vocab import Vocabulary, VocabularyError, builtin_vocabulary
from ssr_cli.errors import DataError

__all__ = ["open_recorded_dataset", "recorded_root", "recorded_vocabulary"]


def recorded_vocabulary(info: dict[str, Any]) -> Vocabulary | None:
    """The vocabulary recorded in a manifest's dataset entry (``vocab_spec``, or a built-in
    ``vocab`` name); None when the manifest does not say (older runs of a custom vocabulary)."""
    spec = info.get("vocab_spec")
    name = info.get("vocab")
    if isinstance(spec, dict):
        try:
            return Vocabulary.from_dict(spec, default_name=str(name or "custom"))
        except VocabularyError:
            pass
    if name in ("voc", "coco"):
        return builtin_vocabulary(str(name))
    return None


def recorded_root(info: dict[str, Any], run_root: str | Path) -> Path:
    """Where the recorded dataset root is now; a one-line DataError naming the places tried."""
    found = recorded_path(info, run_root)
    if found is not None:
        return found
    tried = recorded_candidates(info, run_root) or [Path(str(info.get("root")))]
    raise DataError(
        "the dataset this run was made on is not found (looked in " + ", ".join(str(p) for p in tried) + ")",
        path=Path(run_root) / "manifest.json",
        hint="pass --data ROOT (and --split) of the dataset",
    )


def open_recorded_dataset(info: dict[str, Any], run_root: str | Path, *, labels: str = "none") -> Any:
    """``open_dataset`` on the dataset recorded in ``info`` (root, layout, split, vocabulary)."""
    from ssr_cli.data.datasets import open_dataset

    root = recorded_root(info, run_root)
    layout = info.get("layout")
    split = info.get("split")
    return open_dataset(
        root,
        layout=layout if isinstance(layout, str) else "auto",
        split=split if isinstance(split, str) else None,
        labels=labels,
        vocab=recorded_vocabulary(info),
    )
