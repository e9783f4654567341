"""HTML pages of ``ssr report``: self-contained (inline CSS/SVG/JS), images by relative links.

``index.html`` holds the summary and the first ``per_page`` image rows; ``page-2.html``,
... hold the rest. Each page's script sets ``data-images-loaded``, ``data-images-failed``
and ``data-images-total`` on ``<body>`` once the window has loaded (for headless checks).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ssr_cli.artefacts import atomic_write_text

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right}.cells{display:flex;flex-wrap:wrap;gap:4px}
figure{margin:0;font-size:11px;max-width:170px}figcaption{word-break:break-word}
.cm td{padding:0;width:18px;height:18px;font-size:9px;text-align:center;border:1px solid #fff}
.note{color:#555}.bad{color:#b00}nav a{margin-right:8px}pre{max-height:240px;overflow:auto;background:#f8f8f8}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var ok = 0, bad = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { bad++; }
  }
  document.body.dataset.imagesLoaded = ok;
  document.body.dataset.imagesFailed = bad;
  document.body.dataset.imagesTotal = imgs.length;
});
"""


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def page_name(page: int) -> str:
    """File name of page ``page`` (1-based)."""
    return "index.html" if page == 1 else f"page-{page}.html"


def _nav(page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = [f"<b>{p}</b>" if p == page else f'<a href="{page_name(p)}">{p}</a>' for p in range(1, pages + 1)]
    return f"<nav>pages: {' '.join(links)}</nav>"


def iou_bars_svg(classes: list[dict[str, Any]]) -> str:
    """Horizontal bars of per-class IoU (classes present in GT), as inline SVG."""
    rows = [c for c in classes if c["present"]]
    bar_h, label_w, width = 16, 130, 300
    parts = [f'<svg id="iou-bars" width="{label_w + width + 60}" height="{bar_h * len(rows) + 4}">']
    for i, c in enumerate(rows):
        y, w = i * bar_h + 2, round(width * (c["iou"] or 0.0))
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 12}" text-anchor="end" font-size="11">'
            f"{escape(c['name'])}</text>"
            f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h - 3}" fill="#4a7ab5"></rect>'
            f'<text x="{label_w + w + 4}" y="{y + 12}" font-size="11">{_pct(c["iou"])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(conf: list[list[int]], names: list[str]) -> str:
    """The confusion matrix as a heatmap table: rows GT, columns prediction, cell = % of the row.

    Only classes with ground-truth or predicted pixels get a row and a column."""
    keep = [i for i in range(len(names)) if sum(conf[i]) > 0 or sum(r[i] for r in conf) > 0]
    head = "".join(f'<th title="{escape(names[j])}">{j}</th>' for j in keep)
    body = []
    for i in keep:
        total = sum(conf[i])
        cells = []
        for j in keep:
            v = conf[i][j]
            frac = v / total if total else 0.0
            shade = round(255 * (1 - frac))
            colour = f"rgb({shade},{shade},255)" if i == j else f"rgb(255,{shade},{shade})"
            tip = f"GT {names[i]} -> {names[j]}: {v:,} px ({100 * frac:.1f}%)"
            text = f"{round(100 * frac)}" if frac >= 0.01 else ""
            cells.append(f'<td style="background:{colour}" title="{escape(tip)}">{text}</td>')
        body.append(f'<tr><th title="{escape(names[i])}">{i}</th>{"".join(cells)}</tr>')
    key = ", ".join(f"{i} {escape(names[i])}" for i in keep)
    return (
        f'<table class="cm" id="confusion"><tr><th>GT\\pred</th>{head}</tr>{"".join(body)}</table>'
        f'<p class="note">Rows: ground truth, columns: prediction; cell = % of the row\'s pixels; '
        f"classes with no pixels in either are left out. {key}</p>"
    )


