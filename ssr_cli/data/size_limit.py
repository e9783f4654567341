"""The image size limit of the stages that read images (``--max-side``, ``--oversize``).

Every image's size is read from its header (no decoding) before any work. An image
whose longer side exceeds ``max_side`` is handled as ``oversize`` says:

- ``error`` (default): a one-line ``DataError`` naming the file, before anything runs;
- ``skip``: the image is left out of the run, with one notice naming how many and one
  example; the manifest lists the skipped ids;
- ``downscale``: the stage works on the image resized (bicubic, aspect kept) so that its
  longer side is ``max_side``; outputs keep the original size (labels are scaled back
  with nearest neighbour, seeds record the original ``image_hw``).

PIL's multi-line ``DecompressionBombWarning`` is silenced: this message replaces it.
PIL + numpy only.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssr_cli.errors import ConfigError, DataError

OVERSIZE_CHOICES = ("error", "skip", "downscale")
DEFAULT_MAX_SIDE = 1024
MAX_DECODE_PIXELS = 178_956_970  # PIL's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS)
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class SizeLimit:
    max_side: int = DEFAULT_MAX_SIDE
    oversize: str = "error"

    def check(self) -> SizeLimit:
        if self.oversize not in OVERSIZE_CHOICES:
            raise ConfigError(
                f"--oversize {self.oversize!r} is not one of {', '.join(OVERSIZE_CHOICES)}",
                hint="e.g. --oversize downscale",
            )
        if self.max_side < 32:
            raise ConfigError(f"--max-side {self.max_side} is too small", hint="use at least 32 pixels")
        return self


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the image's header, without decoding it; DataError naming the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(path) as im:
                    return int(im.height), int(im.width)
            except Image.DecompressionBombError:
                pass
            with _PIL_LIMIT_LOCK:  # PIL refuses to even open very large images: we only want the size
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    with Image.open(path) as im:
                        return int(im.height), int(im.width)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError:
        raise DataError("image not found", path=path, hint="check the path and the dataset layout") from None
    except Exception as exc:
        raise DataError(
            f"unreadable image ({type(exc).__name__})",
            path=path,
            hint="replace the file or remove its id from the split",
        ) from None


@dataclass
class SizePlan:
    """What a stage does with the oversized images of a split."""

    limit: SizeLimit
    skipped: dict[str, tuple[int, int]]
    downscaled: dict[str, tuple[int, int]]  # id -> original (h, w)

    def target_hw(self, item_id: str) -> tuple[int, int] | None:
        """The (h, w) to work at for a downscaled image, else None."""
        if item_id not in self.downscaled:
            return None
        return scaled_hw(self.downscaled[item_id], self.limit.max_side)

    def record(self) -> dict[str, Any] | None:
        """For fingerprints and manifests (None when no image is affected: old runs stay valid)."""
        affected = sorted({**self.skipped, **self.downscaled})
        if not affected:
            return None
        return {"max_side": self.limit.max_side, "oversize": self.limit.oversize, "ids": affected}


def scaled_hw(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = hw
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def plan_sizes(ids: Sequence[str], paths: Sequence[Path], limit: SizeLimit, *, stage: str) -> SizePlan:
    """Check every image against ``limit`` (headers only); raises or plans per ``limit.oversize``."""
    from ssr_cli.parallel import parallel_map

    limit.check()
    over: dict[str, tuple[int, int]] = {}
    first: Path | None = None
    sizes = parallel_map(image_size, list(paths))
    for item_id, path, hw in zip(ids, paths, sizes, strict=True):
        if max(hw) > limit.max_side:
            if limit.oversize == "error":
                raise DataError(
                    f"image is {hw[1]}x{hw[0]} pixels, larger than --max-side {limit.max_side}",
                    path=path,
                    hint="pass --oversize downscale or --oversize skip, or a larger --max-side",
                )
            over[item_id] = hw
            first = first or path
    if limit.oversize == "downscale":
        _refuse_undecodable(over, dict(zip(ids, paths, strict=True)))
    if limit.oversize == "skip":
        if over:
            from ssr_cli.console import warn

            warn(
                f"{stage}: skipping {len(over)} image(s) larger than --max-side {limit.max_side} "
                f"(e.g. {first}); --oversize downscale processes them at reduced size"
            )
        return SizePlan(limit, over, {})
    return SizePlan(limit, {}, over)


def _refuse_undecodable(over: dict[str, tuple[int, int]], paths: dict[str, Path]) -> None:
    """Downscaling decodes the whole image first: refuse sizes PIL will not decode (bombs)."""
    from PIL import Image

    limit = 2 * (Image.MAX_IMAGE_PIXELS or MAX_DECODE_PIXELS // 2)
    for item_id, (h, w) in over.items():
        if h * w > limit:
            raise DataError(
                f"image is {w}x{h} pixels ({h * w / 1e6:.0f} MP): too large to decode safely, "
                f"even to downscale it (limit {limit / 1e6:.0f} MP)",
                path=paths[item_id],
                hint="downscale it with another tool, or pass --oversize skip",
            )


def read_downscaled(path: str | Path, hw: tuple[int, int]) -> np.ndarray:
    """``read_image`` of an oversized image the user chose to downscale, resized to ``hw``
    (``plan_sizes`` refused sizes that PIL would not decode)."""
    from ssr_cli.data.images import read_image

    return downscale_image(read_image(path), hw)


def downscale_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 resized (bicubic) to ``hw``."""
    from PIL import Image

    resized = Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def upscale_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """HxW uint8 label map resized (nearest) to ``hw``."""
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).resize(
        (hw[1], hw[0]), Image.Resampling.NEAREST
    )
    return np.asarray(resized, dtype=np.uint8)
