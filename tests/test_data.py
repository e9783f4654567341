"""Vocabularies, image/mask I/O and dataset layouts, on real photos and real VOC masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from ssr_cli.data import (
    VOC_CLASSES,
    load_vocabulary,
    open_dataset,
    read_image,
    read_mask,
    voc_palette,
    write_label_png,
)
from ssr_cli.data.vocab import Vocabulary
from ssr_cli.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)

MASKS = Path(__file__).resolve().parent / "data" / "voc2012_val_masks"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def mask_files() -> list[Path]:
    files = sorted(MASKS.glob("*.png"))
    assert len(files) >= 6, f"real VOC masks expected in {MASKS}"
    return files


def photo(index: int, size: tuple[int, int]) -> Image.Image:
    """A real photo from skimage.data resized to ``size`` (W, H), as RGB."""
    array = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
    return Image.fromarray(array).convert("RGB").resize(size, Image.BILINEAR)


def xml_for(names: list[str]) -> str:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return f"<annotation><folder>VOC2012</folder>{objects}</annotation>\n"


def classes_of(mask_path: Path) -> tuple[int, ...]:
    values = np.unique(np.asarray(Image.open(mask_path)))
    return tuple(int(v) for v in values if 0 < v < 255)


def build_voc(root: Path, n: int = 6) -> tuple[Path, list[str]]:
    """VOCdevkit/VOC2012 with n images: masks of the first 4 in SegmentationClass, all in
    SegmentationClassAug beside VOC2012; train = first 4, train_aug = all."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    (root / "VOCdevkit" / "SegmentationClassAug").mkdir()
    ids = []
    for index, mask in enumerate(mask_files()[:n]):
        image_id = mask.stem
        ids.append(image_id)
        with Image.open(mask) as m:
            photo(index, m.size).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=85)
        if index < 4:
            shutil.copy(mask, voc / "SegmentationClass" / mask.name)
        shutil.copy(mask, root / "VOCdevkit" / "SegmentationClassAug" / mask.name)
        names = [VOC_CLASSES[c - 1] for c in classes_of(mask)]
        (voc / "Annotations" / f"{image_id}.xml").write_text(xml_for(names))
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids[4:]) + "\n")
    (sets / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    )
    return voc, ids


def build_custom(root: Path) -> Path:
    """images/ (one nested), labels.txt (both name formats), vocab.json, masks/ for two images."""
    (root / "images" / "street").mkdir(parents=True)
    (root / "masks").mkdir()
    photo(0, (64, 48)).save(root / "images" / "a.jpg")
    photo(1, (40, 40)).save(root / "images" / "b.png")
    photo(2, (50, 30)).save(root / "images" / "street" / "c.jpeg")
    masks = np.zeros((48, 64), np.uint8)
    masks[10:20, 10:30] = 1
    masks[30:40, 5:15] = 3
    masks[0, :] = 255
    write_label_png(root / "masks" / "a.png", masks)
    write_label_png(root / "masks" / "b.png", np.full((40, 40), 2, np.uint8))
    vocab = {"name": "pets", "classes": ["cat", {"name": "potted plant", "prompt": "plant in a pot"}, "dog"]}
    (root / "vocab.json").write_text(json.dumps(vocab, indent=2))
    (root / "labels.txt").write_text(
        "# id then classes\n\na cat dog\nb, Potted Plant\n\nstreet/c potted_plant cat cat  # dup name ok\n"
    )
    return root


# ---------------------------------------------------------------- vocabularies


def test_builtin_voc_vocabulary_matches_clip_es():
    voc = load_vocabulary("voc")
    assert voc.classes[0] == "aeroplane" and voc.classes[-1] == "tvmonitor" and len(voc.classes) == 20
    assert voc.num_classes == 21
    changed = {c: p for c, p in zip(voc.classes, voc.prompts, strict=True) if c != p}
    assert changed == {
        "bird": "bird avian",
        "chair": "chair seat",
        "person": "person with clothes,people,human",
        "tvmonitor": "tvmonitor screen",
    }
    assert voc.templates == ("a clean origami {}.",)
    assert len(voc.background) == 25 and voc.background[:4] == ("ground", "land", "grass", "tree")
    assert voc.background[-1] == "sign" and "keyboard" in voc.background
    assert voc.class_id("Potted_Plant") == voc.class_id("pottedplant") == 16
    assert voc.class_id("motorcycle") == voc.class_id("MOTORBIKE") == 14
    with pytest.raises(KeyError):
        voc.class_id("giraffe")


