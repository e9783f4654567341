"""Training and inference of the DeepLab-style segmenter (``ssr fit-seg``, ``ssr predict``).

Modules import torch (and cv2) at module level: import them only inside command bodies.

- ``transforms``: label-aligned random scale, crop and flip; input normalisation.
- ``loss``: balanced / plain cross-entropy ignoring 255.
- ``data``: the training sample stream (stateless in (seed, position), so resume is exact).
- ``distributed``: torchrun / DistributedDataParallel set-up and rank-agreement checks.
- ``checkpoint``: training checkpoints and final model files.
- ``train``: the training loop.
- ``infer``: multi-scale + flip inference and validation mIoU.
- ``crf``: dense CRF post-processing of predictions.
- ``synthetic``: a coloured-shapes dataset with exact masks (tests, benchmarks, smoke runs).
"""
