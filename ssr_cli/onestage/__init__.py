"""Single-stage SSR (``ssr train``): the paper's training regime, ``L_SSR = L_proto + gamma L_seg``.

- ``config``: the settings (pure Python);
- ``decoder``: the segmentation decoder on frozen CLIP's multi-layer patch tokens, and the
  inference model (frozen CLIP + decoder) that ``ssr predict`` runs;
- ``pseudo``: the online pseudo-masks of every step (projected-space GradCAM refined by the
  CLIP + DINO attention affinity with the SGC superpixel mask, then the background rule);
- ``train``: the training loop.

Everything except ``config`` imports torch: import lazily.
"""