def test_builtin_coco_vocabulary():
    coco = load_vocabulary("COCO")
    assert len(coco.classes) == 80 and coco.classes[0] == "person" and coco.classes[-1] == "toothbrush"
    prompts = dict(zip(coco.classes, coco.prompts, strict=True))
    assert prompts["backpack"] == "backpack,bag" and prompts["umbrella"] == "umbrella,parasol"
    assert prompts["tie"] == "necktie" and prompts["tv"] == "tvmonitor screen"
    voc_bg = load_vocabulary("voc").background
    assert coco.background == tuple(w for w in voc_bg if w not in ("keyboard", "sign"))
    assert coco.class_id("motorbike") == coco.class_id("motorcycle") == 4
    assert coco.class_id("dining_table") == coco.class_id("diningtable") == 61
    assert coco.fingerprint() != load_vocabulary("voc").fingerprint()


def test_custom_vocabulary_defaults_and_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps({"classes": ["cat", {"name": "tv", "prompt": "tv screen", "aliases": ["telly"]}]})
    )
    vocab = load_vocabulary(path)
    assert vocab.name == "mine" and vocab.classes == ("cat", "tv") and vocab.prompts == ("cat", "tv screen")
    assert vocab.templates == load_vocabulary("voc").templates
    assert vocab.background == load_vocabulary("voc").background
    assert vocab.class_id("Telly") == 2
    again = tmp_path / "again.json"
    again.write_text(json.dumps(vocab.to_dict()))
    assert load_vocabulary(again) == vocab
    renamed = Vocabulary.from_dict({**vocab.to_dict(), "name": "other"})
    assert renamed.fingerprint() == vocab.fingerprint()
    reprompted = Vocabulary.from_dict({**vocab.to_dict(), "classes": ["cat", "tv"]})
    assert reprompted.fingerprint() != vocab.fingerprint()


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('{"classes": ["cat",\n "dog"\n "cow"]}', 3, "not valid JSON"),
        ('{"name": "x"}', None, "classes"),
        ('{"classes": []}', 1, "classes"),
        ('{"classes": [\n"cat",\n"dog",\n"Cat"]}', 4, "duplicate class"),
        ('{"classes": ["cat"],\n "templates": ["a photo of a cat."]}', 2, "{}"),
        ('{"classes": ["cat"], "template": ["a {}."]}', 1, "unknown key"),
        ('{"classes": ["background", "cat"]}', 1, "background"),
    ],
)
def test_malformed_vocabulary_names_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "vocab.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_vocabulary(path)
    assert info.value.path == str(path) and info.value.line == line
    assert words in str(info.value)


def test_missing_vocabulary():
    with pytest.raises(DataError, match="vocabulary not found"):
        load_vocabulary("cityscapes")


