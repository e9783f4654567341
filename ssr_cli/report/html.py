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
figure a img{border:1px solid transparent}figure a:hover img{border-color:#4a7ab5}
.cm td{padding:0;min-width:22px;height:20px;font-size:10px;text-align:center;border:1px solid #fff}
.cm th{font-weight:normal;font-size:11px;white-space:nowrap}
.cm th.col{writing-mode:vertical-rl;transform:rotate(180deg);height:auto;padding:4px 0}
.note{color:#555}.bad{color:#b00}nav a{margin-right:8px}pre{max-height:240px;overflow:auto;background:#f8f8f8}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;margin:6px 0}.legend span{white-space:nowrap}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #888;vertical-align:-3px;margin-right:4px}
.absent{background:#fff4e0}.best{font-weight:bold}#filterbar{margin:8px 0;padding:6px;background:#f4f6fa}
tr.hidden{display:none}
"""

SCRIPT = """
function ssrFilter(value) {
  var rows = document.querySelectorAll('#images tr[data-id]'), shown = 0;
  for (var i = 0; i < rows.length; i++) {
    var classes = (' ' + rows[i].getAttribute('data-classes') + ' ');
    var keep = value === '' || classes.indexOf(' ' + value + ' ') >= 0;
    rows[i].className = keep ? '' : 'hidden';
    if (keep) { shown++; }
  }
  document.getElementById('filtered').textContent = value === '' ? '' :
    shown + ' of ' + rows.length + ' images on this page have this class (in the ground truth or a run)';
  document.body.dataset.rowsShown = shown;
}
window.addEventListener('load', function () {
  var select = document.getElementById('classfilter');
  var match = /class=(\\d+)/.exec(location.hash);
  if (match) { select.value = match[1]; }
  select.addEventListener('change', function () {
    location.hash = select.value ? 'class=' + select.value : '';
    ssrFilter(select.value);
  });
  ssrFilter(select.value);
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
    """A fraction as a percentage with one decimal (the pages say "%" in the headers)."""
    return "-" if v is None else f"{100 * v:.1f}"


def _colour(palette: list[int], class_id: int) -> str:
    r, g, b = (
        palette[3 * class_id : 3 * class_id + 3] if len(palette) >= 3 * class_id + 3 else (128, 128, 128)
    )
    return f"rgb({r},{g},{b})"


def _shown_classes(report: dict[str, Any]) -> list[int]:
    """Foreground classes in the ground truth or in any run's labels of the shown images."""
    found = {c for row in report["rows"] for c in row.get("classes", [])}
    sc = report["scores"]
    if sc is not None:
        found |= {c["id"] for c in sc["classes"] if c["id"] > 0 and (c["gt_pixels"] or c["pred_pixels"])}
    return sorted(found)


def legend(report: dict[str, Any]) -> str:
    """Colour key of the label overlays: the classes that occur, background and 255."""
    names, palette = report["class_names"], report.get("palette") or []
    items = [
        f'<span><i class="sw" style="background:{_colour(palette, c)}"></i>{c} {escape(names[c])}</span>'
        for c in _shown_classes(report)
        if c < len(names)
    ]
    items.append('<span><i class="sw" style="background:#666"></i>0 background (the photo, dimmed)</span>')
    items.append('<span><i class="sw" style="background:#fff"></i>255 uncertain / ignored</span>')
    return f'<div class="legend" id="legend"><b>Label colours:</b> {"".join(items)}</div>'


def class_filter(report: dict[str, Any]) -> str:
    names = report["class_names"]
    options = "".join(
        f'<option value="{c}">{c} {escape(names[c])}</option>'
        for c in _shown_classes(report)
        if c < len(names)
    )
    return (
        '<div id="filterbar"><label>Show images with class <select id="classfilter">'
        f'<option value="">(all classes)</option>{options}</select></label> '
        '<span id="filtered" class="note"></span></div>'
    )


def page_name(page: int) -> str:
    """File name of page ``page`` (1-based)."""
    return "index.html" if page == 1 else f"page-{page}.html"


def _nav(page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = [f"<b>{p}</b>" if p == page else f'<a href="{page_name(p)}">{p}</a>' for p in range(1, pages + 1)]
    return f"<nav>pages: {' '.join(links)}</nav>"


def iou_bars_svg(classes: list[dict[str, Any]]) -> str:
    """Per-class IoU, precision and recall as grouped horizontal bars with a 0-100 % axis.

    Classes present in the ground truth or predicted; a bar of a near-zero value keeps a
    visible stub and its number; classes predicted but absent from the ground truth are
    marked (their IoU and recall are 0 by definition)."""
    rows = [c for c in classes if c["present"] or c["pred_pixels"]]
    metrics = (
        ("iou", "IoU", "#3b6fb6"),
        ("precision", "precision", "#e08a2c"),
        ("recall", "recall", "#4f9d4f"),
    )
    bar_h, group_gap, label_w, width, top = 7, 6, 170, 420, 24
    group_h = bar_h * len(metrics) + group_gap
    height = top + group_h * len(rows) + 34
    parts = [f'<svg id="iou-bars" width="{label_w + width + 70}" height="{height}" font-size="11">']
    for tick in range(0, 101, 20):  # axis, grid lines and tick labels
        x = label_w + width * tick / 100
        parts.append(
            f'<line x1="{x}" y1="{top - 4}" x2="{x}" y2="{height - 30}" stroke="#ddd"></line>'
            f'<text x="{x}" y="{height - 18}" text-anchor="middle">{tick}</text>'
        )
    parts.append(
        f'<line x1="{label_w}" y1="{height - 30}" x2="{label_w + width}" y2="{height - 30}"'
        ' stroke="#333"></line>'
        f'<text x="{label_w + width / 2}" y="{height - 4}" text-anchor="middle">score (%)</text>'
    )
    for n, (_, title, colour) in enumerate(metrics):  # key
        x = label_w + n * 110
        parts.append(
            f'<rect x="{x}" y="4" width="12" height="10" fill="{colour}"></rect>'
            f'<text x="{x + 16}" y="13">{title}</text>'
        )
    for i, c in enumerate(rows):
        y0 = top + i * group_h
        name = escape(c["name"]) + ("" if c["present"] else " (not in GT)")
        fill = "" if c["present"] else ' fill="#b45f00"'
        parts.append(f'<text x="{label_w - 6}" y="{y0 + bar_h * 2}" text-anchor="end"{fill}>{name}</text>')
        for n, (key, title, colour) in enumerate(metrics):
            value = c[key]
            y = y0 + n * bar_h
            w = 0.0 if value is None else width * value
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{max(w, 1.5):.1f}" height="{bar_h - 1}" fill="{colour}">'
                f"<title>{escape(c['name'])} {title}: {_pct(value)} %</title></rect>"
            )
            if key == "iou":  # the number, also beside a stub of a near-zero bar; the others on hover
                parts.append(
                    f'<text x="{label_w + max(w, 1.5) + 3}" y="{y + bar_h - 1}" font-size="9">'
                    f"{_pct(value)}</text>"
                )
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(conf: list[list[int]], names: list[str]) -> str:
    """The confusion matrix as a heatmap table with class names: rows GT, columns prediction,
    cell = % of the row. Only classes with ground-truth or predicted pixels get a row and a column."""
    keep = [i for i in range(len(names)) if sum(conf[i]) > 0 or sum(r[i] for r in conf) > 0]
    head = "".join(
        f'<th class="col" title="predicted {escape(names[j])}">{escape(names[j])}</th>' for j in keep
    )
    body = []
    for i in keep:
        total = sum(conf[i])
        cells = []
        for j in keep:
            v = conf[i][j]
            frac = v / total if total else 0.0
            shade = round(255 * (1 - frac))
            colour = f"rgb({shade},{shade},255)" if i == j else f"rgb(255,{shade},{shade})"
            tip = f"GT {names[i]} -> predicted {names[j]}: {v:,} px ({100 * frac:.1f} % of the row)"
            text = f"{round(100 * frac)}" if frac >= 0.005 else ""
            ink = ";color:#fff" if frac > 0.6 else ""  # readable on the dark cells
            cells.append(f'<td style="background:{colour}{ink}" title="{escape(tip)}">{text}</td>')
        label = escape(names[i]) + ("" if total else " (not in GT)")
        body.append(f'<tr><th title="ground truth {escape(names[i])}">{label}</th>{"".join(cells)}</tr>')
    return (
        f'<table class="cm" id="confusion"><tr><th>ground truth \\ predicted</th>{head}</tr>'
        f"{''.join(body)}</table>"
        '<p class="note">Rows: ground truth, columns: prediction; cell = % of the row\'s pixels '
        "(diagonal blue: correct, red: confusions); hover a cell for pixel counts; classes with no pixels "
        "in either are left out.</p>"
    )


def _runs_table(report: dict[str, Any]) -> str:
    parts = ['<h2>Runs</h2><table id="runs"><tr><th>#</th><th>stage</th><th>path</th><th>items</th>']
    parts.append(
        "<th>complete</th><th>seconds</th><th>loop seconds</th><th>shards</th><th>sessions</th>"
        "<th>configuration</th></tr>"
    )
    for s in report["sources"]:
        cfg = escape(json.dumps(s["config"], indent=1, sort_keys=True)) if s["config"] is not None else "-"
        star = " (primary)" if s["primary"] else ""
        shards = "-" if s.get("shards") is None else s["shards"]
        sessions = "-" if s.get("sessions") is None else s["sessions"]
        parts.append(
            f"<tr><td>{s['index']}</td><td>{escape(s['stage'])}{star}</td><td>{escape(s['path'])}</td>"
            f"<td class=num>{s['items']}</td><td>{s['completed']}</td>"
            f"<td class=num>{s['seconds'] or '-'}</td>"
            f"<td class=num>{s['loop_seconds'] or '-'}</td><td class=num>{shards}</td>"
            f"<td class=num>{sessions}</td>"
            f"<td><details><summary>config</summary><pre>{cfg}</pre></details></td></tr>"
        )
    parts.append(
        '</table><p class="note">shards: distinct --shard parts that wrote the run; sessions: '
        "times a command worked on it (resumed runs have more).</p>"
    )
    return "".join(parts)


def _compare_tables(report: dict[str, Any]) -> str:
    """Every labelled run scored side by side: the means, then per-class IoU."""
    runs = [r for r in report.get("run_scores", []) if r["scores"] is not None]
    if not runs:
        return ""
    best = max(r["scores"]["miou"] or 0.0 for r in runs)
    parts = ['<h2>Runs compared (%)</h2><table id="compare"><tr><th>run</th><th>images scored</th>']
    parts.append("<th>mIoU</th><th>mean precision</th><th>mean recall</th><th>pixel accuracy</th></tr>")
    for r in runs:
        sc = r["scores"]
        cls = ' class="best"' if (sc["miou"] or 0.0) == best else ""
        parts.append(
            f"<tr{cls}><td>{escape(r['name'])}{' (primary)' if r['primary'] else ''}</td>"
            f"<td class=num>{r['images_scored']}</td><td class=num>{_pct(sc['miou'])}</td>"
            f"<td class=num>{_pct(sc['mprecision'])}</td><td class=num>{_pct(sc['mrecall'])}</td>"
            f"<td class=num>{_pct(sc['pixel_accuracy'])}</td></tr>"
        )
    parts.append("</table>")
    names = report["class_names"]
    ids = [
        c
        for c in range(len(names))
        if any(r["scores"]["classes"][c]["present"] or r["scores"]["classes"][c]["pred_pixels"] for r in runs)
    ]
    head = "".join(f"<th>{escape(r['name'])}</th>" for r in runs)
    parts.append(
        f'<h3>IoU per class and run (%)</h3><table id="compare-classes"><tr><th>class</th>{head}</tr>'
    )
    for c in ids:
        values = [r["scores"]["classes"][c]["iou"] for r in runs]
        top = max((v for v in values if v is not None), default=None)
        marked = top if top and len(runs) > 1 else None  # the best run of the class (none on a tie at 0)
        cells = "".join(
            f'<td class="num{" best" if v is not None and v == marked else ""}">{_pct(v)}</td>'
            for v in values
        )
        present = runs[0]["scores"]["classes"][c]["present"]
        label = f"{c} {escape(names[c])}" + ("" if present else " (not in GT)")
        parts.append(f"<tr{'' if present else ' class=absent'}><td>{label}</td>{cells}</tr>")
    parts.append("</table>")
    return "".join(parts)


def _summary(report: dict[str, Any]) -> str:
    parts = [_runs_table(report)]
    sc = report["scores"]
    if sc is None:
        parts.append('<p class="note">No ground truth: no scores; images are listed by id.</p>')
        return "".join(parts)
    parts.append(_compare_tables(report))
    parts.append(
        f"<h2>Scores of the primary run ({report['images_scored']} images with ground truth, "
        "one confusion matrix)</h2>"
        f"<p>mIoU <b>{_pct(sc['miou'])} %</b>, mean precision {_pct(sc['mprecision'])} %, "
        f"mean recall {_pct(sc['mrecall'])} %, pixel accuracy {_pct(sc['pixel_accuracy'])} % "
        f"(means over the {sc['classes_present']} classes present in the ground truth)</p>"
    )
    parts.append(iou_bars_svg(sc["classes"]))
    parts.append('<h2>Per class (%)</h2><table id="classes"><tr><th>id</th><th>class</th><th>IoU</th>')
    parts.append("<th>precision</th><th>recall</th><th>GT pixels</th><th>predicted pixels</th></tr>")
    for c in sc["classes"]:
        if c["present"]:
            style, note = "", ""
        elif c["pred_pixels"]:
            style, note = " class=absent", " (predicted, not in GT: false positives only)"
        else:
            style, note = ' style="color:#999"', ""
        parts.append(
            f"<tr{style}><td>{c['id']}</td><td>{escape(c['name'])}{note}</td>"
            f"<td class=num>{_pct(c['iou'])}</td>"
            f"<td class=num>{_pct(c['precision'])}</td><td class=num>{_pct(c['recall'])}</td>"
            f"<td class=num>{c['gt_pixels']:,}</td><td class=num>{c['pred_pixels']:,}</td></tr>"
        )
    parts.append("</table><h2>Confusion matrix (primary run)</h2>")
    parts.append(confusion_table(report["confusion_matrix"], report["class_names"]))
    return "".join(parts)


def _rows(rows: list[dict[str, Any]], start: int) -> str:
    parts = [
        '<table id="images"><tr><th>#</th><th>image</th><th>IoU (%)</th>'
        "<th>pictures (click: full size)</th></tr>"
    ]
    for n, row in enumerate(rows, start=start):
        figs = "".join(
            f'<figure class="{c["kind"]}"><a href="{quote(c.get("full") or c["src"])}" target="_blank">'
            f'<img src="{quote(c["src"])}" alt="{escape(c["title"])}"></a>'
            f"<figcaption>{escape(c['title'])}</figcaption></figure>"
            for c in row["cells"]
        )
        cls = ' class="bad"' if row["iou"] is not None and row["iou"] < 0.5 else ""
        classes = " ".join(str(c) for c in row.get("classes", []))
        parts.append(
            f'<tr data-id="{escape(row["id"])}" data-classes="{classes}"><td class=num>{n}</td>'
            f"<td>{escape(row['id'])}</td>"
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
        body.append("<h2>Images</h2>" + legend(report) + class_filter(report))
        body.append(_rows(chunk, (page - 1) * per + 1) + _nav(page, pages))
        text = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ssr report</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n"
        )
        path = out / page_name(page)
        atomic_write_text(path, text)
        written.append(path)
    return written
