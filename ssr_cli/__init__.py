"""ssr-cli: pixel-level pseudo-labels from image-level labels with the SSR method."""

__version__ = "0.1.0"