# ---------------------------------------------------------------- images and masks


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P-transparent", "CMYK", "I;16", "I", "F", "1"])
def test_read_image_converts_every_mode(tmp_path, mode):
    rgb = np.asarray(photo(1, (90, 60)))
    gray = np.asarray(photo(1, (90, 60)).convert("L"))
    if mode == "I;16":
        image, expected = Image.fromarray(gray.astype(np.uint16) * 257), np.dstack([gray] * 3)
    elif mode == "I":
        image = Image.fromarray(gray.astype(np.int32) * 10 - 500)  # outside 0..65535: stretched
        expected = np.dstack([np.rint((gray - gray.min()) * 255.0 / (gray.max() - gray.min()))] * 3)
    elif mode == "F":
        image, expected = Image.fromarray(gray.astype(np.float32) / 255), np.dstack([gray] * 3)
    elif mode == "P-transparent":
        image = Image.fromarray(rgb).convert("P")
        expected = np.asarray(image.convert("RGB"))
    else:
        image = Image.fromarray(rgb).convert(mode)
        expected = np.asarray(image.convert("RGB"))
    suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"img{suffix}"
    image.save(path, **({"transparency": 0} if mode == "P-transparent" else {}))
    with Image.open(path) as reopened:
        assert reopened.mode == mode.split("-")[0]
    out = read_image(path)
    assert out.shape == (60, 90, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_read_image_rgba_drops_alpha(tmp_path):
    rgb = np.asarray(photo(0, (32, 24)))
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_an_error(tmp_path, fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = tmp_path / f"x.{fmt.lower()}"
    photo(0, (200, 150)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(DataError, match="image not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(tmp_path / "text.jpg")


def test_real_voc_masks_round_trip(tmp_path):
    palette = voc_palette()
    assert len(palette) == 768 and palette[765:] == [224, 224, 192]
    seen: set[int] = set()
    for path in mask_files():
        mask = read_mask(path)
        with Image.open(path) as stored:
            stored_palette = stored.getpalette()
            assert np.array_equal(mask, np.asarray(stored))
        assert stored_palette[: 21 * 3] == palette[: 21 * 3] and stored_palette[765:768] == palette[765:]
        seen |= {int(v) for v in np.unique(mask)}
        out = tmp_path / path.name
        write_label_png(out, mask)
        assert np.array_equal(read_mask(out), mask)
        with Image.open(out) as written:
            assert written.mode == "P" and written.getpalette()[:768] == palette
    assert 255 in seen and 0 in seen and seen <= set(range(21)) | {255} and len(seen) > 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_read_mask_other_encodings(tmp_path):
    mask = read_mask(mask_files()[0])
    Image.fromarray(mask, mode="L").save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png"), mask)
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "16.png")
    assert np.array_equal(read_mask(tmp_path / "16.png"), mask)
    colours = np.array(voc_palette(), np.uint8).reshape(256, 3)[mask]
    Image.fromarray(colours).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), mask)
    colours[3, 4] = (1, 2, 3)
    Image.fromarray(colours).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"\(1, 2, 3\)"):
        read_mask(tmp_path / "bad.png")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match="outside"):
        read_mask(tmp_path / "wide.png")


def test_write_label_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError):
        write_label_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        write_label_png(tmp_path / "x.png", np.full((2, 2), 256))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- layouts


@pytest.fixture
def voc(tmp_path):
    return build_voc(tmp_path)


def test_voc_layout_labels_from_masks_and_xml(voc, tmp_path):
    folder, ids = voc
    for root in (tmp_path, tmp_path / "VOCdevkit", folder):  # any of the three levels works
        data = open_dataset(root)
        assert data.layout == "voc" and data.split == "train" and data.root == folder
    assert data.ids == ids[:4] and data.label_source == "mask" and data.has_gt
    for item in data.items:
        assert item.gt == folder / "SegmentationClass" / f"{item.id}.png"
        assert item.labels == classes_of(item.gt) and item.labels
    xml = open_dataset(folder, labels="xml")
    assert xml.label_source == "xml" and [i.labels for i in xml.items] == [i.labels for i in data.items]
    assert xml.fingerprint() == data.fingerprint()  # same ids, labels, files, vocabulary
    aug = open_dataset(folder, split="train_aug")
    assert aug.ids == ids and aug.label_source == "mask"
    assert aug.items[5].gt == tmp_path / "VOCdevkit" / "SegmentationClassAug" / f"{ids[5]}.png"
    json.dumps(aug.describe())


