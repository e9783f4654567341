"""``ssr predict``: label maps from a trained segmenter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import (
    Device,
    Layout,
    MaxSide,
    Oversize,
    Overwrite,
    Quiet,
    ShardOpt,
    Split,
    Vocab,
    Workers,
    parse_scales,
)
from ssr_cli.console import set_quiet


def _input_ids(
    data: Path | None, images: Path | None, layout: str, split: str | None, vocab: str | None
) -> tuple[list[str], str]:
    """The ids and the fingerprint of the images to predict (a folder, or a dataset split)."""
    if images is not None:
        from ssr_cli.data.folder import describe_folder

        pairs, described = describe_folder(images)
        return [i for i, _ in pairs], described["fingerprint"]
    from ssr_cli.data.datasets import open_dataset

    dataset = open_dataset(data or Path(), layout=layout, split=split, labels="none", vocab=vocab)
    return dataset.ids, dataset.fingerprint()


@app.command("predict")
def predict(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="A fit-seg or train run folder, or a model/checkpoint file of one."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write (labels/<id>.png).")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset root (with --split).")] = None,
    images: Annotated[
        Optional[Path], typer.Option("--images", help="A plain folder of images instead of --data.")
    ] = None,
    layout: Layout = "auto",
    split: Split = None,
    vocab: Vocab = None,
    scales: Annotated[
        str, typer.Option("--scales", help="Comma-separated test scales, probabilities averaged.")
    ] = "1.0",
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Also average the mirrored image.")] = False,
    crf: Annotated[
        bool, typer.Option("--crf", help="Refine with a dense CRF (parameters of docs/METHOD.md section 4).")
    ] = False,
    precision: Annotated[
        str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on GPU).")
    ] = "auto",
    device: Device = "auto",
    max_side: MaxSide = 1024,
    oversize: Oversize = "error",
    workers: Workers = 2,
    overwrite: Overwrite = False,
    shard: ShardOpt = None,
    quiet: Quiet = False,
) -> None:
    """Predict label maps (palette PNGs) for a dataset split or a folder of images.

    \b
    Example:
      ssr predict --model runs/seg --data VOC2012 --split val \\
                  --scales 0.75,1.0,1.25 --flip --out runs/pred

    Then score them with `ssr eval runs/pred --data VOC2012 --split val`. Rerunning the same command
    resumes; `--shard i/n` or torchrun split the images across processes.
    """
    options = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in locals().items()
        if k not in ("out", "workers", "shard", "overwrite", "quiet")
    }
    set_quiet(quiet)
    from ssr_cli.artefacts import parse_shard
    from ssr_cli.artefacts.quick import finished_unchanged, nothing_to_do, quick_key, remember
    from ssr_cli.cli.options import check_device
    from ssr_cli.console import info

    key = None
    if (data is None) != (images is None):  # before torch: a complete run with the same inputs
        ids, input_fp = _input_ids(data, images, layout, split, vocab)
        model_files = [model, model / "model.safetensors"] if model.is_dir() else [model]
        runs = [model] if model.is_dir() else []
        key = quick_key("predict", options, dataset_fingerprint=input_fp, files=model_files, runs=runs)
        done = None if overwrite else finished_unchanged(out, key)
        if done is not None:
            info(nothing_to_do("predict", out, done, ids, parse_shard(shard)))
            return
    from ssr_cli.stages import predict as stage

    opts = stage.PredictOptions(
        model=model,
        out=out,
        data=data,
        layout=layout,
        split=split,
        vocab=vocab,
        images=images,
        scales=parse_scales(scales),
        flip=flip,
        crf=crf,
        precision=precision,
        device=check_device(device),
        workers=workers,
        max_side=max_side,
        oversize=oversize,
        shard=shard,
        overwrite=overwrite,
    )
    manifest = stage.run(opts)
    if manifest["completed"] and key is not None:
        remember(out, key)
    state = "complete" if manifest["completed"] else f"{manifest['items_done']}/{manifest['item_count']} done"
    speed = (manifest.get("summary") or {}).get("images_per_s")
    info(f"predict: {out} ({state}, {speed} img/s, fingerprint {manifest['fingerprint']})")
