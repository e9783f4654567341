"""What ``ssr report`` reads: its run folders (:class:`Source`), the dataset and class names.

``open_inputs`` opens the run folders, picks the *primary* source (the last one with label
PNGs, else the last seeds run), finds the dataset (given, else recorded in the manifests)
and the class names, and gives each image's photo and ground-truth paths
(:class:`ReportInputs`). Used by :func:`ssr_cli.stages.report.build_report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.artefacts import MANIFEST
from ssr_cli.artefacts.manifest import open_run
from ssr_cli.errors import ArtefactError, DataError

SEED_RULE = {"alpha": 1.0}


@dataclass
class Source:
    """One run folder given to the report. ``index`` is 1-based (argument order)."""

    index: int
    root: Path
    stage: str
    manifest: dict[str, Any] | None
    labels_dir: Path | None = None
    cams_dir: Path | None = None
    ids: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.index}:{self.stage}"

    @property
    def cam_title(self) -> str:
        return "seed CAM" if self.stage == "seeds" else "refined CAM"

    @property
    def gives_labels(self) -> bool:
        return self.labels_dir is not None or self.stage == "seeds"

    def cams(self, item_id: str) -> dict[str, np.ndarray] | None:
        """The seed-format CAMs of ``item_id`` (``cams`` [C, h, w], ``class_ids``, ``image_hw``)."""
        if self.cams_dir is None:
            return None
        path = self.cams_dir / f"{item_id}.npz"
        if not path.is_file():
            return None
        from ssr_cli.artefacts.seeds import load_seed

        return load_seed(path, with_attn=False)

    def labels(self, item_id: str) -> np.ndarray | None:
        """HxW class ids at image size, or None when this source has none for ``item_id``."""
        if self.labels_dir is not None:
            path = self.labels_dir / f"{item_id}.png"
            if not path.is_file():
                return None
            from ssr_cli.data.images import read_mask

            return read_mask(path)
        seed = self.cams(item_id)
        if seed is None:
            return None
        from ssr_cli.cam.labels import cams_to_labels, upsample_cams

        h, w = (int(v) for v in seed["image_hw"])
        cams = upsample_cams(seed["cams"].astype(np.float32), (h, w))
        return cams_to_labels(cams, [int(c) for c in seed["class_ids"]], **SEED_RULE)


def _ids_in(folder: Path, suffix: str) -> list[str]:
    from ssr_cli.artefacts.run import list_item_files

    return [p.relative_to(folder).with_suffix("").as_posix() for p in list_item_files(folder, suffix)]


def open_source(root: str | Path, index: int) -> Source:
    """A run folder (seeds, refine, predict) or a plain folder of ``<id>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("run folder not found", path=root, hint="pass seeds/refine/predict output folders")
    if not (root / MANIFEST).is_file():
        src = Source(index, root, "labels", None, labels_dir=root)
        src.ids = _ids_in(root, ".png")
    else:
        run = open_run(root)
        manifest, stage, item_dir = run.data, run.stage, run.item_dir
        if stage == "seeds":
            src = Source(index, root, stage, manifest, cams_dir=item_dir)
            src.ids = _ids_in(item_dir, ".npz")
        elif stage in ("refine", "predict"):
            cams = root / "cams"
            src = Source(
                index, root, stage, manifest, labels_dir=item_dir, cams_dir=cams if cams.is_dir() else None
            )
            src.ids = _ids_in(item_dir, ".png")
        else:
            raise ArtefactError(
                f"a '{stage}' run has no per-image outputs to show",
                path=root / MANIFEST,
                hint="pass seeds, refine or predict run folders",
            )
    if not src.ids:
        raise DataError(f"the {src.stage} folder holds no items yet", path=root, hint="run its stage first")
    return src


