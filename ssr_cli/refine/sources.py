"""What ``ssr refine`` reads besides the images: the seeds run, its CLIP, DINO, and the fused affinity.

- :func:`open_seeds` / :func:`check_dataset`: a ``make-seeds`` run folder and the check
  that the dataset opened now is the one the seeds were made from;
- :func:`load_seeds_clip`: the CLIP of the seeds (architecture and weights from their
  manifest; a moved file may be named again, its SHA-256 must match);
  :func:`stored_attention_blocks` / :func:`check_seeds_clip`: when the seeds hold CLIP's
  attention (``make-seeds --save-attn``) refine reads it and loads no CLIP, but still
  checks a ``--clip-weights`` given against the seeds' SHA-256;
- :func:`load_dino_model`: DINO by name, or from a JSON file naming a model and timm
  overrides (a custom or tiny architecture, e.g. in tests);
- :class:`Attention` / :func:`load_attention`: the device, precision and models that
  ``RefineConfig`` asks for, and a batch's fused affinity from them;
- :func:`batch_affinity`: the main-process (device) part of refine for a batch of
  images: CLIP attention (last N blocks, head-averaged, CLS dropped; computed, or read
  from the seeds), DINO attention on
  the same grid, fused (``fuse_affinity``: CAA normalisation of each source, weighted
  sum, symmetrised, squared).

Imports torch: import this module lazily (inside command bodies).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.artefacts.manifest import Manifest, open_run
from ssr_cli.data import Dataset
from ssr_cli.errors import ArtefactError, ConfigError, DataError, WeightsError
from ssr_cli.models.attention import AttentionModel, Blocks
from ssr_cli.models.clip import register_arch
from ssr_cli.refine.config import AFFINITY_WEIGHTS, RefineConfig

#: an opened seeds run (``open_seeds``)
SeedsRun = Manifest


def open_seeds(path: str | Path) -> SeedsRun:
    """Open a ``make-seeds`` run folder; a one-line error when it is something else."""
    return open_run(path, "seeds", option="--seeds")


def check_dataset(seeds: SeedsRun, dataset: Dataset) -> None:
    """Refuse a dataset that is not the one the seeds were made from (ids, labels, sizes, vocabulary)."""
    want = seeds.dataset
    if want.get("fingerprint") == dataset.fingerprint():
        return
    here = (
        f"split {dataset.split}, {len(dataset)} images, labels {dataset.label_source}, "
        f"vocab {dataset.vocab.name}"
    )
    there = (
        f"split {want.get('split')}, {want.get('count')} images, labels {want.get('label_source')}, "
        f"vocab {want.get('vocab')}"
    )
    raise DataError(
        f"the dataset ({here}) is not the one the seeds were made from ({there})",
        path=seeds.root / "manifest.json",
        hint="pass the same --data/--split/--labels/--vocab as make-seeds, or rerun make-seeds",
    )


def stored_attention_blocks(seeds: SeedsRun) -> int | None:
    """n when every item of the seeds run holds CLIP's attention of the last n blocks
    (``make-seeds --save-attn --attn-blocks n``, part of its fingerprint); None otherwise."""
    basis = seeds.manifest.get("fingerprint_basis", {}).get("config", {})
    if not basis.get("save_attn") or basis.get("attn_blocks") is None:
        return None
    return int(basis["attn_blocks"])


def _seeds_clip_spec(
    seeds: SeedsRun, clip_arch: str | None, clip_weights: str | None, need_file: bool
) -> tuple[str, str | None, int, str]:
    """(architecture, weights to load, seed, expected weights id) of the seeds' CLIP, checked
    against ``--clip-arch`` / ``--clip-weights`` where given; ``need_file``: the weights must be there."""
    conf, basis = seeds.manifest.get("config", {}), seeds.manifest["fingerprint_basis"]["config"]
    clip_in = seeds.manifest.get("inputs", {}).get("clip", {})
    arch = str(basis["arch"])
    if need_file or clip_arch is not None:
        arch_src = clip_arch or str(conf.get("arch", basis["arch"]))
        if arch_src.endswith(".json") and not Path(arch_src).is_file() and clip_arch is None:
            raise ConfigError(
                "the CLIP architecture config of the seeds run is gone",
                path=arch_src,
                hint="pass --clip-arch PATH.json (the same architecture)",
            )
        arch = register_arch(arch_src)
        if arch != basis["arch"]:
            raise ConfigError(
                f"CLIP architecture {arch} is not the seeds' ({basis['arch']})",
                hint="refine must use the CLIP the seeds were made with",
            )
    want, seed = str(basis["weights"]), int(conf.get("seed", 0))
    if want.startswith("random:"):
        if clip_weights not in (None, "random"):
            raise ConfigError(
                "the seeds were made with random CLIP weights",
                hint="leave out --clip-weights (or pass random)",
            )
        return arch, "random", int(want.split("=", 1)[1]), want
    weights = clip_weights or (clip_in.get("weights") or {}).get("path")
    if need_file and (weights is None or (clip_weights is None and not Path(weights).exists())):
        raise WeightsError(
            "the CLIP weights file of the seeds run is not there",
            path=weights,
            hint="pass --clip-weights PATH (the same file: its SHA-256 is checked)",
        )
    return arch, weights, seed, want


def _refuse_other_weights(got: str, want: str, weights: str | None) -> None:
    if got != want:
        raise WeightsError(
            f"these CLIP weights (SHA-256 {got[:16]}) are not the seeds' ({want[:16]})",
            path=weights,
            hint="pass the weights file the seeds were made with",
        )


def load_seeds_clip(
    seeds: SeedsRun, device: torch.device, clip_arch: str | None = None, clip_weights: str | None = None
) -> Any:
    """The CLIP the seeds were made with (architecture and weights from their manifest): a ``ClipModel``.

    ``clip_arch`` / ``clip_weights`` (``--clip-arch`` / ``--clip-weights``) may point at moved
    files: the architecture name and the weights' SHA-256 must still match the seeds'.
    """
    from ssr_cli.models.clip import clip_weights_source, load_clip

    arch, weights, seed, want = _seeds_clip_spec(seeds, clip_arch, clip_weights, need_file=True)
    if not want.startswith("random:"):  # the file's hash first: never read a file that is not the seeds'
        source = clip_weights_source(arch, weights).with_sha256()
        _refuse_other_weights(str(source.sha256), want, weights)
    quick_gelu = seeds.manifest.get("inputs", {}).get("clip", {}).get("quick_gelu")
    model = load_clip(arch, weights, device, quick_gelu=quick_gelu, seed=seed)
    got = f"random:seed={seed}" if model.is_random else str(model.weights_source.sha256)
    _refuse_other_weights(got, want, weights)
    return model


def check_seeds_clip(
    seeds: SeedsRun, clip_arch: str | None = None, clip_weights: str | None = None
) -> dict[str, Any]:
    """When refine reads the seeds' stored attention: no CLIP is loaded, but a ``--clip-arch`` /
    ``--clip-weights`` given is still checked (name; SHA-256 of the file). Returns the seeds'
    CLIP record (for the manifest)."""
    arch, weights, _seed, want = _seeds_clip_spec(seeds, clip_arch, clip_weights, need_file=False)
    if clip_weights is not None and not want.startswith("random:"):
        from ssr_cli.models.clip import clip_weights_source

        source = clip_weights_source(arch, clip_weights).with_sha256()
        _refuse_other_weights(str(source.sha256), want, weights)
    return dict(seeds.manifest.get("inputs", {}).get("clip", {}))


def resolve_clip(
    seeds: SeedsRun,
    device: torch.device,
    *,
    use_clip: bool,
    clip_blocks: Blocks = 8,
    mode: str = "auto",
    clip_arch: str | None = None,
    clip_weights: str | None = None,
) -> tuple[Any, dict[str, Any] | None, str | None]:
    """Where refine's CLIP attention comes from: (ClipModel or None, the CLIP record for the
    manifest, ``"seeds"`` | ``"recomputed"`` | None when CLIP is not a source).

    The seeds' stored attention is used when they hold it for the last ``clip_blocks``
    blocks and ``mode`` (``--clip-attention``: auto | seeds | recompute) is not
    ``recompute``: then no CLIP is loaded, but a ``--clip-arch`` / ``--clip-weights`` given
    is still checked against the seeds'. ``mode="seeds"`` refuses seeds without it.
    """
    if not use_clip:
        return None, None, None
    stored = stored_attention_blocks(seeds)
    if mode != "recompute" and stored == clip_blocks:
        return None, check_seeds_clip(seeds, clip_arch, clip_weights), "seeds"
    if mode == "seeds":
        have = "none" if stored is None else f"only the last {stored} blocks'"
        raise ConfigError(
            f"--clip-attention seeds: the seeds hold no CLIP attention of the last {clip_blocks} "
            f"blocks ({have})",
            path=seeds.root / "manifest.json",
            hint="rerun make-seeds with --save-attn --attn-blocks N, or use --clip-attention auto",
        )
    clip = load_seeds_clip(seeds, device, clip_arch, clip_weights)
    return clip, clip.describe(), "recomputed"


def load_dino_model(
    model: str, weights: str | None, device: torch.device, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """DINO from ``--dino-model`` (a name, or a JSON file ``{"model": name, "overrides": {...}}`` of
    timm arguments for a custom or tiny architecture) -> (DinoModel, its manifest record)."""
    from ssr_cli.models.dino import load_dino

    name, overrides = model, None
    if name.endswith(".json"):
        path = Path(name)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            name, overrides = str(spec["model"]), dict(spec.get("overrides") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"unreadable DINO model config ({type(exc).__name__})",
                path=path,
                hint='a JSON object {"model": "dino_vits16", "overrides": {"depth": 2}}',
            ) from None
    dino = load_dino(name, weights, device, seed=seed, arch_overrides=overrides)
    record = dino.describe() | ({"overrides": overrides} if overrides else {})
    return dino, record


@dataclass
class Attention:
    """The main-process (device) part of refine: where CLIP's attention comes from, the models
    (None where not a source) and their manifest records."""

    cfg: RefineConfig
    device: Any
    precision: str
    clip: Any = None
    clip_record: dict[str, Any] | None = None
    clip_attention: str | None = None  # "seeds" | "recomputed" | None (CLIP is no source)
    dino: Any = None
    dino_record: dict[str, Any] | None = None

    @property
    def stored(self) -> bool:
        """Whether CLIP's attention is read from the seeds."""
        return self.clip_attention == "seeds"

    def fused(
        self, batch: list[str], read: list, seeds: SeedsRun, seconds: dict[str, float]
    ) -> np.ndarray | None:
        """The fused affinities ``[N, hw, hw]`` of one batch (None: ``--affinity none``); pops the
        stored attention off the seeds (it does not go to the workers)."""
        images = [image for image, _ in read]
        grid = (int(read[0][1]["cams"].shape[1]), int(read[0][1]["cams"].shape[2]))
        if any(tuple(s["cams"].shape[1:]) != grid for _, s in read):
            raise ArtefactError(f"seeds of images {batch} have different grids", path=seeds.root)
        attn = np.stack([s.pop("attn") for _, s in read]) if self.stored else None
        if not self.cfg.sources():
            return None
        return batch_affinity(
            images,
            grid,
            self.clip,
            self.dino,
            clip_blocks=self.cfg.clip_blocks,
            dino_blocks=self.cfg.dino_blocks,
            weights=self.cfg.affinity_weights,
            precision=self.precision,
            seconds=seconds,
            ids=batch,
            stored_clip=attn,
            device=self.device,
        )


