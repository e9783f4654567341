"""The training runtime shared by the training stages (``train-cmpa``, ``fit-seg``, ``train``):
process groups and rank-aware helpers (``distributed``), checkpoints with every RNG state
(``state``), the run's log (``log``), the loop around the steps (``loop``), the prototype loop
of train-cmpa and train (``proto_loop``).

Imports torch: import these modules lazily.
"""
