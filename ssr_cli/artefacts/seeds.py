"""The seeds file format: one ``<id>.npz`` per image, written by ``ssr make-seeds`` (and, without
the attention, as refined CAMs by ``ssr refine --save-cams``).

Each item file holds (numpy ``.npz``):

- ``cams``      float32 [C, h, w] (float16 in files of earlier versions): min-max normalised
                CAMs of the C present classes at patch resolution of the scale-1.0 input
                (h = H'/16, w = W'/16)
- ``class_ids`` int16 [C]: foreground class ids (1..K) in the order of ``cams``
- ``image_hw``  int32 [2]: original image height, width
- ``scales``    float32 [S]; ``flip`` bool
- ``attn``      float16 [hw, hw] (only with ``save_attn``): CLIP's patch-to-patch attention of
                the scale-1.0 un-flipped input (hw = h*w, CLS dropped), averaged over heads
                and the last ``attn_blocks`` blocks, rows not renormalised
                (``ClipModel.attention``); computed in the CAMs' forward, read by ``refine``
                so that it needs no CLIP forward (~1.2 MB per VOC image)
- ``attn_blocks`` int16 [k]: the block indices averaged into ``attn``

Torch-free.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssr_cli.errors import ArtefactError


def save_seed(
    path: Path,
    cams: np.ndarray,
    class_ids: Sequence[int],
    image_hw: tuple[int, int],
    scales: Sequence[float],
    flip: bool,
    attn: np.ndarray | None = None,
    attn_blocks: Sequence[int] = (),
) -> None:
    """Write one seeds item (see the module docstring); ``attn`` [hw, hw] is optional."""
    path.write_bytes(encode_seed(cams, class_ids, image_hw, scales, flip, attn, attn_blocks))


def encode_seed(
    cams: np.ndarray,
    class_ids: Sequence[int] | np.ndarray,
    image_hw: Sequence[int] | np.ndarray,
    scales: Sequence[float] | np.ndarray,
    flip: bool,
    attn: np.ndarray | None = None,
    attn_blocks: Sequence[int] = (),
) -> bytes:
    """One seeds item as ``.npz`` bytes (``save_seed`` writes them; refine's CAMs use them too)."""
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {
        "cams": cams.astype(np.float32),  # float16 moved CAA's box threshold (issue 13)
        "class_ids": np.asarray(class_ids, dtype=np.int16),
        "image_hw": np.asarray(image_hw, dtype=np.int32),
        "scales": np.asarray(scales, dtype=np.float32),
        "flip": np.asarray(flip),
    }
    if attn is not None:
        arrays["attn"] = attn.astype(np.float16)
        arrays["attn_blocks"] = np.asarray(attn_blocks, dtype=np.int16)
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # (numpy stubs: allow_pickle is a keyword too)
    return buf.getvalue()


def load_seed(path: str | Path, *, with_attn: bool = True) -> dict[str, np.ndarray]:
    """Read one seeds item; a damaged file is a one-line error naming it.

    Keys ``cams``, ``class_ids``, ``image_hw``, ``scales``, ``flip``; also ``attn`` and
    ``attn_blocks`` when the file holds them and ``with_attn`` (seeds made without
    ``--save-attn``, and refined CAMs, have none).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in ("cams", "class_ids", "image_hw", "scales", "flip")}
            if with_attn and "attn" in data.files:
                out["attn"], out["attn_blocks"] = data["attn"], data["attn_blocks"]
    except FileNotFoundError:
        raise ArtefactError(
            "seed file is missing", path=path, hint="rerun make-seeds into that folder"
        ) from None
    except Exception as exc:  # zipfile/BadZip/ValueError/KeyError
        raise ArtefactError(
            f"unreadable seed file ({type(exc).__name__})",
            path=path,
            hint="delete it and rerun make-seeds into the same folder to recompute it",
        ) from None
    problem = seed_problem(out)
    if problem:
        raise ArtefactError(
            f"malformed seed file: {problem}",
            path=path,
            hint="delete it and rerun make-seeds into the same folder to recompute it",
        )
    return out


def seed_problem(seed: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a loaded seed (shapes, types, values), or None."""
    cams, class_ids, hw = seed["cams"], seed["class_ids"], seed["image_hw"]
    if cams.ndim != 3 or cams.dtype.kind != "f":
        return f"cams must be a float array [C, h, w], not {cams.dtype} {list(cams.shape)}"
    if class_ids.ndim != 1 or class_ids.dtype.kind not in "iu" or len(class_ids) != cams.shape[0]:
        found = f"{class_ids.dtype} {list(class_ids.shape)}"
        return f"class_ids must be {cams.shape[0]} integers (one per CAM), not {found}"
    if len(class_ids) and (class_ids.min() < 1 or class_ids.max() > 254):
        return "class_ids must be in 1..254"
    if hw.shape != (2,) or hw.dtype.kind not in "iu" or hw.min() < 1:
        return f"image_hw must be two positive integers, not {hw.tolist()}"
    if cams.size and not np.isfinite(cams).all():
        return "cams hold NaN or infinite values"
    return None


def seed_readable(path: Path) -> bool:
    """``check_item`` of seeds runs: the file loads and is well formed (attention not read)."""
    try:
        load_seed(path, with_attn=False)
    except ArtefactError:
        return False
    return True
