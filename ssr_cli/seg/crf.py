"""Dense CRF post-processing of segmenter predictions.

Parameters are METHOD.md section 4's: 10 mean-field iterations, a Gaussian
(smoothness) kernel with sxy=1, compat=3 and a bilateral (appearance) kernel
with sxy=67, srgb=3, compat=4. The CRF itself is the refine stage's
(``ssr_cli.refine.crf.dense_crf``); predictions keep its plain argmax (no 0.95
confidence rule: that is for pseudo-labels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    ``image``: HxWx3 uint8 RGB; ``probs``: KxHxW float (each pixel sums to 1).
    Returns the posterior marginals, KxHxW float32.
    """
    from ssr_cli.refine.crf import dense_crf as refine_crf

    return refine_crf(
        np.ascontiguousarray(image, dtype=np.uint8),
        probs,
        iters=params.iterations,
        gauss_sxy=params.gaussian_sxy,
        gauss_compat=params.gaussian_compat,
        bilateral_sxy=params.bilateral_sxy,
        bilateral_srgb=params.bilateral_srgb,
        bilateral_compat=params.bilateral_compat,
    )
