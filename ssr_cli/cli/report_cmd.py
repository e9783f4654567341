"""``ssr report``: an HTML page and a PNG contact sheet from seeds/refine/predict run folders."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import DataRoot, GtDir, Layout, Quiet, Seed, Split, Vocab, Workers


class SampleMode(str, Enum):
    worst = "worst"
    random = "random"
    first = "first"


@app.command("report")
def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN...",
            help="Run folders to show (seeds, refine, predict; or folders of <id>.png), in this order.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for index.html, thumbs/ and the sheet.")],
    data: DataRoot = None,  # type: ignore[assignment]
    layout: Layout = "auto",
    split: Split = None,
    vocab: Vocab = None,
    gt: GtDir = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Images to draw (0 = all); every image is still scored.")
    ] = 200,
    sample: Annotated[
        SampleMode,
        typer.Option("--sample", help="Which images --limit keeps: worst (lowest IoU), random, or first."),
    ] = SampleMode.worst,
    seed: Seed = 0,
    per_page: Annotated[int, typer.Option("--per-page", min=1, help="Image rows per HTML page.")] = 50,
    thumb: Annotated[
        int, typer.Option("--thumb", min=16, max=1024, help="Thumbnail size (longer side).")
    ] = 160,
    workers: Workers = 2,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="A missing input (the dataset the runs recorded, their vocabulary) is an error, "
            "not a warning.",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Write an HTML report (and a PNG contact sheet) of one or more run folders.

    Per image: the photo, each class's CAM as a heatmap (seeds, and refined CAMs of
    refine --save-cams), the pseudo-label / prediction overlays, the ground truth and
    the image's IoU, worst first. Summary: per-class IoU, precision and recall, the
    confusion matrix, and each run's timing and configuration. Ground truth comes from
    --data/--split or --gt (none: no scores). Photos come from --data, else from the
    dataset recorded in the runs' manifests.

    \b
    Examples:
      ssr report runs/seeds runs/refine --data examples/voc --split train --out report/
      ssr report runs/pred --gt VOC2012/SegmentationClass --limit 500 --per-page 100 -o rep/
    """
    from ssr_cli.console import info, set_quiet
    from ssr_cli.errors import ConfigError
    from ssr_cli.stages.report import build_report

    set_quiet(quiet)
    dataset = None
    class_names = None
    if data is not None:
        from ssr_cli.data.datasets import open_dataset

        dataset = open_dataset(data, layout=layout, split=split, labels="none", vocab=vocab, gt=gt)
    else:
        if split is not None:
            raise ConfigError("--split needs --data", hint="pass --data ROOT, or drop --split")
        if vocab is not None:
            from ssr_cli.data.vocab import load_vocabulary

            class_names = ["background", *load_vocabulary(vocab).classes]
    report = build_report(
        runs,
        out,
        dataset=dataset,
        gt_dir=gt if dataset is None else None,
        class_names=class_names,
        limit=limit,
        sample=sample.value,
        seed=seed,
        per_page=per_page,
        thumb=thumb,
        workers=workers,
        strict=strict,
    )
    scores = report["scores"]
    miou = "" if scores is None else f", mIoU {100 * (scores['miou'] or 0.0):.2f} %"
    print(out / "index.html")
    info(f"{report['images_shown']} of {report['images_total']} images{miou}")
