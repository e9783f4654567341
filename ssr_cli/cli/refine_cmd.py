"""``ssr refine``: seeds -> pseudo-label PNGs (affinity refinement, superpixel masks, dense CRF)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import (
    DataRoot,
    Device,
    GtDir,
    LabelSource,
    Layout,
    Overwrite,
    Quiet,
    Seed,
    ShardOpt,
    Split,
    Vocab,
    Workers,
)
from ssr_cli.cli.refine_settings import refine_config, refine_quick_key
from ssr_cli.console import set_quiet
from ssr_cli.refine.config import (
    BOX_THRESH,
    BOX_THRESH_DEFAULT,
    CRF_IMAGES,
    CRFParams,
    RefineConfig,
    SGCParams,
)

_SGC = "SGC mask (--mask sgc)"
_CRF = "Dense CRF"
_R, _S, _C = RefineConfig, SGCParams, CRFParams  # every default of this command lives there
_C_IMAGE = CRF_IMAGES[0]


def _blocks_text(blocks: int | tuple[int, ...]) -> str:
    """A block count or indices as the --*-blocks options spell them."""
    return str(blocks) if isinstance(blocks, int) else ",".join(str(b) for b in blocks)


def _sgc(flag: str, what: str, **limits: Any) -> Any:
    """A ``--sgc-*`` option: its help names the SGC mask."""
    return typer.Option(flag, help=f"{_SGC}: {what}.", **limits)


def _crf(flag: str, what: str, **limits: Any) -> Any:
    """A ``--crf-*`` option: its help names the dense CRF."""
    return typer.Option(flag, help=f"{_CRF}: {what}.", **limits)


@app.command("refine")
def refine_command(
    seeds: Annotated[Path, typer.Option("--seeds", "-s", help="A make-seeds run folder.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder to write (created; resumed if it exists).")
    ],
    data: DataRoot = None,  # type: ignore[assignment]
    layout: Layout = "auto",
    split: Split = None,
    labels: LabelSource = "auto",
    vocab: Vocab = None,
    gt: GtDir = None,
    affinity: Annotated[
        str, typer.Option("--affinity", help="Attention affinity: none | clip | dino | clip+dino (SSR).")
    ] = _R.affinity,
    affinity_weights: Annotated[
        str,
        typer.Option("--affinity-weights", help="CLIP,DINO weights of the fused affinity (paper: 0.4,0.6)."),
    ] = ",".join(f"{w:g}" for w in _R.affinity_weights),
    mask: Annotated[
        str,
        typer.Option("--mask", help="Column mask: none | box (CLIP-ES's CAA) | sgc (SSR's superpixel mask)."),
    ] = _R.mask,
    clip_blocks: Annotated[
        str,
        typer.Option(
            "--clip-blocks",
            help="CLIP attention blocks, averaged: N (one positive number) = the last N (CLIP-ES: 8), "
            "or block indices, e.g. -2,-1.",
        ),
    ] = _blocks_text(_R.clip_blocks),
    clip_attention: Annotated[
        str,
        typer.Option(
            "--clip-attention",
            help="auto: read CLIP's attention from the seeds when they hold it for --clip-blocks "
            "(make-seeds --save-attn: no CLIP forward, CLIP not loaded), else recompute it; "
            "seeds: require the stored one; recompute: always run CLIP (float32 instead of float16).",
        ),
    ] = _R.clip_attention,
    clip_arch: Annotated[
        Optional[str],
        typer.Option("--clip-arch", help="Only if the seeds' CLIP config JSON moved: its new path."),
    ] = None,
    clip_weights: Annotated[
        Optional[str],
        typer.Option(
            "--clip-weights",
            help="Only if the seeds' CLIP weights file moved: its new path (SHA-256 checked).",
        ),
    ] = None,
    dino_model: Annotated[
        str,
        typer.Option(
            "--dino-model",
            help="dino_vitb16 | dino_vits16 | dinov2_vits14 | dinov2_vitb14 | ..._reg4, or a JSON "
            'file {"model": name, "overrides": {timm arguments}}.',
        ),
    ] = _R.dino_model,
    dino_weights: Annotated[
        Optional[str],
        typer.Option(
            "--dino-weights",
            help="DINO weights file (e.g. dino_vitbase16_pretrain.pth) or 'random'. Default: "
            "$SSR_DINO_WEIGHTS, the local caches, then a download when online.",
        ),
    ] = None,
    dino_blocks: Annotated[
        str,
        typer.Option(
            "--dino-blocks",
            help="DINO attention blocks, averaged: N = the last N, or block indices (default -1: the last).",
        ),
    ] = _blocks_text(_R.dino_blocks),
    box_thresh: Annotated[
        Optional[float],
        typer.Option(
            "--box-thresh",
            min=0.0,
            max=1.0,
            help=f"Box mask: CAM threshold x max (default {BOX_THRESH_DEFAULT:g}; "
            f"{BOX_THRESH['coco']:g} for COCO).",
        ),
    ] = None,
    box_style: Annotated[
        str,
        typer.Option(
            "--box-style",
            help="Box mask: clip-es = CLIP-ES exactly (threshold on the 8-bit CAM, a box touching "
            "the right/bottom edge loses its last column/row); full = whole boxes, threshold x float max.",
        ),
    ] = _R.box_style,
    sgc_slic: Annotated[str, _sgc("--sgc-slic", "SLIC | SLICO | MSLIC")] = _S.slic_algorithm,
    sgc_region_size: Annotated[
        int, _sgc("--sgc-region-size", "superpixel size in pixels (one CLIP patch)", min=2)
    ] = _S.region_size,
    sgc_ruler: Annotated[float, _sgc("--sgc-ruler", "SLIC compactness")] = _S.ruler,
    sgc_iterations: Annotated[int, _sgc("--sgc-iterations", "SLIC iterations", min=1)] = _S.iterations,
    sgc_clusters: Annotated[int, _sgc("--sgc-clusters", "K-means colour clusters", min=1)] = _S.n_clusters,
    sgc_region_mode: Annotated[
        str, _sgc("--sgc-region-mode", "connected (pieces of a cluster) | cluster")
    ] = _S.region_mode,
    sgc_high_conf: Annotated[
        float, _sgc("--sgc-high-conf", "high-confidence CAM level x max", min=0.0, max=1.0)
    ] = _S.high_conf,
    sgc_region_thresh: Annotated[
        float,
        _sgc(
            "--sgc-region-thresh",
            "share of high-confidence pixels that makes a region a target",
            min=0.0,
            max=1.0,
        ),
    ] = _S.region_thresh,
    sgc_patch_fraction: Annotated[
        float, _sgc("--sgc-patch-fraction", "share of a patch in targets to keep it", min=0.0, max=1.0)
    ] = _S.patch_fraction,
    bg_alpha: Annotated[
        float,
        typer.Option("--bg-alpha", min=0.0, help="Background score (1 - max CAM) ** alpha (CLIP-ES: 1)."),
    ] = _R.bg_alpha,
    crf: Annotated[
        bool, typer.Option("--crf/--no-crf", help=f"{_CRF} on the CAMs (docs/METHOD.md section 4).")
    ] = _R.crf,
    crf_iters: Annotated[int, _crf("--crf-iters", "mean-field iterations", min=1)] = _C.iters,
    crf_gauss_sxy: Annotated[float, _crf("--crf-gauss-sxy", "Gaussian sxy")] = _C.gauss_sxy,
    crf_gauss_compat: Annotated[float, _crf("--crf-gauss-compat", "Gaussian compat")] = _C.gauss_compat,
    crf_bi_sxy: Annotated[float, _crf("--crf-bi-sxy", "bilateral sxy")] = _C.bilateral_sxy,
    crf_bi_srgb: Annotated[float, _crf("--crf-bi-srgb", "bilateral srgb")] = _C.bilateral_srgb,
    crf_bi_compat: Annotated[float, _crf("--crf-bi-compat", "bilateral compat")] = _C.bilateral_compat,
    crf_image: Annotated[
        str,
        typer.Option(
            "--crf-image",
            help=f"{_CRF}: the image of the bilateral term: rgb (default: the photo) | clip-es (CLIP-ES's "
            "BGR minus the ImageNet mean cast to uint8, wrap-around included, for exact reproduction).",
        ),
    ] = _C_IMAGE,
    conf_thresh: Annotated[
        Optional[float],
        typer.Option(
            "--conf-thresh",
            min=0.0,
            max=1.0,
            help="Pixels whose posterior max is below this become 255 "
            "(default: 0.95 with the CRF, none without; 0 keeps every pixel).",
        ),
    ] = None,
    save_cams: Annotated[
        bool,
        typer.Option("--save-cams", help="Also write the refined CAMs (cams/<id>.npz, float16, patch grid)."),
    ] = _R.save_cams,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto | fp32 | bf16 | fp16 for the attention (auto: fp32 on CPU, bf16 on GPU).",
        ),
    ] = _R.precision,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images of one size per attention forward.")
    ] = _R.batch_size,
    max_side: Annotated[
        Optional[int],
        typer.Option(
            "--max-side",
            min=32,
            help="Largest image side in pixels; default: the seeds run's (make-seeds --max-side, 1024).",
        ),
    ] = None,
    oversize: Annotated[
        Optional[str],
        typer.Option(
            "--oversize",
            help="Images larger than --max-side: error | skip | downscale (work at --max-side, labels "
            "scaled back to the image size); default: the seeds run's.",
        ),
    ] = None,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    shard: ShardOpt = None,
    quiet: Quiet = False,
) -> None:
    """Refine CAM seeds into pseudo-label PNGs (labels/<id>.png, VOC palette, 255 = uncertain).

    Example:

        ssr refine --seeds runs/seeds --out runs/refine

    Defaults are the full SSR method (CLIP+DINO affinity, superpixel mask, CRF);
    `--affinity clip --mask box` is CLIP-ES's CAA. The dataset defaults to the one the
    seeds were made from. Attention runs on --device, masks and CRF on --workers
    processes. Interrupted runs resume when rerun; `--shard i/n` or torchrun split the images.
    """
    options = {k: v for k, v in locals().items() if k not in _NOT_RESULTS}  # as given, for the quick key
    set_quiet(quiet)
    from ssr_cli.artefacts import parse_shard
    from ssr_cli.artefacts.manifest import open_run
    from ssr_cli.artefacts.quick import finished_unchanged, nothing_to_do, quick_key
    from ssr_cli.console import info
    from ssr_cli.data import open_dataset
    from ssr_cli.data.recorded import recorded_root, recorded_vocabulary

    # Before torch: the seeds run, the dataset and the weights files; a complete run with the
    # same inputs answers "nothing to do" in well under a second.
    seeds_run = open_run(seeds, "seeds", option="--seeds")  # read once: the stage gets it
    seeds_manifest = seeds_run.data
    seeds_dataset = (seeds_manifest.get("inputs") or {}).get("dataset") or {}
    recorded = {k: v for k, v in seeds_dataset.items() if isinstance(v, str)}  # what the seeds used
    recorded_cfg = seeds_manifest.get("config", {})
    root = data if data is not None else recorded_root(seeds_dataset, seeds)
    shard_ = parse_shard(shard)
    dataset = open_dataset(
        root,
        layout=layout if data is not None or layout != "auto" else recorded.get("layout", "auto"),
        split=split if split is not None else recorded.get("split"),
        labels=labels,
        vocab=vocab if vocab is not None else recorded_vocabulary(seeds_dataset),
        gt=gt,
    )
    key = refine_quick_key(quick_key, options, dataset.fingerprint(), seeds, seeds_manifest, affinity)
    done = None if overwrite or key is None else finished_unchanged(out, key)
    if done is not None:
        info(nothing_to_do("refine", out, done, dataset.ids, shard_))
        return

    from ssr_cli.stages import refine as stage

    cfg = refine_config(options, workers, recorded_cfg)
    try:  # (the stage checks cfg)
        manifest = stage.run(dataset, seeds, out, cfg, shard=shard_, overwrite=overwrite, seeds_run=seeds_run)
    except stage.ItemFailure as exc:
        if os.environ.get("SSR_DEBUG", "") not in ("", "0") and exc.detail:
            print(exc.detail, file=sys.stderr)
        raise
    from ssr_cli.stages.finished import report_finished

    report_finished("refine", out, manifest, key)


_NOT_RESULTS = ("out", "workers", "shard", "overwrite", "quiet")
