"""The training configs' result fields: what a run's fingerprint covers (ssr_cli/config_fields.py)."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.onestage.config import SsrConfig
from ssr_cli.seg.config import TrainConfig

NOT_RESULTS = {"workers", "save_every", "log_every", "val_every", "check_sync_every", "tensorboard"}


@pytest.mark.parametrize("cls", [CmpaConfig, SsrConfig, TrainConfig])
def test_result_fields_are_every_field_through_seed(cls: type) -> None:
    names = [f.name for f in fields(cls)]
    chosen = cls.result_fields()
    assert chosen[-1] == "seed" and list(chosen) == names[: len(chosen)]
    assert set(names) - set(chosen) <= NOT_RESULTS  # a new result field must come before seed
    cfg = cls()
    assert list(cfg.result_dict()) == list(chosen)
    # cadence and workers do not change the fingerprinted settings; a result field does
    assert (
        replace(cfg, workers=cfg.workers + 1, log_every=cfg.log_every + 1).result_dict() == cfg.result_dict()
    )
    assert replace(cfg, seed=cfg.seed + 1).result_dict() != cfg.result_dict()
