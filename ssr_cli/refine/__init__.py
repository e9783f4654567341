"""Spatial rectification: attention affinities (CAA/SGC), superpixel masks, dense CRF.

Modules (each imports torch/cv2/sklearn/pydensecrf, so import them lazily):

- ``affinity``: ``normalise_attention``, ``fuse_affinity``, ``box_mask``/``box_masks``,
  ``refine_cams``, ``resample_attention`` (CLIP-ES's CAA; SSR's fused affinity);
- ``sgc``: ``sgc_masks`` / ``sgc_regions`` with ``SGCParams`` (SLIC superpixels ->
  K-means colour clusters -> target regions -> column masks on the patch grid);
- ``crf``: ``cams_to_probs``, ``dense_crf``, ``labels_with_confidence``.

DINO attention for the fused affinity lives in ``ssr_cli.models.dino``.
"""
