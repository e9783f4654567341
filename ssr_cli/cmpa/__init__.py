"""CMPA, cross-modal prototype alignment (METHOD.md section 2): the training of the ISA/TSA
heads of ``ssr_cli.models.cmpa``.

- ``data.py``: stateless sample stream and label-preserving augmentations;
- ``prototypes.py``: CAM-weighted features, streaming collection, K-means / EMA prototypes;
- ``loss.py``: the prototype contrastive (InfoNCE) loss with a learnable temperature;
- ``train.py``: the training loop (single process or DistributedDataParallel).

Every module imports torch: import them lazily (inside command bodies).
"""
