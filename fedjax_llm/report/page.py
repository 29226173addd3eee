"""The report as a page: the same sections written as Markdown (images beside it) and as one
self-contained HTML file (images embedded as base64 PNG, inline CSS, no script, nothing fetched)."""
from __future__ import annotations

import base64
import dataclasses
import html
import os
import re
from typing import Optional

from fedjax_llm.report.tables import md_table

STATUS_CLASS = {"complete": "ok", "stopped early": "ok", "in progress": "run", "incomplete": "warn",
                "failed": "bad", "no metrics": "warn", "unreadable": "bad"}

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;
color:#1d1d1f;line-height:1.4;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin-bottom:6px}
.meta{color:#555;font-size:13px}.meta code{font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 4px}
th,td{border:1px solid #d0d0d0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafafb}
.note{color:#555;font-size:12px;margin:2px 0 12px}
figure{margin:12px 0 22px}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#444;margin-top:4px}
.ok{color:#137333}.run{color:#1a5fb4}.warn{color:#b06000}.bad{color:#c5221f;font-weight:600}
.counts span{margin-right:14px}
"""


@dataclasses.dataclass
class Table:
    heading: str
    rows: list                     # header row, then body rows of strings
    note: str = ""


@dataclasses.dataclass
class FigureRef:
    caption: str
    path: str                      # a PNG file


@dataclasses.dataclass
class Page:
    title: str
    meta: list                     # (name, value) pairs shown under the title
    counts: dict                   # status -> number of runs
    tables: list                   # Table
    figures: list                  # FigureRef
    runs: Table                    # every run directory with its status
    notes: list                    # strings


def _is_num(text: str) -> bool:
    """A cell of numbers ('0.512 ± 0.049', '1e-05', '0, 1'): right-aligned."""
    return bool(re.fullmatch(r"[-+]?\d[\d.,eE+\- ±]*", str(text).strip()))


def _status_cell(text: str) -> str:
    return f'<span class="{STATUS_CLASS.get(text, "")}">{html.escape(text)}</span>'


def _html_table(t: Table, status_col: Optional[int] = None) -> str:
    head, *body = t.rows
    out = [f"<h3>{html.escape(t.heading)}</h3>" if t.heading else "", "<table><thead><tr>"]
    out += [f"<th>{html.escape(str(h))}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in body:
        cells = []
        for j, c in enumerate(row):
            text = "" if c is None else str(c)
            if j == status_col:
                cells.append(f"<td>{_status_cell(text)}</td>")
            else:
                cls = ' class="num"' if _is_num(text) else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{html.escape(t.note)}</p>')
    return "\n".join(out)


def png_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"report: {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def to_html(page: Page) -> str:
    """One self-contained HTML document: every figure is embedded, nothing is loaded from elsewhere."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(page.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(page.title)}</h1>", '<div class="meta">']
    parts += [f"<div><b>{esc(k)}:</b> <code>{esc(str(v))}</code></div>" for k, v in page.meta]
    parts.append('</div><p class="counts">')
    parts += [f'<span class="{STATUS_CLASS.get(s, "")}">{n} {esc(s)}</span>' for s, n in page.counts.items()]
    parts.append("</p>")
    if page.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in page.notes) + "</ul>")
    parts.append("<h2>Tables</h2>")
    parts += [_html_table(t) for t in page.tables]
    parts.append("<h2>Figures</h2>")
    for fig in page.figures:
        parts.append(f'<figure><img alt="{esc(fig.caption)}" src="{png_data_uri(fig.path)}">'
                     f"<figcaption>{esc(fig.caption)}</figcaption></figure>")
    if not page.figures:
        parts.append('<p class="note">No figures: no run with metrics to plot.</p>')
    parts.append("<h2>Runs</h2>")
    status_col = page.runs.rows[0].index("status") if page.runs.rows and "status" in page.runs.rows[0] else None
    parts.append(_html_table(page.runs, status_col))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_markdown(page: Page, out_dir: str) -> str:
    """The same page in Markdown, figures linked by their path relative to out_dir."""
    lines = [f"# {page.title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in page.meta]
    lines += ["- runs: " + ", ".join(f"{n} {s}" for s, n in page.counts.items()), ""]
    if page.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in page.notes] + [""]
    lines += ["## Tables", ""]
    for t in page.tables:
        lines += [f"### {t.heading}", "", md_table(t.rows)] + ([t.note, ""] if t.note else [])
    lines += ["## Figures", ""]
    for fig in page.figures:
        lines += [f"![{fig.caption}]({os.path.relpath(fig.path, out_dir)})", "", f"*{fig.caption}*", ""]
    lines += ["## Runs", "", md_table(page.runs.rows)]
    return "\n".join(lines)
