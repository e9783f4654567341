"""``ssr eval``: mIoU, precision and recall of a label folder against ground truth."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ssr_cli.cli import app
from ssr_cli.cli.options import DataRoot, GtDir, Layout, Quiet, Split, Vocab, Workers


class PredIgnoreMode(str, Enum):
    background = "background"
    wrong = "wrong"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _print_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    from ssr_cli.console import stdout_console

    summary = report["summary"]
    table = Table(title=f"ssr eval: {report['pred']['path']}", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    table.add_column("precision %", justify="right")
    table.add_column("recall %", justify="right")
    table.add_column("GT pixels", justify="right")
    for row in report["classes"]:
        style = None if row["present"] else "dim"
        table.add_row(
            str(row["id"]),
            row["name"],
            _pct(row["iou"]),
            _pct(row["precision"]),
            _pct(row["recall"]),
            f"{row['gt_pixels']:,}",
            style=style,
        )
    table.add_section()
    table.add_row(
        "",
        "mIoU / mP / mR",
        _pct(summary["miou"]),
        _pct(summary["mprecision"]),
        _pct(summary["mrecall"]),
        "",
        style="bold",
    )
    table.add_row("", "pixel accuracy", _pct(summary["pixel_accuracy"]), "", "", f"{summary['pixels']:,}")
    stdout_console.print(table)
    extra = f"{summary['images']} images scored"
    if summary.get("no_gt"):
        extra += f" of {summary['images_total']} ({summary['no_gt']} without ground truth left out)"
    extra += f"; means over the {summary['classes_present']} classes present in GT"
    if summary["missing"]:
        extra += f", {summary['missing']} missing predictions skipped"
    if summary["pred_ignored_pixels"]:
        extra += f", {summary['pred_ignored_pixels']:,} pixels predicted 255 counted as misses"
    units = "scores in % (fractions 0..1 in metrics.json and --json)"
    stdout_console.print(f"{extra}; {units}, prediction 255 = {report['pred_ignore']}")
    if "bg_search" in report:
        _print_bg_search(report)


def _print_bg_search(report: dict[str, Any]) -> None:
    from rich.table import Table

    from ssr_cli.console import stdout_console

    table = Table(title="background rule (seeds: CAM -> label)", title_justify="left")
    for col in ("rule", "mIoU %", "mP %", "mR %"):
        table.add_column(col, justify="right" if col != "rule" else "left")
    for row in report["bg_search"]:
        rule = f"alpha {row['alpha']:g}" if "alpha" in row else f"threshold {row['bg_threshold']:.2f}"
        best = {k: v for k, v in row.items() if k in ("alpha", "bg_threshold")} == report["bg_rule"]
        table.add_row(
            rule,
            _pct(row["miou"]),
            _pct(row["mprecision"]),
            _pct(row["mrecall"]),
            style="bold" if best else None,
        )
    stdout_console.print(table)


def _recorded_dataset(pred: Path) -> Any:
    """The dataset recorded in ``pred``'s manifest (found from any directory), or None."""
    from ssr_cli.artefacts import MANIFEST, read_manifest
    from ssr_cli.data.recorded import open_recorded_dataset

    if not (pred / MANIFEST).is_file():
        return None
    inputs = read_manifest(pred).get("inputs") or {}
    for key in ("dataset", "images"):  # predict records its dataset as "images"
        info = inputs.get(key)
        if isinstance(info, dict) and info.get("root") and info.get("layout"):
            return open_recorded_dataset(info, pred)
    return None


