"""The two renderers of a :class:`core.document.Document`: Markdown (figures beside it as files) and
HTML (figures embedded; tables scroll in their own box so the page reads on a phone)."""

from __future__ import annotations

import base64
import html
import re

from core.document import Block, Bullets, Document, Figure, Paragraph, Table

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:100%}
h1{font-size:1.5em} h2{font-size:1.2em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:85%;white-space:nowrap;text-align:left}
th{background:#f0f0f0}
img{max-width:100%;height:auto}
li{margin:0.2em 0}
@media (max-width:600px){body{margin:0.6em} td,th{font-size:80%;padding:3px 5px}}"""


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block) -> list[str]:
    if isinstance(b, Paragraph):
        return [b.text, ""]
    if isinstance(b, Bullets):
        return [*(f"- {i}" for i in b.items), ""]
    if isinstance(b, Table):
        width = len(b.header)
        lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * width]
        for row in b.rows:
            cells = [_md_cell(c) for c in row] + [""] * (width - len(row))
            lines.append("| " + " | ".join(cells) + " |")
        return [*lines, ""]
    if isinstance(b, Figure):
        return [f"![{b.alt}]({b.name})", ""]
    raise TypeError(f"unknown report block {type(b).__name__}")


def to_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.preamble:
        lines += _md_block(b)
    for s in doc.sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            lines += _md_block(b)
    return "\n".join(lines).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** as HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html_block(b: Block) -> str:
    if isinstance(b, Paragraph):
        return f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        width = len(b.header)
        head = "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b.header) + "</tr>"
        rows = []
        for row in b.rows:
            cells = [f"<td>{_inline(c)}</td>" for c in row[:-1]]
            span = width - len(row) + 1
            cells.append(f"<td colspan='{span}'>{_inline(row[-1])}</td>" if span > 1 else f"<td>{_inline(row[-1])}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        return f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>"
    if isinstance(b, Figure):
        return f"<img alt='{html.escape(b.alt, quote=True)}' src='data:image/png;base64,{base64.b64encode(b.png).decode()}'>"
    raise TypeError(f"unknown report block {type(b).__name__}")


def to_html(doc: Document) -> str:
    parts = [f"<h1>{html.escape(doc.title)}</h1>", *(_html_block(b) for b in doc.preamble)]
    for s in doc.sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [_html_block(b) for b in s.blocks]
    body = "\n".join(parts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(doc.title)}</title>
<style>
{CSS}
</style>
</head><body>
{body}
</body></html>
"""
