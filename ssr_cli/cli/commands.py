"""Imports every command module so each registers itself on the app."""

import importlib

for _name in ("data_cmd", "seeds_cmd", "cmpa_cmd", "refine_cmd", "fitseg_cmd", "predict_cmd", "eval_cmd"):
    try:
        importlib.import_module(f"ssr_cli.cli.{_name}")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a command is being written
        if exc.name != f"ssr_cli.cli.{_name}":
            raise
