"""Training and inference of the DeepLab-style segmenter (``ssr fit-seg``, ``ssr predict``).

Modules import torch (and cv2) at module level, except ``config`` and ``recipes``: import them
only inside command bodies.

- ``config``: ``TrainConfig`` (every fit-seg default) and the names of the losses and optimizers.
- ``recipes``: the per-head training recipes (learning rates, decays).
- ``transforms``: label-aligned random scale, crop and flip; input normalisation.
- ``loss``: balanced / plain cross-entropy ignoring 255.
- ``data``: the training sample stream (stateless in (seed, position), so resume is exact).
- ``checkpoint``: training checkpoints and final model files.
- ``train``: the step of the training loop (the loop itself: ``ssr_cli.train``).
- ``infer``: multi-scale + flip inference and validation mIoU.
- ``synthetic``: a coloured-shapes dataset with exact masks (tests, benchmarks, smoke runs).

The dense CRF of ``ssr predict --crf`` is refine's (``ssr_cli.refine.crf``).
"""
