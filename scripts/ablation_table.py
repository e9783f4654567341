"""Print the SSR ablation as a markdown table beside the paper's published figures.

Reads the ``ssr eval`` reports that ``scripts/reproduce_voc.sh`` writes (one
``<row>.json`` per row in a scores folder; each holds ``summary.mprecision``,
``summary.mrecall`` and ``summary.miou`` as fractions) and prints one line per
row: our precision / recall / mIoU in percent, then the paper's (METHOD.md;
"-" where the paper gives no figure, "not run" where a report is missing).

    python scripts/ablation_table.py runs/voc/scores --out runs/voc/ablation.md

Standard library only, so any Python 3.10+ runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One ablation row: its report name, label, which split it is scored on, and the paper's P/R/mIoU."""

    key: str
    label: str
    split: str  # "train" (the ablation split) or "val" (the segmenter's split)
    paper: tuple[float | None, float | None, float | None]


# METHOD.md: the SSR ablation on VOC train (P / R / mIoU), CLIP-ES on VOC train, the final VOC val mIoU.
ROWS: tuple[Row, ...] = (
    Row("cam", "CLIP GradCAM seeds", "train", (None, None, 58.6)),
    Row("cmpa", "+ CMPA", "train", (72.8, 84.6, 63.3)),
    Row("clip_attn", "+ CLIP attention", "train", (85.2, 88.9, 74.6)),
    Row("dino_attn", "+ DINO attention", "train", (84.3, 86.2, 76.3)),
    Row("sgc", "+ full SGC", "train", (87.9, 89.1, 78.7)),
    Row("crf", "+ CRF (SSR pseudo-labels)", "train", (None, None, None)),
    Row("clip_es_caa", "CLIP-ES: CAM + CAA", "train", (None, None, 70.8)),
    Row("clip_es_crf", "CLIP-ES: CAM + CAA + CRF", "train", (None, None, 75.0)),
    Row("seg_val", "Segmenter (no CRF)", "val", (None, None, 78.2)),
    Row("seg_val_crf", "Segmenter + CRF", "val", (None, None, 79.5)),
)
HEADER = ("Row", "Split", "P", "R", "mIoU", "Paper P", "Paper R", "Paper mIoU", "Notes")


def load_scores(folder: str | Path) -> dict[str, dict]:
    """The eval reports in ``folder`` by row key ({key: report}); rows without a report are absent.

    Raises ``SystemExit`` with a one-line message for a report that is not an eval JSON.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(
            f"ablation_table: error: {folder}: no such folder (run scripts/reproduce_voc.sh first)"
        )
    scores = {}
    for row in ROWS:
        path = folder / f"{row.key}.json"
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
            summary = report["summary"]
            for name in ("mprecision", "mrecall", "miou"):
                if summary[name] is not None:  # None: undefined (e.g. no pixel predicted for any class)
                    float(summary[name])
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"ablation_table: error: {path}: not an `ssr eval` report ({exc!r}); "
                "delete it and rerun scripts/reproduce_voc.sh"
            ) from None
        scores[row.key] = report
    return scores


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _notes(report: dict) -> str:
    """How the background of seed rows was chosen, and how many ids had no prediction."""
    notes = []
    rule = report.get("bg_rule") or {}
    if "bg_threshold" in rule:
        notes.append(f"bg threshold {rule['bg_threshold']:g}")
    elif "alpha" in rule:
        notes.append(f"bg alpha {rule['alpha']:g}")
    summary = report["summary"]
    if summary.get("images") is not None:
        notes.append(f"{summary['images']} images")
    if summary.get("missing"):
        notes.append(f"{summary['missing']} missing")
    return ", ".join(notes)


def render_table(scores: dict[str, dict], train_split: str = "train", val_split: str = "val") -> str:
    """The markdown table (header, separator, one line per row of ``ROWS``), ending in a newline.

    Our figures are percentages with one decimal; "not run" marks a row without a report, "n/a" a
    figure the report leaves undefined (a mean precision with no pixel predicted as any present class).
    """
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6 + ["---"]) + "|"]
    for row in ROWS:
        split = train_split if row.split == "train" else val_split
        report = scores.get(row.key)
        if report is None:
            ours = ["not run"] * 3
            notes = ""
        else:
            summary = report["summary"]
            ours = [
                "n/a" if summary[k] is None else _pct(100 * float(summary[k]))
                for k in ("mprecision", "mrecall", "miou")
            ]
            notes = _notes(report)
        cells = [row.label, split, *ours, *(_pct(v) for v in row.paper), notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print the table for a scores folder (and write it with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores", type=Path, help="folder of <row>.json eval reports")
    parser.add_argument("--train-split", default="train", help="split name of the ablation rows")
    parser.add_argument("--val-split", default="val", help="split name of the segmenter rows")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = render_table(load_scores(args.scores), args.train_split, args.val_split)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
