"""A run folder as the stages downstream see it: one typed view of ``manifest.json`` and one way
to open a run (``open_run``), with one rule for where its items live.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssr_cli.artefacts.manifest_file import MANIFEST, read_manifest
from ssr_cli.errors import ArtefactError

#: where each stage writes its items, for manifests that do not say (older ones)
ITEMS_OF_STAGE: dict[str, tuple[str, str]] = {
    "seeds": ("cams", ".npz"),
    "refine": ("labels", ".png"),
    "predict": ("labels", ".png"),
    "cmpa": ("checkpoints", ".pt"),
    "fit-seg": ("checkpoints", ".pt"),
}
#: what to pass instead, when a run of another stage was given (the stage's output folder)
STAGE_COMMANDS = {
    "seeds": "ssr make-seeds",
    "refine": "ssr refine",
    "predict": "ssr predict",
    "cmpa": "ssr train-cmpa",
    "fit-seg": "ssr fit-seg",
}


@dataclass(frozen=True)
class Manifest:
    """An opened run folder: ``root`` and its manifest ``data`` (``read_manifest`` checked it)."""

    root: Path
    data: dict[str, Any]

    @property
    def manifest(self) -> dict[str, Any]:  # the raw dict, for code that reads other keys
        return self.data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def stage(self) -> str:
        return str(self.data.get("stage"))

    @property
    def fingerprint(self) -> str:
        return str(self.data.get("fingerprint"))

    @property
    def completed(self) -> bool:
        return bool(self.data.get("completed"))

    @property
    def config(self) -> dict[str, Any]:
        config = self.data.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def inputs(self) -> dict[str, Any]:
        inputs = self.data.get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    @property
    def dataset(self) -> dict[str, Any]:
        """The recorded description of the dataset the run read ({} when none)."""
        dataset = self.inputs.get("dataset")
        return dict(dataset) if isinstance(dataset, dict) else {}

    @property
    def item_dir(self) -> Path:
        """The folder of the run's items: the manifest's ``item_dir``, else the stage's."""
        name = self.data.get("item_dir")
        if not isinstance(name, str):
            name = ITEMS_OF_STAGE.get(self.stage, ("", ""))[0]
        return self.root / name

    @property
    def item_suffix(self) -> str:
        suffix = self.data.get("item_suffix")
        return suffix if isinstance(suffix, str) else ITEMS_OF_STAGE.get(self.stage, ("", ""))[1]

    def item_path(self, item_id: str) -> Path:
        return self.item_dir / f"{item_id}{self.item_suffix}"


def open_run(path: str | Path, stage: str | Iterable[str] | None = None, *, option: str = "") -> Manifest:
    """Open the run folder ``path`` (a one-line error when it is not one); with ``stage``, a run
    of another stage is refused, naming the command whose output folder ``option`` wants."""
    root = Path(path)
    run = Manifest(root, read_manifest(root))
    if stage is None:
        return run
    wanted = (stage,) if isinstance(stage, str) else tuple(stage)
    if run.stage not in wanted:
        names = " or ".join(f"a {s}" for s in wanted)
        commands = " or ".join(STAGE_COMMANDS.get(s, s) for s in wanted)
        where = f" to {option}" if option else ""
        raise ArtefactError(
            f"this is a '{run.stage}' run, not {names} run",
            path=root,
            hint=f"pass the output folder of {commands}{where}",
        )
    return run


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()