def load_attention(cfg: RefineConfig, seeds: SeedsRun) -> Attention:
    """The device, precision, CLIP (or the seeds' stored attention) and DINO that ``cfg`` asks for."""
    from ssr_cli.runtime import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    sources = cfg.sources()
    precision = resolve_precision(cfg.precision, device) if sources else "fp32"
    clip, clip_record, clip_attention = resolve_clip(
        seeds,
        device,
        use_clip="clip" in sources,
        clip_blocks=cfg.clip_blocks,
        mode=cfg.clip_attention,
        clip_arch=cfg.clip_arch,
        clip_weights=cfg.clip_weights,
    )
    dino, dino_record = (None, None)
    if "dino" in sources:
        dino, dino_record = load_dino_model(cfg.dino_model, cfg.dino_weights, device, cfg.seed)
    return Attention(cfg, device, precision, clip, clip_record, clip_attention, dino, dino_record)


def batch_affinity(
    images: Sequence[np.ndarray],
    grid: tuple[int, int],
    clip: Any,
    dino: Any,
    *,
    clip_blocks: Blocks = 8,
    dino_blocks: Blocks = (-1,),
    weights: tuple[float, float] = AFFINITY_WEIGHTS,
    precision: str = "fp32",
    seconds: dict[str, float] | None = None,
    ids: Sequence[str] = (),
    stored_clip: np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Fused affinities ``[N, h*w, h*w]`` float32 (CPU) for images of one size.

    ``images``: HxWx3 uint8 RGB, all of one size; ``grid``: their CLIP patch grid (the
    seeds' ``[h, w]``); ``clip`` / ``dino``: a ``ClipModel`` / ``DinoModel`` or None (not a
    source); ``stored_clip``: ``[N, h*w, h*w]`` CLIP attention read from the seeds (then
    ``clip`` is None and no CLIP runs; it goes to ``device``); ``weights``: (CLIP, DINO)
    fusion weights; ``seconds``: adds the time of each part (``clip``: the CLIP forward, or
    only the copy of the stored attention; ``dino``, ``fuse``); ``ids``: the images' ids,
    for the one-line error when the GPU runs out of memory.
    """
    try:
        return _batch_affinity(
            images,
            grid,
            clip,
            dino,
            clip_blocks,
            dino_blocks,
            weights,
            precision,
            seconds,
            stored_clip,
            device,
        )
    except torch.cuda.OutOfMemoryError:
        first = f" from {ids[0]!r}" if ids else ""
        raise ConfigError(
            f"out of GPU memory computing the attention of {len(images)} image(s){first}",
            hint="lower --batch-size, use --precision bf16, or pick a smaller --dino-model",
        ) from None


def _batch_affinity(
    images: Sequence[np.ndarray],
    grid: tuple[int, int],
    clip: Any,
    dino: Any,
    clip_blocks: Blocks,
    dino_blocks: Blocks,
    weights: tuple[float, float],
    precision: str,
    seconds: dict[str, float] | None,
    stored_clip: np.ndarray | None,
    device: torch.device | str,
) -> np.ndarray:
    from ssr_cli.refine.affinity import fuse_affinity

    seconds = {} if seconds is None else seconds
    sources: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    if stored_clip is not None:
        if stored_clip.shape != (len(images), grid[0] * grid[1], grid[0] * grid[1]):
            raise ArtefactError(
                f"the seeds' stored attention {stored_clip.shape} does not fit their grid {grid}"
            )
        sources["clip"] = torch.from_numpy(stored_clip).to(device).float()
        seconds["clip"] = seconds.get("clip", 0.0) + _synced(start)  # a copy: milliseconds
    # every other source: the same call, whatever the model (models/attention.py)
    models: dict[str, tuple[AttentionModel | None, Blocks]] = {
        "clip": (None if stored_clip is not None else clip, clip_blocks),
        "dino": (dino, dino_blocks),
    }
    for name, (model, blocks) in models.items():
        if model is None:
            continue
        start = time.perf_counter()
        sources[name] = model.grid_attention(images, grid, blocks, precision)
        seconds[name] = seconds.get(name, 0.0) + _synced(start)
    start = time.perf_counter()
    fused = fuse_affinity(sources, dict(zip(("clip", "dino"), weights, strict=True))).float().cpu().numpy()
    seconds["fuse"] = seconds.get("fuse", 0.0) + time.perf_counter() - start
    return fused


def _synced(start: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
