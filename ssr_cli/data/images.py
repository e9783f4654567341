"""Reading images and label masks, writing palette label PNGs (PIL + numpy only).

Conversion rules of ``read_image`` (the result is always HxWx3 uint8 RGB):

- RGB as is; L, 1, LA, RGBA, P/PA (palette, with or without transparency), CMYK,
  YCbCr, LAB, HSV: converted by PIL; alpha is dropped (not composited).
- 16-bit integer (I;16, I;16B, I;16L, I with values in 0..65535): the full
  16-bit range maps to 8 bits, ``v8 = round(v16 / 257)`` (so 65535 -> 255);
  the image's own range is NOT stretched, so a dark image stays dark.
- I (32-bit) with values outside 0..65535: linearly stretched from its min..max.
- F (float): values within [0, 1] are scaled by 255; otherwise stretched from
  min..max. NaNs become 0.
- EXIF orientation is ignored (pixels are used as stored, like the ground-truth
  masks, which are aligned to the stored pixel grid).
- Multi-frame files (GIF, TIFF): the first frame.

A truncated or corrupt file raises ``DataError`` (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
is left off, so PIL refuses incomplete data).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from ssr_cli.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_image", "read_mask", "voc_palette", "write_label_png"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


@lru_cache(maxsize=1)
def _palette_array() -> np.ndarray:
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        code, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        colours[index] = (r, g, b)
    colours.setflags(write=False)
    return colours


def voc_palette() -> list[int]:
    """The PASCAL VOC colour palette as 768 ints (r0, g0, b0, r1, ...); index 255 = (224, 224, 192)."""
    return [int(v) for v in _palette_array().reshape(-1)]


def _decode(path: Path) -> tuple[Path, Image.Image]:
    image: Image.Image | None = None
    try:
        with warnings.catch_warnings():  # stages check sizes themselves (--max-side) with one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except BaseException:
        if image is not None:
            image.close()
        raise
    return path, image


def _open(path: str | Path, kind: str) -> tuple[Path, Image.Image]:
    """Open and fully decode ``path``; every failure becomes a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{kind} not found" if not path.exists() else f"{kind} is not a file",
            path=path,
            hint="check the path and the dataset layout",
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone enabled it globally: we still refuse partial files
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; refusing to read possibly truncated images",
            path=path,
            hint="do not set LOAD_TRUNCATED_IMAGES",
        )
    try:
        return _decode(path)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{kind} is too large to decode safely: {exc}",
            path=path,
            hint="downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        ) from None
    except Image.UnidentifiedImageError:
        raise DataError(
            f"{kind} is not a readable image file", path=path, hint="is it an image (JPEG/PNG)? re-export it"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        incomplete = "truncat" in text.lower()
        hint = "the file is incomplete; copy or download it again" if incomplete else "re-export it"
        raise DataError(f"cannot decode {kind}: {text}", path=path, hint=hint) from None


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a float/wide-int single-channel array to uint8 by the rules in the module docstring."""
    if array.dtype.kind == "f":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.rint(array * 255.0).astype(np.uint8)
    else:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 65535:
            return np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.rint((array.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB: ``HxWx3`` uint8 (rows, columns, channels R, G, B).

    Any PIL mode converts (see the module docstring). Missing, unreadable or
    truncated files raise ``DataError`` naming the file.
    """
    path, image = _open(path, "image")
    with image:
        mode = image.mode
        if mode == "RGB":
            return np.asarray(image, dtype=np.uint8).copy()
        if mode in _16BIT_MODES or mode in ("I", "F"):
            gray = _to_uint8(np.asarray(image))
            return np.repeat(gray[:, :, None], 3, axis=2)
        if mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")
        try:
            rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot convert image mode {mode} to RGB: {exc}", path=path) from None
        return np.asarray(rgb, dtype=np.uint8).copy()


def _colour_mask_to_ids(path: Path, rgb: np.ndarray) -> np.ndarray:
    """Map an HxWx3 colour mask to VOC palette indices; unknown colours raise DataError."""
    palette = _palette_array().astype(np.int64)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    unique, inverse = np.unique(codes.reshape(-1), return_inverse=True)
    order = np.argsort(palette_codes)
    found = np.searchsorted(palette_codes[order], unique)
    found = np.clip(found, 0, 255)
    matched = palette_codes[order][found] == unique
    if not matched.all():
        bad = int(unique[np.argmin(matched)])
        colour = ((bad >> 16) & 255, (bad >> 8) & 255, bad & 255)
        raise DataError(
            f"colour mask has colour {colour} that is not in the VOC palette",
            path=path,
            hint="save masks as palette or grayscale PNGs of class ids",
        )
    ids = order[found].astype(np.uint8)
    return ids[inverse].reshape(codes.shape)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as ``HxW`` uint8 class ids (0 background, 1..K classes, 255 ignore).

    Palette PNGs give their indices; grayscale (L) gives its values; 16-bit or
    32-bit masks are accepted when every value is within 0..255; RGB(A) colour
    masks are mapped through the VOC palette (a colour outside it is an error).
    """
    path, image = _open(path, "mask")
    with image:
        mode = image.mode
        if mode in ("P", "L"):
            return np.asarray(image, dtype=np.uint8).copy()
        if mode == "1":
            return np.asarray(image).astype(np.uint8)
        if mode in ("PA", "LA"):
            return np.asarray(image.getchannel(0), dtype=np.uint8).copy()
        if mode in ("RGB", "RGBA"):
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return _colour_mask_to_ids(path, rgb)
        if mode in _16BIT_MODES or mode in ("I", "F"):
            values = np.asarray(image)
            if values.size and (
                values.min() < 0 or values.max() > 255 or (values.dtype.kind == "f" and (values % 1).any())
            ):
                raise DataError(
                    f"mask of mode {mode} has values outside the class ids 0..255 "
                    f"(min {values.min()}, max {values.max()})",
                    path=path,
                    hint="save masks as 8-bit palette or grayscale PNGs",
                )
            return values.astype(np.uint8)
        raise DataError(
            f"mask has image mode {mode}, not a label mask",
            path=path,
            hint="save masks as 8-bit palette or grayscale PNGs",
        )


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write ``labels`` (HxW integer class ids 0..255) as a palette PNG with the VOC palette.

    The file appears atomically (temporary name, then rename).
    """
    from ssr_cli.artefacts import atomic_write

    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {array.shape}")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind not in "ui":
        raise ValueError(f"labels must be integers, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label values must be within 0..255, got {array.min()}..{array.max()}")
    data = np.ascontiguousarray(array, dtype=np.uint8)
    image = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())
    image.putpalette(voc_palette())
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=False))
