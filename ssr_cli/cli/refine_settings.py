"""The settings of ``ssr refine`` from its command-line options: the stage's ``RefineConfig`` and
the quick rerun key (pure Python: the command builds both before torch is imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from ssr_cli.cli.options import check_device
from ssr_cli.models.attention import parse_blocks
from ssr_cli.refine.config import CRF_IMAGES, CRFParams, RefineConfig, SGCParams

T = TypeVar("T")


def parse_weights(text: str) -> tuple[float, float]:
    """``"0.4,0.6"`` -> (CLIP weight, DINO weight)."""
    from ssr_cli.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:  # (their range: RefineConfig.check)
        raise ConfigError(
            f"--affinity-weights {text!r} must be two numbers, the CLIP and DINO weights",
            hint="e.g. --affinity-weights 0.4,0.6",
        )
    return values[0], values[1]


def refine_config(o: dict[str, Any], workers: int, recorded_cfg: dict[str, Any]) -> RefineConfig:
    """The stage's settings from the command's options ``o`` (as given; the command's NOT_RESULTS left out);
    ``--max-side`` / ``--oversize`` default to the seeds run's (``recorded_cfg``: its config)."""
    from ssr_cli.data.size_limit import DEFAULT_MAX_SIDE

    max_side, oversize = o["max_side"], o["oversize"]
    return RefineConfig(
        affinity=o["affinity"].strip().lower(),
        affinity_weights=parse_weights(o["affinity_weights"]),
        mask=o["mask"].strip().lower(),
        clip_blocks=parse_blocks(o["clip_blocks"], "--clip-blocks"),
        clip_attention=o["clip_attention"].strip().lower(),
        clip_arch=o["clip_arch"],
        clip_weights=o["clip_weights"],
        dino_model=o["dino_model"],
        dino_weights=o["dino_weights"],
        dino_blocks=parse_blocks(o["dino_blocks"], "--dino-blocks"),
        box_thresh=o["box_thresh"],
        box_style=o["box_style"].strip().lower(),
        sgc=SGCParams(
            slic_algorithm=o["sgc_slic"].upper(),
            region_size=o["sgc_region_size"],
            ruler=o["sgc_ruler"],
            iterations=o["sgc_iterations"],
            n_clusters=o["sgc_clusters"],
            region_mode=o["sgc_region_mode"],
            high_conf=o["sgc_high_conf"],
            region_thresh=o["sgc_region_thresh"],
            patch_fraction=o["sgc_patch_fraction"],
            seed=o["seed"],
        ),
        bg_alpha=o["bg_alpha"],
        crf=o["crf"],
        crf_params={
            **CRFParams(
                o["crf_iters"],
                o["crf_gauss_sxy"],
                o["crf_gauss_compat"],
                o["crf_bi_sxy"],
                o["crf_bi_srgb"],
                o["crf_bi_compat"],
            ).to_dict(),
            **({"image": o["crf_image"]} if o["crf_image"] != CRF_IMAGES[0] else {}),
        },
        conf_thresh=o["conf_thresh"],
        save_cams=o["save_cams"],
        precision=o["precision"],
        batch_size=o["batch_size"],
        device=check_device(o["device"]),
        workers=workers,
        seed=o["seed"],
        max_side=max_side if max_side is not None else _recorded(recorded_cfg, "max_side", DEFAULT_MAX_SIDE),
        oversize=oversize if oversize is not None else _recorded(recorded_cfg, "oversize", "error"),
    )


def refine_quick_key(
    make_key: Any,
    options: dict[str, Any],
    dataset_fp: str,
    seeds: Path,
    seeds_manifest: dict[str, Any],
    affinity: str,
) -> str | None:
    """The quick rerun key of this refine command (``artefacts/quick.py``), or None when it cannot
    be had without loading models. Missing DINO weights are a one-line error here, at once."""
    files: list[Any] = [options.get("clip_arch"), options.get("dino_model")]
    clip = options.get("clip_weights")
    if clip is None:  # the seeds' CLIP file, as refine checks it
        clip = (((seeds_manifest.get("inputs") or {}).get("clip") or {}).get("weights") or {}).get("path")
    files.append(clip)
    if "dino" in affinity.lower():
        dino_model, dino_weights = str(options.get("dino_model")), options.get("dino_weights")
        if dino_weights is not None:
            files.append(dino_weights)
        elif Path(dino_model).suffix == ".json":
            return None  # a config file's model: resolved only when loaded
        else:
            from ssr_cli.models.sources import dino_weights_source

            files.append(dino_weights_source(dino_model, None).path)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    return str(
        make_key(
            "refine",
            settings,
            dataset_fingerprint=dataset_fp,
            files=files,
            runs=[seeds],
            env=["SSR_CLIP_WEIGHTS", "SSR_DINO_WEIGHTS"],
        )
    )


def _recorded(config: dict[str, Any], key: str, default: T) -> T:
    """The seeds run's ``config[key]`` when it has the type of ``default``, else ``default``."""
    value = config.get(key, default)
    return value if type(value) is type(default) else default
