"""Datasets (VOC, COCO-as-PNG, custom folders), class vocabularies, image and mask I/O."""

from ssr_cli.data.datasets import Dataset, Item, open_dataset
from ssr_cli.data.images import read_image, read_mask, voc_palette, write_label_png
from ssr_cli.data.vocab import COCO_CLASSES, VOC_CLASSES, Vocabulary, load_vocabulary

__all__ = [
    "COCO_CLASSES",
    "VOC_CLASSES",
    "Dataset",
    "Item",
    "Vocabulary",
    "load_vocabulary",
    "open_dataset",
    "read_image",
    "read_mask",
    "voc_palette",
    "write_label_png",
]