def test_voc_labels_fall_back_to_xml_without_masks(voc):
    folder, ids = voc
    shutil.rmtree(folder.parent / "SegmentationClassAug")
    val = open_dataset(folder, split="val")
    assert val.label_source == "xml" and not val.has_gt and val.gt_count == 0
    assert [i.labels for i in val.items] == [classes_of(MASKS / f"{i}.png") for i in ids[4:]]
    with pytest.raises(DataError) as info:
        open_dataset(folder, split="val", labels="mask")
    assert info.value.path == str(folder / "SegmentationClass" / f"{ids[4]}.png")
    with pytest.raises(DataError, match="ground-truth mask not found"):
        open_dataset(folder, split="val", require_gt=True)
    override = open_dataset(folder, split="val", gt=MASKS, require_gt=True)
    assert override.items[0].gt == MASKS / f"{ids[4]}.png" and override.label_source == "mask"


def expect_error(match: str, path: Path, line: int | None = None, **kwargs) -> DataError:
    root = kwargs.pop("root")
    with pytest.raises(DataError) as info:
        open_dataset(root, **kwargs)
    error = info.value
    assert match in str(error), str(error)
    assert error.path == str(path) and error.line == line, str(error)
    assert "\n" not in str(error)
    return error


def test_voc_bad_inputs(voc):
    folder, ids = voc
    sets = folder / "ImageSets" / "Segmentation"
    error = expect_error("split 'trian' not found", sets / "trian.txt", root=folder, split="trian")
    assert "train, train_aug, val" in str(error)
    (sets / "empty.txt").write_text("\n# nothing\n")
    expect_error("lists no images", sets / "empty.txt", root=folder, split="empty")
    (sets / "dup.txt").write_text(f"{ids[0]}\n{ids[1]}\n{ids[0]}\n")
    expect_error("duplicate image id", sets / "dup.txt", 3, root=folder, split="dup")
    (sets / "gone.txt").write_text(f"{ids[0]}\n2099_000001\n")
    error = expect_error(
        "image not found", folder / "JPEGImages" / "2099_000001.jpg", root=folder, split="gone"
    )
    assert f"{sets / 'gone.txt'}:2" in str(error)
    (folder / "Annotations" / f"{ids[1]}.xml").unlink()
    expect_error(
        "XML annotation not found", folder / "Annotations" / f"{ids[1]}.xml", root=folder, labels="xml"
    )
    broken = folder / "Annotations" / f"{ids[4]}.xml"
    good = broken.read_text()
    broken.write_text("<annotation>\n<object><name>cat</name>\n</annotation>")
    expect_error("malformed XML", broken, 3, root=folder, split="val", labels="xml")
    broken.write_text(good)
    path = folder / "Annotations" / f"{ids[5]}.xml"
    path.write_text(xml_for(["cat", "unicorn"]))
    expect_error("unknown class 'unicorn'", path, 1, root=folder, split="val", labels="xml")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\\b", "a/../../b", "./a"])
def test_ids_that_escape_the_root(voc, bad):
    folder, ids = voc
    split = folder / "ImageSets" / "Segmentation" / "bad.txt"
    split.write_text(f"{ids[0]}\n{bad}\n")
    expect_error("image id", split, 2, root=folder, split="bad")


def test_custom_layout(tmp_path):
    root = build_custom(tmp_path / "pets")
    data = open_dataset(root)
    assert data.layout == "custom" and data.split == "all" and data.vocab.name == "pets"
    assert data.ids == ["a", "b", "street/c"] and data.label_source == f"file:{root / 'labels.txt'}"
    assert [i.labels for i in data.items] == [(1, 3), (2,), (1, 2)]
    assert data.items[2].image == root / "images" / "street" / "c.jpeg"
    assert data.items[0].gt == root / "masks" / "a.png" and data.items[2].gt is None and not data.has_gt
    assert data.get("b").image.suffix == ".png" and "street/c" in data
    with pytest.raises(DataError, match="not in this dataset"):
        data.get("zzz")
    data.items.reverse()  # changed in place: lookups follow
    assert data.get("a") is data.items[2] and data.ids[0] == "street/c"
    data.items = data.items[:1]
    assert "a" not in data and len(data) == 1
    data = open_dataset(root)
    (root / "splits").mkdir()
    (root / "splits" / "masked.txt").write_text("a\nb\n")
    masked = open_dataset(root, split="masked", labels="mask")
    assert masked.label_source == "mask" and [i.labels for i in masked.items] == [(1, 3), (2,)]
    assert open_dataset(root, split="masked").label_source.startswith("file:")
    other = tmp_path / "other.txt"
    other.write_text("a dog\nb cat\nstreet/c\n")
    relabelled = open_dataset(root, labels=other)
    assert [i.labels for i in relabelled.items] == [(3,), (1,), ()]
    assert relabelled.fingerprint() != data.fingerprint()
    assert open_dataset(root, labels="none").items[0].labels == ()