@app.command("eval")
def eval_command(
    pred: Annotated[
        Path,
        typer.Argument(
            metavar="PRED",
            help="Labels to score: a seeds/refine/predict run folder, or a folder of <id>.png.",
        ),
    ],
    data: DataRoot = None,  # type: ignore[assignment]
    layout: Layout = "auto",
    split: Split = None,
    labels: Annotated[
        str,
        typer.Option(
            "--labels",
            help="Image-level label source of the dataset (see ssr data); eval does not need "
            "them, so the default none skips reading them.",
        ),
    ] = "none",
    vocab: Vocab = None,
    gt: GtDir = None,
    num_classes: Annotated[
        Optional[int],
        typer.Option(
            "--num-classes", min=1, help="Number of classes with background (default: from --vocab)."
        ),
    ] = None,
    workers: Workers = 2,
    pred_ignore: Annotated[
        PredIgnoreMode,
        typer.Option(
            "--pred-ignore",
            help="How predicted 255 (uncertain) pixels count: background = as class 0; "
            "wrong = a miss of the true class, a false positive of none.",
        ),
    ] = PredIgnoreMode.background,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="Skip ids without a prediction (counted in the report)."),
    ] = False,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Where to write metrics.json (default: PRED/metrics.json)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON document on stdout, no table.")
    ] = False,
    bg_alpha: Annotated[
        float,
        typer.Option("--bg-alpha", min=0.0, help="Seeds: background score (1 - max CAM) ** alpha."),
    ] = 1.0,
    bg_threshold: Annotated[
        Optional[float],
        typer.Option("--bg-threshold", min=0.0, max=1.0, help="Seeds: a constant background score instead."),
    ] = None,
    search_bg: Annotated[
        bool,
        typer.Option(
            "--search-bg",
            help="Seeds, or a refine run's refined CAMs (refine --save-cams): try alpha in {1, 2} and "
            "thresholds 0.05..0.60 against the ground truth; report the best and the table of all.",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Score label maps against ground truth: per-class IoU, precision, recall, and mIoU.

    One confusion matrix is accumulated over the whole split; ground-truth
    pixels 255 are ignored; mIoU, mean precision and mean recall average over
    the classes present in the ground truth. Ground truth comes from a dataset
    split (--data, --split), from a folder of PNGs (--gt; classes from
    --vocab, default voc), or with neither from the dataset a run folder
    recorded (images without a mask are left out and counted). The report is written to PRED/metrics.json (or
    --out) and printed as a table, or as JSON with --json.

    \b
    Examples:
      ssr eval runs/refine --data VOCdevkit/VOC2012 --split train
      ssr eval my_labels/ --gt VOC2012/SegmentationClass --json | jq .summary.miou
    """
    from ssr_cli.console import set_quiet
    from ssr_cli.stages.evaluate import bg_candidates, evaluate

    set_quiet(quiet)
    dataset, class_names = _ground_truth(pred, data, layout, split, labels, vocab, gt, num_classes)
    report = evaluate(
        pred,
        dataset=dataset,
        gt_dir=gt if dataset is None else None,
        num_classes=num_classes,
        class_names=class_names,
        workers=workers,
        pred_ignore=pred_ignore.value,
        allow_missing=allow_missing,
        bg_rules=bg_candidates(search_bg, bg_alpha, bg_threshold),
        refined_cams=search_bg or bg_threshold is not None,
    )
    _write_and_show(report, out if out is not None else pred / "metrics.json", json_out)


def _ground_truth(
    pred: Path,
    data: Path | None,
    layout: str,
    split: str | None,
    labels: str,
    vocab: str | None,
    gt: Path | None,
    num_classes: int | None,
) -> tuple[Any, list[str] | None]:
    """(dataset, class names) for ``evaluate``: --data's dataset, or --gt with --vocab's class
    names, or else the dataset ``pred`` recorded; ConfigError for contradicting options."""
    from ssr_cli.console import info
    from ssr_cli.errors import ConfigError

    if data is not None:
        from ssr_cli.data.datasets import open_dataset

        dataset = open_dataset(data, layout=layout, split=split, labels=labels, vocab=vocab, gt=gt)
        if num_classes is not None and num_classes != dataset.vocab.num_classes:
            raise ConfigError(
                f"--num-classes {num_classes} but vocabulary '{dataset.vocab.name}' has "
                f"{dataset.vocab.num_classes} classes with background",
                hint="drop --num-classes",
            )
        return dataset, None
    if gt is not None:
        if split is not None:
            raise ConfigError("--split needs --data", hint="pass --data ROOT, or drop --split with --gt DIR")
        from ssr_cli.data.vocab import load_vocabulary

        vocabulary = load_vocabulary(vocab or "voc")
        if num_classes is None or num_classes == vocabulary.num_classes:
            return None, ["background", *vocabulary.classes]
        if vocab is not None:
            raise ConfigError(
                f"--num-classes {num_classes} but vocabulary '{vocabulary.name}' has "
                f"{vocabulary.num_classes} classes with background",
                hint="drop one of the two",
            )
        return None, None
    dataset = _recorded_dataset(pred)
    if dataset is None:
        raise ConfigError("no ground truth to compare with", hint="pass --data ROOT [--split S] or --gt DIR")
    info(f"ground truth of the dataset the run recorded: {dataset.root} (split {dataset.split})")
    return dataset, None


def _write_and_show(report: dict[str, Any], target: Path, json_out: bool) -> None:
    """Write ``report`` to ``target``, then print it (a table, or JSON with ``json_out``)."""
    import json

    from ssr_cli.artefacts import atomic_write_json
    from ssr_cli.console import info
    from ssr_cli.errors import DataError

    try:
        atomic_write_json(target, report)
    except OSError as exc:
        raise DataError(
            f"cannot write the report ({exc.strerror or exc})",
            path=target,
            hint="choose another file with --out",
        ) from None
    if json_out:
        print(json.dumps(report, sort_keys=True))
        no_gt = report["summary"]["no_gt"]
        if no_gt:
            info(
                f"scored {report['summary']['images']} of {report['summary']['images_total']} images; "
                f"{no_gt} have no ground truth"
            )
    else:
        _print_table(report)
    info(f"wrote {target}")
