"""Dense CRF post-processing of segmenter predictions (``ssr predict --crf``).

The CRF and its settings are the refine stage's (``ssr_cli.refine.crf``: ``CRFParams``, CLIP-ES's
numbers); predictions keep its plain argmax (no 0.95 confidence rule: that is for
pseudo-labels).
"""

from __future__ import annotations

import numpy as np

from ssr_cli.refine.config import CRFParams


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    ``image``: HxWx3 uint8 RGB; ``probs``: KxHxW float (each pixel sums to 1).
    Returns the posterior marginals, KxHxW float32.
    """
    from ssr_cli.refine.crf import dense_crf as refine_crf

    return refine_crf(np.ascontiguousarray(image, dtype=np.uint8), probs, **params.to_dict())
