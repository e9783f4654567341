"""Stage ``predict``: label maps from a trained segmenter, one ``labels/<id>.png`` per image.

Images come from a dataset split (``--data``/``--split``) or a plain folder
(``--images DIR``, ids = paths relative to it without the extension). Each
prediction averages the class probabilities over ``--scales`` (and mirrored
images with ``--flip``), optionally refines them with a dense CRF (``--crf``),
and writes the argmax as a palette PNG (0 background, 1..K classes). Sharded
(``--shard i/n`` or torchrun) and resumable like every stage: rerunning the same
command skips finished images.

Imports torch: only import inside command bodies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ssr_cli.artefacts import RunFolder, parse_shard, read_manifest
from ssr_cli.artefacts.item_checks import png_check
from ssr_cli.console import ProgressBar, info
from ssr_cli.data.folder import describe_folder
from ssr_cli.data.size_limit import DEFAULT_MAX_SIDE, SizeLimit, plan_sizes, upscale_labels
from ssr_cli.errors import ConfigError, DataError

STAGE = "predict"


@dataclass
class PredictOptions:
    """Everything ``ssr predict`` takes (plain values, no torch)."""

    model: Path
    out: Path
    data: Path | None = None
    layout: str = "auto"
    split: str | None = None
    vocab: str | None = None
    images: Path | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    precision: str = "auto"
    device: str = "auto"
    workers: int = 2
    shard: str | None = None
    overwrite: bool = False
    max_side: int = DEFAULT_MAX_SIDE  # longer image side; larger images: see oversize
    oversize: str = "error"  # error | skip | downscale (ssr_cli.data.size_limit)


def _inputs(opts: PredictOptions) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    if (opts.images is None) == (opts.data is None):
        raise ConfigError("pass either --data (with --split) or --images DIR", hint="one source of images")
    if opts.images is not None:
        return describe_folder(Path(opts.images))
    from ssr_cli.data import open_dataset

    assert opts.data is not None
    dataset = open_dataset(opts.data, layout=opts.layout, split=opts.split, labels="none", vocab=opts.vocab)
    return [(item.id, item.image) for item in dataset.items], dataset.describe()


class _Images(Dataset):
    """Map-style dataset: index -> (id, HxWx3 uint8 image) for a DataLoader (decoding in workers)."""

    def __init__(self, pairs: list[tuple[str, Path]], targets: dict[str, tuple[int, int]]) -> None:
        self.pairs = pairs
        self.targets = targets  # id -> working size of the images to downscale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        from ssr_cli.data import read_image
        from ssr_cli.data.size_limit import read_downscaled

        image_id, path = self.pairs[index]
        target = self.targets.get(image_id)
        return image_id, read_image(path) if target is None else read_downscaled(path, target)


def _write_png(path: Path, labels: Any) -> None:
    from ssr_cli.data import write_label_png

    write_label_png(path, labels)


@dataclass
class Predictor:
    """A loaded segmenter and how ``ssr predict`` applies it (test scales, flip, dense CRF)."""

    model: Any
    cfg: Any  # the model's config (num_classes, mean, std, ...)
    file: Path
    sha256: str
    upstream: dict[str, str]
    scales: tuple[float, ...]
    flip: bool
    crf: Any  # CRFParams, or None without --crf
    device: Any
    precision: str

    def labels(self, image: Any) -> Any:
        """HxW uint8 class ids of one HxWx3 uint8 image."""
        import numpy as np

        from ssr_cli.refine.crf import dense_crf
        from ssr_cli.seg.infer import predict_probs

        cfg = self.cfg
        probs = predict_probs(
            self.model, image, cfg.mean, cfg.std, self.scales, self.flip, self.device, self.precision
        )
        if self.crf is not None:
            labels = dense_crf(image, probs.numpy(), **self.crf.to_dict()).argmax(0)
        else:
            labels = probs.argmax(0).numpy()
        return labels.astype(np.uint8)


def load_predictor(opts: PredictOptions, device: Any, precision: str) -> Predictor:
    """Load ``opts.model`` (a run folder or a model file) on ``device``; its upstream fingerprints."""
    from ssr_cli.models.weights import file_sha256_cached
    from ssr_cli.onestage.decoder import SsrSegmenter
    from ssr_cli.refine.config import CRFParams
    from ssr_cli.seg.checkpoint import load_segmenter

    model, model_cfg, model_file = load_segmenter(opts.model, device)
    if isinstance(model, SsrSegmenter):  # an ssr train model: its frozen CLIP runs at --precision too
        model.precision = precision
    if model_cfg.num_classes > 255:
        raise ConfigError(f"{model_cfg.num_classes} classes do not fit a palette PNG (at most 255)")
    model_sha = file_sha256_cached(model_file)
    upstream = {"model": model_sha[:16]}
    model_dir = Path(opts.model)
    if model_dir.is_dir():
        model_run = read_manifest(model_dir)  # a fit-seg run, or an ssr train run (single-stage)
        upstream[str(model_run.get("stage") or "fit-seg")] = str(model_run.get("fingerprint"))
    crf = CRFParams() if opts.crf else None
    return Predictor(
        model, model_cfg, model_file, model_sha, upstream, opts.scales, opts.flip, crf, device, precision
    )


def _configs(
    opts: PredictOptions, predictor: Predictor, plan: Any, shard: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's (config, result_config): result_config holds what changes the labels."""
    crf = predictor.crf
    result_config = {
        "scales": list(opts.scales),
        "flip": opts.flip,
        "crf": None if crf is None else crf.to_dict(),
        "precision": predictor.precision,
    }
    if plan.record() is not None:
        result_config["oversize"] = plan.record()
    config = {
        **result_config,
        "model": str(opts.model),
        "model_file": str(predictor.file),
        "model_sha256": predictor.sha256,
        "model_config": predictor.cfg.to_dict(),
        "device": str(predictor.device),
        "workers": opts.workers,
        "shard": str(shard),
    }
    return config, result_config