def dataset_from_manifests(sources: Sequence[Source], strict: bool) -> tuple[Any, Any]:
    """The dataset and vocabulary recorded in the manifests (``inputs.dataset``/``inputs.images``).

    The dataset root is looked up as recorded (absolute, then relative to the run folder), so
    the report works from any directory. A recorded dataset that is not found is a warning
    (photos and ground truth are then missing), or with ``strict`` an error.
    """
    from ssr_cli.console import warn
    from ssr_cli.data.recorded import open_recorded_dataset, recorded_vocabulary
    from ssr_cli.errors import SSRError

    vocabulary = None
    problem: SSRError | None = None
    for src in reversed(sources):
        inputs = (src.manifest or {}).get("inputs") or {}
        for key in ("dataset", "images"):
            info = inputs.get(key)
            if not isinstance(info, dict):
                continue
            vocabulary = vocabulary or recorded_vocabulary(info)
            if info.get("layout") and info.get("root"):
                try:
                    return open_recorded_dataset(info, src.root), vocabulary
                except SSRError as exc:
                    problem = problem or exc
    if problem is not None:
        if strict:
            raise problem
        warn(f"{problem.one_line()}; the report has no photos and no ground truth")
    return None, vocabulary


def missing_input(message: str, strict: bool) -> None:
    """A missing report input: a warning, or with ``strict`` a DataError."""
    from ssr_cli.console import warn

    if strict:
        raise DataError(message, hint="pass --data ROOT (and --vocab), or drop --strict")
    warn(message)


@dataclass
class ReportInputs:
    """The opened run folders, the dataset (or None), the class names and the GT folder."""

    sources: list[Source]
    primary: Source
    dataset: Any
    photos_from: str | None  # "--data", "run manifests", or None without a dataset
    names: list[str]
    gt_root: Path | None
    items: dict[str, Any] = field(default_factory=dict)  # id -> dataset Item

    @property
    def labelled(self) -> list[Source]:
        return [s for s in self.sources if s.gives_labels]

    def gt_path(self, item_id: str) -> Path | None:
        """The ground-truth PNG of ``item_id``: from ``--gt``, else the dataset's; None if none."""
        if self.gt_root is not None:
            p = self.gt_root / f"{item_id}.png"
            return p if p.is_file() else None
        item = self.items.get(item_id)
        return Path(item.gt) if item is not None and item.gt is not None else None

    def photo(self, item_id: str) -> Path | None:
        item = self.items.get(item_id)
        return Path(item.image) if item is not None else None

    def ids(self) -> list[str]:
        """The primary source's ids, in dataset order when there is a dataset, else sorted."""
        have = set(self.primary.ids)
        if self.dataset is not None and self.items:
            ids = [i for i in self.dataset.ids if i in have]
        else:
            ids = sorted(have)
        if not ids:
            raise DataError(
                f"none of the {len(have)} items of {self.primary.root} belong to the dataset split",
                path=self.primary.root,
                hint="pass the --data/--split the runs were made on",
            )
        return ids


def _class_names(
    dataset: Any, recorded_vocab: Any, class_names: Sequence[str] | None, strict: bool
) -> list[str]:
    """The class names given, else the dataset's, else the recorded vocabulary's, else VOC's."""
    if class_names is None:
        if dataset is not None:
            class_names = ["background", *dataset.vocab.classes]
        elif recorded_vocab is not None:
            class_names = ["background", *recorded_vocab.classes]
        else:
            from ssr_cli.data.vocab import load_vocabulary

            missing_input("the runs record no vocabulary: class names are VOC's (pass --vocab)", strict)
            class_names = ["background", *load_vocabulary("voc").classes]
    return [str(n) for n in class_names]


def open_inputs(
    runs: Sequence[str | Path],
    *,
    dataset: Any,
    gt_dir: str | Path | None,
    class_names: Sequence[str] | None,
    strict: bool,
) -> ReportInputs:
    """Open the run folders and find the dataset and class names (see ``build_report``)."""
    sources = [open_source(r, i) for i, r in enumerate(runs, start=1)]
    labelled = [s for s in sources if s.gives_labels]
    primary = next((s for s in reversed(labelled) if s.labels_dir is not None), labelled[-1])
    photos_from = "--data" if dataset is not None else "run manifests"
    recorded_vocab = None
    if dataset is None:
        dataset, recorded_vocab = dataset_from_manifests(sources, strict)
    if dataset is None and gt_dir is None:
        missing_input("no photos and no ground truth: the runs record no dataset that opens", strict)
    names = _class_names(dataset, recorded_vocab, class_names, strict)
    return ReportInputs(
        sources=sources,
        primary=primary,
        dataset=dataset,
        photos_from=photos_from if dataset is not None else None,
        names=names,
        gt_root=Path(gt_dir) if gt_dir is not None else None,
        items={item.id: item for item in dataset.items} if dataset is not None else {},
    )