def _summary(report: dict[str, Any]) -> str:
    parts = ["<h2>Runs</h2>", '<table id="runs"><tr><th>#</th><th>stage</th><th>path</th><th>items</th>']
    parts.append(
        "<th>complete</th><th>seconds</th><th>loop seconds</th><th>shards</th><th>configuration</th></tr>"
    )
    for s in report["sources"]:
        cfg = escape(json.dumps(s["config"], indent=1, sort_keys=True)) if s["config"] is not None else "-"
        star = " (primary)" if s["primary"] else ""
        parts.append(
            f"<tr><td>{s['index']}</td><td>{escape(s['stage'])}{star}</td><td>{escape(s['path'])}</td>"
            f"<td class=num>{s['items']}</td><td>{s['completed']}</td>"
            f"<td class=num>{s['seconds'] or '-'}</td>"
            f"<td class=num>{s['loop_seconds'] or '-'}</td><td class=num>{s['shards']}</td>"
            f"<td><details><summary>config</summary><pre>{cfg}</pre></details></td></tr>"
        )
    parts.append("</table>")
    sc = report["scores"]
    if sc is None:
        parts.append('<p class="note">No ground truth: no scores; images are listed by id.</p>')
        return "".join(parts)
    parts.append(
        f"<h2>Scores ({report['images_scored']} images with ground truth, one confusion matrix)</h2>"
        f"<p>mIoU <b>{_pct(sc['miou'])}</b>, mean precision {_pct(sc['mprecision'])}, "
        f"mean recall {_pct(sc['mrecall'])}, pixel accuracy {_pct(sc['pixel_accuracy'])} "
        f"(means over the {sc['classes_present']} classes present in the ground truth; %)</p>"
    )
    parts.append(iou_bars_svg(sc["classes"]))
    parts.append('<h2>Per class</h2><table id="classes"><tr><th>id</th><th>class</th><th>IoU</th>')
    parts.append("<th>precision</th><th>recall</th><th>GT pixels</th><th>predicted pixels</th></tr>")
    for c in sc["classes"]:
        style = "" if c["present"] else ' style="color:#999"'
        parts.append(
            f"<tr{style}><td>{c['id']}</td><td>{escape(c['name'])}</td><td class=num>{_pct(c['iou'])}</td>"
            f"<td class=num>{_pct(c['precision'])}</td><td class=num>{_pct(c['recall'])}</td>"
            f"<td class=num>{c['gt_pixels']:,}</td><td class=num>{c['pred_pixels']:,}</td></tr>"
        )
    parts.append("</table><h2>Confusion matrix</h2>")
    parts.append(confusion_table(report["confusion_matrix"], report["class_names"]))
    return "".join(parts)


def _rows(rows: list[dict[str, Any]], start: int) -> str:
    parts = ['<table id="images"><tr><th>#</th><th>image</th><th>IoU</th><th>pictures</th></tr>']
    for n, row in enumerate(rows, start=start):
        figs = "".join(
            f'<figure class="{c["kind"]}"><img src="{quote(c["src"])}" alt="{escape(c["title"])}">'
            f"<figcaption>{escape(c['title'])}</figcaption></figure>"
            for c in row["cells"]
        )
        cls = ' class="bad"' if row["iou"] is not None and row["iou"] < 0.5 else ""
        parts.append(
            f'<tr data-id="{escape(row["id"])}"><td class=num>{n}</td><td>{escape(row["id"])}</td>'
            f'<td class="num iou"{cls}>{_pct(row["iou"])}</td><td><div class="cells">{figs}</div></td></tr>'
        )
    parts.append("</table>")
    return "".join(parts)


def write_pages(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write the pages for ``report`` (see ``ssr_cli.stages.report.build_report``) into ``out``."""
    rows = report["rows"]
    per = int(report["per_page"])
    pages = max(1, -(-len(rows) // per))
    primary = next(s for s in report["sources"] if s["primary"])
    order = "worst first (lowest IoU)" if report["scores"] is not None else "by id"
    limit = report["limit"]
    cap = f"--limit {limit}" if limit > 0 else "no --limit"
    note = (
        f"Showing {len(rows)} of {report['images_total']} images ({cap}, sample: {report['sample']}, "
        f"seed {report['seed']}), sorted {order}, {per} per page on {pages} page(s). "
        f"Image IoU: {report['iou_rule']}, of the primary labels ({escape(primary['name'])} "
        f"{escape(primary['path'])}). Seeds labels: {report['seed_label_rule']}. "
        f"Contact sheet: first {len(report['contact_sheet']['ids'])} images."
    )
    written = []
    for page in range(1, pages + 1):
        chunk = rows[(page - 1) * per : page * per]
        body = [f"<h1>ssr report{'' if page == 1 else f' (page {page})'}</h1>"]
        body.append(f'<p class="note" id="cap">{note}</p>')
        body.append(_nav(page, pages))
        if page == 1:
            body.append(f'<p><a href="{report["contact_sheet"]["file"]}">contact sheet (PNG)</a></p>')
            body.append(_summary(report))
        body.append("<h2>Images</h2>" + _rows(chunk, (page - 1) * per + 1) + _nav(page, pages))
        text = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ssr report</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n"
        )
        path = out / page_name(page)
        atomic_write_text(path, text)
        written.append(path)
    return written
