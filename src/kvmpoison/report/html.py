"""A static HTML page: inline CSS, no script, no external link; images sit beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from kvmpoison.report.table import LEGEND, kind_of

# One background per cell kind (the rich styles of report.table, as colours).
KIND_COLOURS = {"ok": "#c8e6c9", "ret": "#dcedc8", "vec": "#b2ebf2", "err": "#fff59d",
                "sig": "#ffcdd2", "mce": "#e1bee7", "shutdown": "#ef9a9a", "panic": "#e57373"}
OTHER_COLOUR = "#eeeeee"

CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 78em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 2px 5px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.cell { font-family: monospace; }
td.fail { outline: 2px solid #c00; }
.legend span { display: inline-block; padding: 1px 6px; margin: 2px; font-size: 0.8em;
               font-family: monospace; border: 1px solid #bbb; }
.note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def cell_td(cell: str, extra: str = "", title: str = "") -> str:
    colour = KIND_COLOURS.get(kind_of(cell), OTHER_COLOUR) if cell else "#fff"
    cls = "cell" + (f" {extra}" if extra else "")
    tip = f' title="{escape(title)}"' if title else ""
    text = escape(cell).replace(":", ":<wbr>")  # a narrow column breaks a cell after a ':'
    return f'<td class="{cls}" style="background:{colour}"{tip}>{text}</td>'


def legend_html(cells: Sequence[str]) -> str:
    kinds = {kind_of(c) for c in cells if c}
    spans = [f'<span style="background:{KIND_COLOURS[k]}">{escape(text)}</span>'
             for k, text in LEGEND.items() if k in kinds]
    return f'<p class="legend">{"".join(spans)}</p>'


def heat_map(rows: Sequence[str], designs: Sequence[str], states: Sequence[str],
             grid: dict[tuple[str, str], str]) -> str:
    """Paths down, design x page state across, each cell coloured by its kind."""
    head1 = "".join(f'<th colspan="{len(states)}">{escape(d)}</th>' for d in designs)
    head2 = "".join(f"<th>{escape(s)}</th>" for _ in designs for s in states)
    body = []
    for r in rows:
        tds = "".join(cell_td(grid.get((r, f"{d}/{s}"), "")) for d in designs for s in states)
        body.append(f"<tr><th>{escape(r)}</th>{tds}</tr>")
    return (f'<table class="heat"><tr><th rowspan="2">path</th>{head1}</tr><tr>{head2}</tr>'
            + "".join(body) + "</table>")


@dataclass
class CaseRow:
    name: str
    title: str
    # design -> (cell of the last step with an expectation, expectations all met)
    results: dict[str, tuple[str, bool]] = field(default_factory=dict)


def case_table(cases: Sequence[CaseRow], designs: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(d)}</th>" for d in designs)
    body = []
    for c in cases:
        tds = []
        for d in designs:
            if d not in c.results:
                tds.append('<td class="note">not run</td>')
                continue
            cell, ok = c.results[d]
            mark = "met" if ok else "FAILED"
            tds.append(cell_td(f"{cell} ({mark})", "" if ok else "fail",
                               f"{c.name} on {d}: expectations {mark}"))
        body.append(f"<tr><th>{escape(c.name)}</th><td>{escape(c.title)}</td>{''.join(tds)}</tr>")
    return (f"<table><tr><th>scenario</th><th>what it shows</th>{head}</tr>"
            + "".join(body) + "</table>")


@dataclass
class Figure:
    src: str
    alt: str
    caption: str


def page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole document; section bodies are HTML already escaped by their builders."""
    parts = [f"<h1>{escape(title)}</h1>", f"<p>{escape(intro)}</p>"]
    for heading, body in sections:
        parts.append(f"<h2>{escape(heading)}</h2>\n{body}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def figure_html(f: Figure) -> str:
    return (f'<figure><img src="{escape(f.src)}" alt="{escape(f.alt)}">'
            f"<figcaption>{escape(f.caption)}</figcaption></figure>")
