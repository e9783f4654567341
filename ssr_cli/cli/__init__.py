"""The ``ssr`` command-line interface (Typer).

Each command lives in its own module and is a thin wrapper over a plain typed
function in ``ssr_cli.stages``. Heavy imports (torch, open_clip, timm) happen
inside command bodies so ``ssr --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import typer

from ssr_cli import __version__
from ssr_cli.console import set_quiet

app = typer.Typer(
    name="ssr",
    help="Pixel-level pseudo-labels from image-level labels (SSR: CLIP CAMs, CMPA, SGC, CRF, "
    "DeepLab). Stages talk through run folders, so they compose in shell pipelines.\n\n"
    "Example: ssr eval runs/refine --data examples/voc --split train",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"ssr-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False,
) -> None:
    """ssr: weakly supervised semantic segmentation pseudo-labels with SSR."""
    set_quiet(quiet, reset=True)


# Command modules register themselves on ``app`` when imported.
from ssr_cli.cli import commands  # noqa: E402,F401


class _HeldLogs(logging.Handler):
    """Keeps library log records of level WARNING and above (timm, open_clip, ...) as lines."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _library_warnings(caught: list[str], debug: bool) -> Iterator[None]:
    """Hold back Python warnings and log records of libraries (PIL, torch, timm, ...) while a
    command runs: an error then prints as its one line only; a success shows them afterwards,
    one line each."""
    if debug:
        yield
        return
    handler = _HeldLogs(caught)
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            caught.extend(f"{w.category.__name__}: {w.message}" for w in record)


def _replay(caught: list[str]) -> None:
    from rich.markup import escape

    from ssr_cli.console import warn

    seen: set[str] = set()
    for item in caught:
        line = " ".join(item.split())[:300]
        if line not in seen:
            seen.add(line)
            warn(escape(line))


def _plain_argument_names(command: Any) -> None:
    """Usage lines and argument help name arguments as their metavar says (``PRED``, ``RUN...``),
    not Typer's ``{PRED}`` or ``RUN... <list[Path]>``."""
    for param in command.params:
        if getattr(param, "param_type_name", "") == "argument":
            plain = param.metavar or (param.name or "").upper()
            name = plain if param.required else f"[{plain}]"
            if param.nargs != 1 and not name.rstrip("]").endswith("..."):
                name += "..."
            param._usage_display_name = lambda name=name: name  # Typer's: {PRED}
            if param.metavar:
                param.display_type_rich = lambda ctx: None  # Typer's: RUN... <list[Path]>
    for sub in getattr(command, "commands", {}).values():
        _plain_argument_names(sub)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, mapping user errors to one line and exit code 1.

    Usage errors (bad flags) are click's: usage text and exit code 2. ``SSR_DEBUG=1``
    shows the traceback of any error.
    """
    from ssr_cli.errors import SSRError

    debug = os.environ.get("SSR_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    _plain_argument_names(command)
    caught: list[str] = []
    try:
        # standalone mode: click handles --help, usage errors (exit 2) and Ctrl-C itself
        with _library_warnings(caught, debug):
            command.main(args=argv, prog_name="ssr", standalone_mode=True)
    except SystemExit as exc:
        if not exc.code:
            _replay(caught)
        raise
    except SSRError as exc:
        if debug:
            raise
        print(f"ssr: error: {exc.one_line()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(
            "ssr: interrupted; finished items and checkpoints are kept: rerun the same command to resume "
            "(train-cmpa and fit-seg: add --resume)",
            file=sys.stderr,
        )
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:  # a full disk, a read-only or missing folder: the user's to fix
        if debug:
            raise
        from ssr_cli.errors import os_error

        print(f"ssr: error: {os_error(exc).one_line()}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # a bug, or an environment problem we did not anticipate
        if debug:
            raise
        from ssr_cli.errors import torch_write_error

        mapped = torch_write_error(exc, None)
        if mapped is not None:
            print(f"ssr: error: {mapped.one_line()}", file=sys.stderr)
            sys.exit(1)
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(
            f"ssr: internal error: {text} (set SSR_DEBUG=1 for the traceback and report it)", file=sys.stderr
        )
        sys.exit(1)