def test_custom_bad_inputs(tmp_path):
    root = build_custom(tmp_path / "pets")
    labels = root / "labels.txt"
    labels.write_text("a cat\nb potted plant\n")
    error = expect_error("unknown class 'potted'", labels, 2, root=root)
    assert "commas" in str(error)
    labels.write_text("a cat\nb dog\n\na dog\n")
    expect_error("duplicate image id 'a' (first on line 1)", labels, 4, root=root)
    labels.write_text("a cat\n, dog\n")
    expect_error("empty image id", labels, 2, root=root)
    labels.write_text("a cat\n../../etc/passwd dog\n")
    expect_error("image id", labels, 2, root=root)
    labels.write_text("a cat\nd dog\n")
    expect_error("image not found", root / "images" / "d.jpg", root=root)
    labels.write_text("a cat\n")
    (root / "splits").mkdir()
    (root / "splits" / "two.txt").write_text("a\nb\n")
    expect_error("no labels for image 'b'", labels, root=root, split="two")
    expect_error("split 'three' not found", root / "splits" / "three.txt", root=root, split="three")
    expect_error("label file not found", root / "nope.txt", root=root, labels=root / "nope.txt")
    (root / "vocab.json").unlink()
    expect_error("no vocabulary", root / "vocab.json", root=root)
    assert open_dataset(root, vocab="voc", labels="none").vocab.name == "voc"
    with pytest.raises(ConfigError):
        open_dataset(root, layout="kitti")


def test_coco_layout(tmp_path):
    root = tmp_path / "coco"
    (root / "JPEGImages" / "train2014").mkdir(parents=True)
    (root / "SegmentationClass" / "train2014").mkdir(parents=True)
    (root / "JPEGImages" / "val2014").mkdir()
    ids = []
    for index, mask in enumerate(mask_files()[:3]):
        image_id = f"COCO_train2014_{index:012d}"
        ids.append(image_id)
        with Image.open(mask) as m:
            photo(index, m.size).save(root / "JPEGImages" / "train2014" / f"{image_id}.jpg")
        shutil.copy(mask, root / "SegmentationClass" / "train2014" / f"{image_id}.png")
    data = open_dataset(root)
    assert data.layout == "coco" and data.split == "train2014" and data.vocab.name == "coco"
    assert data.ids == ids and data.label_source == "mask" and data.has_gt
    assert [i.labels for i in data.items] == [classes_of(m) for m in mask_files()[:3]]
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train2014.txt").write_text(f"{ids[2]}\n{ids[0]}\n")
    assert open_dataset(root).ids == [ids[2], ids[0]]
    error = expect_error(
        "split 'train2017' not found", root / "JPEGImages" / "train2017", root=root, split="train2017"
    )
    assert "train2014, val2014" in str(error)


def test_fingerprint_ignores_paths_but_not_content(tmp_path):
    first = build_custom(tmp_path / "one")
    second = tmp_path / "two"
    shutil.copytree(first, second)
    assert open_dataset(first).fingerprint() == open_dataset(second).fingerprint()
    photo(3, (64, 48)).save(second / "images" / "a.jpg", quality=50)
    assert open_dataset(first).fingerprint() != open_dataset(second).fingerprint()
    described = open_dataset(first).describe()
    assert described["count"] == 3 and described["vocab"] == "pets" and json.dumps(described)


def test_layout_detection_failure(tmp_path):
    (tmp_path / "stuff").mkdir()
    expect_error("cannot tell the dataset layout", tmp_path, root=tmp_path)
    expect_error("dataset folder not found", tmp_path / "nope", root=tmp_path / "nope")
