"""``summary.md`` as one HTML page, for ``snakemake --report`` (which shows HTML, not Markdown).

``markdown_to_html(text) -> str`` renders the subset the report writes: ``#``-headings, pipe
tables, ``-`` bullets, paragraphs, inline ``code`` and ``**bold**``. An image line becomes a
note naming the figure: the report shows each figure itself, captioned.
"""

from __future__ import annotations

import html
import re

__all__ = ["markdown_to_html"]

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]*)\)")
_STYLE = (
    "body{font-family:sans-serif;max-width:80em;margin:1em auto;font-size:14px}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 6px;vertical-align:top}"
    "th{background:#eee}code{font-size:90%}"
)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{_STYLE}</style></head><body>"]
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1
            body = [row for row in rows[1:] if not all(set(cell) <= {"-", ":"} for cell in row)]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
            continue
        elif line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(f"<li>{_inline(lines[index][2:])}</li>")
                index += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif _IMAGE.search(line):
            names = ", ".join(match.group(1) for match in _IMAGE.finditer(line))
            out.append(f"<p><em>Figures: {html.escape(names)} (each shown in this report, captioned).</em></p>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        index += 1
    return "\n".join(out + ["</body></html>", ""])
