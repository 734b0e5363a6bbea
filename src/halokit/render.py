"""Rendering of reports: a report is a list of blocks, written once as ``report.md`` and once as a
self-contained ``report.html`` (inline CSS, PNGs embedded as base64; the PNGs stay next to the Markdown).
Used by the training/demo reports (:mod:`halokit.report`) and the unlearning study (:mod:`halokit.unlearn_report`).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path

from halokit.errors import UserError


def write_documents(out_dir: Path, blocks: list[tuple], written: dict[str, Path]) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` of ``blocks`` (``blocks[0]`` is the h1 title) into ``out_dir``;
    add them to ``written`` and return it."""
    written["report.md"] = out_dir / "report.md"
    written["report.md"].write_text(render_md(blocks), encoding="utf-8")
    written["report.html"] = out_dir / "report.html"
    written["report.html"].write_text(render_html(blocks[0][1], blocks, out_dir), encoding="utf-8")
    return written


def load_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a results file); UserError naming the file when it is unreadable or not an object."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object")
    return results


def flatten(d: Mapping, prefix: str = "") -> list[list[str]]:
    """[["a.b.c", value as text], ...]: nested settings as rows of a two-column table."""
    rows = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            rows += flatten(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v, default=str)])
    return rows


def render_md(blocks: list[tuple]) -> str:
    """Markdown of report ``blocks``: ``(kind, *args)`` with kind h1/h2/h3/p (text), ul (items), table (header,
    rows), img (file name, alt text) or pre (text)."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(map(cell, args[0])) + " |", "|" + "---|" * len(args[0])]
            out.append("\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in args[1]]))
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
        elif kind == "pre":
            out.append(f"```\n{args[0].rstrip()}\n```")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}"""


def render_html(title: str, blocks: list[tuple], run_dir: Path) -> str:
    """Self-contained HTML of the same ``blocks``: inline CSS, images read from ``run_dir`` and embedded as base64."""
    esc = html.escape
    out = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{esc(args[0])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in args[0])
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in args[1])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((run_dir / args[0]).read_bytes()).decode("ascii")
            out.append(f"<img alt='{esc(args[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "pre":
            out.append(f"<pre>{esc(args[0])}</pre>")
    return "\n".join(out) + "\n</body></html>\n"
