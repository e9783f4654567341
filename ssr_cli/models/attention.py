"""One interface for the models whose attention refines CAMs (CLIP and DINO), as timm gives
every model ``forward_features``: callers use it without branching on the model type.

``blocks`` means the same everywhere (``block_indices``): an int n is the last n blocks (CLIP-ES
averages the last 8 of CLIP), a sequence is block indices (negative from the end). The CLI's
``--clip-blocks`` and ``--dino-blocks`` take either form (``parse_blocks``).

Torch is imported only for type checking: the CLI imports ``parse_blocks`` at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

from ssr_cli.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

#: an int n = the last n blocks; a sequence = block indices
Blocks = Union[int, Sequence[int]]


class AttentionModel(Protocol):
    """What ``ClipModel`` and ``DinoModel`` both offer."""

    @property
    def patch_size(self) -> int: ...

    @property
    def is_random(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    def describe(self) -> dict[str, Any]: ...

    def resized_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """The network input size of an image (sides multiples of the patch size)."""
        ...

    def preprocess(
        self, image: np.ndarray, scale: float = 1.0, *, grid_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, H', W'] normalised; ``grid_hw``: resized to that patch grid."""
        ...

    def attention(self, x: torch.Tensor, blocks: Blocks, precision: str = "fp32") -> torch.Tensor:
        """[N, 3, H, W] -> [N, h*w, h*w] float32: patch-to-patch attention, averaged over heads
        and ``blocks``, prefix tokens dropped, rows not re-normalised. No gradients."""
        ...

    def grid_attention(
        self, images: Sequence[np.ndarray], grid_hw: tuple[int, int], blocks: Blocks, precision: str = "fp32"
    ) -> torch.Tensor:
        """Images of one size -> [N, gh*gw, gh*gw]: their attention on the patch grid ``grid_hw``
        (CLIP's grid: the one the CAMs live on)."""
        ...


def block_indices(blocks: Blocks, depth: int, what: str = "attention") -> list[int]:
    """The sorted, non-negative block indices that ``blocks`` names in a ``depth``-block model; a
    one-line error when it names none or one outside the model."""
    if isinstance(blocks, int):
        if blocks < 1:
            raise ConfigError(f"the number of {what} blocks must be at least 1, not {blocks}")
        return list(range(max(0, depth - blocks), depth))
    if not blocks or any(not -depth <= b < depth for b in blocks):
        raise ConfigError(f"{what} blocks {list(blocks)} are outside the model's {depth} blocks")
    return sorted({b % depth for b in blocks})


def parse_blocks(text: str, option: str) -> int | tuple[int, ...]:
    """A ``--clip-blocks`` / ``--dino-blocks`` value: ``"8"`` (one positive number: the last 8
    blocks) or ``"-1"``, ``"-2,-1"``, ``"3,7"`` (block indices, negative from the end)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(
            f"{option} {text!r} is not a block count or a list of block indices",
            hint=f"e.g. {option} 8 (the last 8 blocks) or {option} -1 (the last block)",
        )
    if len(values) == 1 and values[0] > 0:
        return values[0]
    return values
