"""``ssr weights``: where model weights would load from, and adding files to the local cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ssr_cli.cli import app

weights_app = typer.Typer(
    name="weights",
    help="Show where each model's weights would load from (env var, local cache, download) or that "
    "they are missing; add a weights file to the local cache.",
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(weights_app, name="weights")

JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ClipArch = Annotated[str, typer.Option("--clip-arch", help="open_clip architecture name.")]
DinoModel = Annotated[str, typer.Option("--dino-model", help="DINO model, e.g. dino_vitb16, dino_vits16.")]
Backbone = Annotated[str, typer.Option("--backbone", help="timm backbone of the segmenter.")]

_ORIGIN_TEXT = {
    "env": "env ${env_var}",
    "random": "random (${env_var}=random)",
    "cache": "local cache",
    "download": "download when used (online)",
    "missing": "MISSING",
    "error": "ERROR",
}


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, never breaking a word; a URL gets a
    line of its own (whatever its length), so it can be copied whole, and so does each step."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        url = word.startswith(("http://", "https://"))
        step = word in ("then", "(or")  # each step of the advice (a command to copy) on its own line
        if url or step or (line and len(line) + 1 + len(word) > width):
            if line:
                lines.append(line)
            line = ""
        if url:
            lines.append(word.rstrip(","))
            continue
        line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


def _print_table(rows: list[dict[str, Any]]) -> None:
    """One block per model; words (paths, URLs) are never broken, whatever the terminal width."""
    import shutil

    width = max(40, min(shutil.get_terminal_size((80, 24)).columns, 120))
    indent = " " * 12
    out: list[str] = []
    for row in rows:
        origin = _ORIGIN_TEXT[row["origin"]].replace("${env_var}", "$" + row["env_var"])
        out.append(f"{row['kind']}: {row['model']}  {origin}")
        fields = [
            ("used by", row["used_by"]),
            ("file", row["path"] or ""),
            ("expected", " or ".join(row["expected"])),
            ("in", f"{row['cache_dir']}/"),
            ("to do", row["action"]),
        ]
        for title, value in fields:
            if not value:
                continue
            for n, line in enumerate(_wrap(str(value), width - len(indent))):
                out.append((f"  {title + ':':<10}" if n == 0 else indent) + line)
        out.append("")
    print("\n".join(out).rstrip("\n"))


def _show(json_out: bool, clip_arch: str, dino_model: str, backbone: str) -> None:
    import json

    from ssr_cli.stages.weights import weights_status

    rows = weights_status(clip_arch=clip_arch, dino=dino_model, backbone=backbone)
    if json_out:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)


@weights_app.callback()
def weights_root(
    ctx: typer.Context,
    json_out: JsonOut = False,
    clip_arch: ClipArch = "ViT-B-16",
    dino_model: DinoModel = "dino_vitb16",
    backbone: Backbone = "resnet101",
) -> None:
    """Without a subcommand: the same as ``ssr weights show``."""
    if ctx.invoked_subcommand is None:
        _show(json_out, clip_arch, dino_model, backbone)


@weights_app.command("show")
def show_command(
    json_out: JsonOut = False,
    clip_arch: ClipArch = "ViT-B-16",
    dino_model: DinoModel = "dino_vitb16",
    backbone: Backbone = "resnet101",
) -> None:
    """For every model the pipeline uses (CLIP, DINO, segmenter backbone): where its weights would
    load from now ($SSR_CLIP_WEIGHTS / $SSR_DINO_WEIGHTS / $SSR_BACKBONE_WEIGHTS, a local cache
    file, a download when online) or MISSING, the exact file names looked for, and what to do.
    Never downloads; a --*-weights flag of a command always wins over what is shown here.

    Example: ssr weights show --json
    """
    _show(json_out, clip_arch, dino_model, backbone)


@weights_app.command("add")
def add_command(
    kind: Annotated[str, typer.Argument(help="clip, dino or backbone.")],
    path: Annotated[Path, typer.Argument(help="The weights file to import.")],
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name",
            help="Architecture the file is for (default: ViT-B-16, dino_vitb16, resnet101 by kind).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Accept a SHA-256 that differs from the official file (fine-tuned or converted "
            "weights) and replace weights of this model already in the cache.",
        ),
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Check a weights file (it must load into the architecture; its SHA-256 must match the official
    file where known, e.g. OpenAI's ViT-B-16.pt) and copy it into the local cache
    ($SSR_CACHE/weights/KIND or ~/.cache/ssr-cli/weights/KIND) under the name the loaders look for.

    Example: ssr weights add clip ~/Downloads/ViT-B-16.pt
    """
    import json

    from ssr_cli.console import info, warn
    from ssr_cli.stages.weights import add_weights

    result = add_weights(kind, path, name=name, force=force)
    if result["sha256_check"] == "mismatch-forced":
        warn(f"{path}: SHA-256 differs from the official file; added anyway (--force)")
    for old in result["removed"]:
        info(f"removed {old} (replaced)")
    verb = "copied to" if result["copied"] else "already in the cache as"
    check = {"verified": "official SHA-256 verified", "unknown": "no official SHA-256 known"}.get(
        result["sha256_check"], "SHA-256 differs from the official file"
    )
    status = result["status"]
    info(
        f"{result['kind']} weights for {result['model']} ({result['format']}, {check}) {verb} "
        f"{result['destination']}"
    )
    if status["origin"] != "cache" or status["path"] != result["destination"]:
        warn(
            f"{result['kind']} {result['model']} will load from {status['origin']} "
            f"{status['path'] or ''} first ({status['action']})"
        )
    if json_out:
        print(json.dumps(result, indent=2))
