"""``ssr data``: inspect and validate datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import DataRoot, GtDir, LabelSource, Layout, Quiet, Split, Vocab, Workers

data_app = typer.Typer(
    name="data",
    help="Inspect and validate datasets (VOC, COCO-as-PNG, or a custom folder with a label file).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from ssr_cli.console import stdout_console as console

    overview = Table(title="ssr data check", title_justify="left", show_header=False)
    overview.add_column("field")
    overview.add_column("value")
    gt = f"{summary['gt_count']} of {summary['count']}"
    rows = [
        ("layout", summary["layout"]),
        ("root", summary["root"]),
        ("split", summary["split"]),
        ("images", str(summary["count"])),
        ("labels from", summary["label_source"]),
        ("ground truth", gt),
        ("vocabulary", f"{summary['vocab']} ({summary['num_classes'] - 1} classes + background)"),
        ("labels per image", f"{summary['labels_per_image']:.2f}"),
        ("images without labels", str(summary["images_without_labels"])),
        ("fingerprint", summary["fingerprint"]),
    ]
    for field, value in rows:
        overview.add_row(field, value)
    console.print(overview)
    per_class = Table(title="images per class", title_justify="left")
    per_class.add_column("id", justify="right")
    per_class.add_column("class")
    per_class.add_column("images", justify="right")
    for row in summary["classes"]:
        per_class.add_row(
            str(row["id"]), row["name"], str(row["images"]), style=None if row["images"] else "dim"
        )
    console.print(per_class)


@data_app.command("check")
def check_command(
    data: DataRoot,
    layout: Layout = "auto",
    split: Split = None,
    labels: LabelSource = "auto",
    vocab: Vocab = None,
    gt: GtDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    write_labels: Annotated[
        Optional[Path],
        typer.Option(
            "--write-labels",
            metavar="FILE",
            help="Write the image-level labels as a label file (the custom layout's labels.txt format).",
        ),
    ] = None,
    decode: Annotated[
        bool,
        typer.Option(
            "--decode", help="Also decode every image and mask (finds truncated files, size mismatches)."
        ),
    ] = False,
    workers: Workers = 0,
    quiet: Quiet = False,
) -> None:
    """Validate a dataset and summarise it: layout, split, images, label source, ground truth,
    images per class. Problems are reported as one line naming the file (and line).
    The summary is the result: a table on stdout (JSON with --json), also with --quiet.

    Example: ssr data check --data VOCdevkit/VOC2012 --split train --labels xml --json
    """
    import json

    from ssr_cli.console import info, set_quiet, warn
    from ssr_cli.data.check import decode_all, summarize, write_label_file
    from ssr_cli.data.datasets import open_dataset
    from ssr_cli.errors import DataError

    set_quiet(quiet)
    dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab, gt=gt)
    if decode:
        problems = decode_all(dataset, workers=workers)
        for problem in problems[:20]:
            warn(problem)
        if problems:
            raise DataError(
                f"{len(problems)} of {len(dataset)} images or masks failed to decode; first: {problems[0]}",
                hint="replace or remove the files named above",
            )
        info(f"decoded {len(dataset)} images and {dataset.gt_count} masks: all fine")
    summary = summarize(dataset)
    if summary["images_without_labels"] and dataset.label_source != "none":
        warn(f"{summary['images_without_labels']} of {len(dataset)} images have no foreground class")
    if write_labels is not None:
        written = write_label_file(dataset, write_labels)
        info(f"wrote labels of {len(dataset)} images to {written}")
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@data_app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write (custom layout).")],
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="World seed: image i is a function of (seed, i).")] = 0,
    size_range: Annotated[
        str, typer.Option("--size-range", metavar="MIN,MAX", help="Image side lengths in pixels.")
    ] = "160,320",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0.0, max=1.0, help="Share of images in splits/val.txt.")
    ] = 0.2,
    workers: Workers = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing dataset folder.")
    ] = False,
) -> None:
    """Generate the synthetic proving-ground world: 8 shape classes with co-occurring
    backgrounds (boat/water, train/railway), look-alike pairs and sub-patch structures, on
    crops of real photos, with VOC-style masks. Deterministic for a given seed.

    Example: ssr data synth --out synth --images 500 --seed 0
    """
    import shutil
    import time

    from ssr_cli.console import info, track
    from ssr_cli.data.synth import generate
    from ssr_cli.errors import ConfigError

    try:
        low, high = (int(v) for v in size_range.split(","))
    except ValueError:
        raise ConfigError(
            f"--size-range {size_range!r} is not MIN,MAX", hint="e.g. --size-range 160,320"
        ) from None
    if not 32 <= low <= high <= 4096:
        raise ConfigError(f"--size-range {size_range!r} must satisfy 32 <= MIN <= MAX <= 4096")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                "the output folder is not empty", path=out, hint="pass --overwrite or choose a new folder"
            )
        if not (out / "synth.json").is_file():
            raise ConfigError(
                "refusing to overwrite a folder that was not made by `ssr data synth`",
                path=out,
                hint="choose a new folder",
            )
        shutil.rmtree(out)
    start = time.perf_counter()
    stream = generate(
        out, images, seed=seed, size_range=(low, high), val_fraction=val_fraction, workers=workers
    )
    for _ in track(stream, total=images, description="synth"):
        pass
    seconds = time.perf_counter() - start
    info(f"wrote {images} images to {out} in {seconds:.1f} s ({images / seconds:.0f} images/s)")
    print(out)
