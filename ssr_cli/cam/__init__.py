"""CAMs: text embeddings of a vocabulary, GradCAM, CAM -> label maps.

``labels`` is numpy-only; ``prompts`` and ``gradcam`` import torch, so import them
lazily (inside command bodies).
"""
