"""Dense CRF post-processing of segmenter predictions (pydensecrf).

Parameters are METHOD.md section 4's: 10 mean-field iterations, a Gaussian
(smoothness) kernel with sxy=1, compat=3 and a bilateral (appearance) kernel
with sxy=67, srgb=3, compat=4. The refine stage has its own CRF for pseudo-labels
(with the 0.95 confidence rule); predictions keep the plain CRF argmax.
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
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(h, w)} sizes differ")
    crf = dcrf.DenseCRF2D(w, h, k)
    unary = unary_from_softmax(np.clip(probs.astype(np.float32), 1e-8, 1.0))
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image.astype(np.uint8)),
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)
