"""Models: CLIP wrapper (tokens, attention), weight resolution and loading.

Only ``weights`` is light; ``clip`` imports torch and open_clip, so import it
lazily (inside command bodies).
"""
