"""The training runtime shared by the training stages (``train-cmpa``, ``fit-seg``): process
groups and rank-aware helpers (``distributed``), checkpoints with every RNG state (``state``).

Imports torch: import these modules lazily.
"""