def _predict_items(
    run_folder: RunFolder, todo: list[tuple[str, Path]], plan: Any, predictor: Predictor, workers: int
) -> dict[str, Any]:
    """Predict and write the ``todo`` images (decoded by ``workers`` processes); the run's summary."""
    import numpy as np
    from torch.utils.data import DataLoader

    from ssr_cli.procs import worker_guard
    from ssr_cli.seg.data import clean_worker_error

    loader: DataLoader[Any] = DataLoader(
        _Images(todo, {i: hw for i in plan.downscaled if (hw := plan.target_hw(i))}),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=worker_guard(),
    )
    started = time.perf_counter()
    done = 0
    with ProgressBar("predict", total=len(todo)) as bar:
        batches = iter(loader)
        while True:
            try:
                image_id, image = next(batches)
            except StopIteration:
                break
            except DataError as exc:
                raise clean_worker_error(exc) from None
            labels = predictor.labels(np.asarray(image))
            if image_id in plan.downscaled:
                labels = upscale_labels(labels, plan.downscaled[image_id])
            run_folder.write_item(image_id, partial(_write_png, labels=labels))
            done += 1
            seconds = time.perf_counter() - started
            bar.update(1, status=f"{done / max(seconds, 1e-9):.2f} img/s")
    seconds = time.perf_counter() - started
    return {
        "images": done,
        "seconds": round(seconds, 2),
        "images_per_s": round(done / max(seconds, 1e-9), 3),
    }


def run(opts: PredictOptions) -> dict[str, Any]:
    """Predict label maps as ``opts`` says; returns the run's manifest."""
    from ssr_cli.runtime import resolve_device, resolve_precision

    if not opts.scales or any(s <= 0 for s in opts.scales):
        raise ConfigError(f"--scales {opts.scales} must be positive numbers")
    shard = parse_shard(opts.shard)
    pairs, inputs = _inputs(opts)
    limit = SizeLimit(opts.max_side, opts.oversize)
    plan = plan_sizes([i for i, _ in pairs], [p for _, p in pairs], limit, stage="predict")
    pairs = [pair for pair in pairs if pair[0] not in plan.skipped]
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    predictor = load_predictor(opts, device, precision)
    config, result_config = _configs(opts, predictor, plan, shard)
    ids = [image_id for image_id, _ in pairs]
    run_folder = RunFolder.open(
        opts.out,
        stage=STAGE,
        item_dir="labels",
        item_suffix=".png",
        config=config,
        result_config=result_config,
        upstream=predictor.upstream,
        inputs={"images": inputs},
        ids=ids,
        shard=shard,
        overwrite=opts.overwrite,
        check_item=png_check,
    )
    pending = set(run_folder.pending(ids))
    todo = [pair for pair in pairs if pair[0] in pending]
    info(f"predict: {len(todo)} of {len(shard.select(ids))} images to do (shard {shard}) on {device}")
    summary = _predict_items(run_folder, todo, plan, predictor, opts.workers)
    return run_folder.finish(ids, extra={"summary": summary})
