"""What the training configs share: which of their fields change results, and how their
settings are checked (pure Python: the CLI imports the configs at no cost).

The training settings dataclasses (``CmpaConfig``, ``TrainConfig``, ``SsrConfig``) order their
fields so that every field up to and including ``seed`` changes what the run computes and every
field after it (workers, checkpoint and log cadence, TensorBoard) does not. The result fields go
into a run's fingerprint: a rerun that changes only the others resumes the same run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any, ClassVar

from ssr_cli.errors import ConfigError


class ResultFields:
    """Mixin of a settings dataclass: ``result_fields()`` and ``result_dict()`` from the field order."""

    #: the last field that changes results; the fields after it do not
    LAST_RESULT_FIELD: ClassVar[str] = "seed"

    @classmethod
    def result_fields(cls) -> tuple[str, ...]:
        """The names of the fields up to and including :attr:`LAST_RESULT_FIELD`, in order."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]  # a dataclass's mixin
        return tuple(names[: names.index(cls.LAST_RESULT_FIELD) + 1])

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def result_dict(self) -> dict[str, Any]:
        """``to_dict()`` restricted to :meth:`result_fields` (the fingerprinted settings)."""
        data = self.to_dict()
        return {k: data[k] for k in self.result_fields()}


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ``ConfigError(message)`` for the first ``(ok, message)`` whose ``ok`` is false."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
