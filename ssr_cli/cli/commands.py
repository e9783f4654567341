"""Imports every command module so each registers itself on the app (in --help order)."""

# isort: off
from ssr_cli.cli import data_cmd  # noqa: F401
from ssr_cli.cli import seeds_cmd  # noqa: F401
from ssr_cli.cli import cmpa_cmd  # noqa: F401
from ssr_cli.cli import train_cmd  # noqa: F401
from ssr_cli.cli import refine_cmd  # noqa: F401
from ssr_cli.cli import fitseg_cmd  # noqa: F401
from ssr_cli.cli import predict_cmd  # noqa: F401
from ssr_cli.cli import eval_cmd  # noqa: F401
from ssr_cli.cli import report_cmd  # noqa: F401
from ssr_cli.cli import weights_cmd  # noqa: F401
# isort: on
