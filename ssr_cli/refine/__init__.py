"""Spatial rectification: attention affinities (CAA/SGC), superpixel masks, dense CRF.

Modules (each imports torch/cv2/sklearn/pydensecrf, so import them lazily):

- ``affinity``: ``normalise_attention``, ``fuse_affinity``, ``box_mask``/``box_masks``,
  ``refine_cams``, ``resample_attention``;
- ``sgc``: ``sgc_masks`` / ``sgc_regions`` (SLIC superpixels -> colour clusters -> column masks);
- ``crf``: ``cams_to_probs``, ``dense_crf``, ``labels_with_confidence``.
"""
