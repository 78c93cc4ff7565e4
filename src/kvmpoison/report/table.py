"""Render a grid of cells (rows x columns) as a rich table, Markdown or JSON.

Cells are never cut. A table wider than the console first breaks long cells
after a ``:`` (``sig:SIGBUS:`` / ``BUS_MCEERR_AR``) and headers after a ``/``;
if it is still too wide, its columns continue in a second table below, the
row names repeated. A legend names every kind of cell the table holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is loaded only to draw (``kvmpoison run --format json`` never does)
    from rich.console import Console

_STYLE = {"ok": "green", "ret": "green", "vec": "cyan", "smaps": "cyan", "err": "yellow",
          "sig": "red", "mce": "magenta", "shutdown": "bold red", "panic": "bold red"}

# One entry per cell kind (docs/matrix.md, "Cell notation"), in the order a legend lists them.
LEGEND = {
    "ok": "ok = the access succeeded",
    "ret": "ret:N = the call returned N (bytes moved, or 0)",
    "err": "err:NAME = the call failed with errno NAME",
    "sig": "sig:SIG:CODE = the access raised signal SIG with si_code CODE",
    "vec": "vec:B = mincore's vector byte (vec:B*N,... = runs of N pages, THP probes)",
    "smaps": "smaps:... = the THP region's smaps counters in kB (A;smaps:... = a fork "
             "child's cell, then its counters)",
    "mce": "mce:KIND = a machine check was consumed (recoverable, or td-fatal: the TD is dead)",
    "shutdown": "shutdown = the whole machine shut down",
    "panic": "panic = the host kernel panicked",
    "blocked": "blocked = the thread sleeps (a userfaultfd missing fault) until a UFFDIO_COPY "
               "or UFFDIO_ZEROPAGE wakes it",
}

# The box rich draws: one border per column plus one, and one space each side of a cell.
_PER_COLUMN = 3


def kind_of(cell: str) -> str:
    return cell.partition(":")[0]


def style_of(cell: str) -> str:
    return _STYLE.get(kind_of(cell), "")


def styled(text: str, cell: str) -> str:
    """``text`` in the style of ``cell``'s kind (rich markup)."""
    style = style_of(cell)
    return f"[{style}]{text}[/]" if style else text


def _tokens(text: str, sep: str) -> list[str]:
    parts = text.split(sep)
    return [p + sep for p in parts[:-1]] + [parts[-1]] if parts else [text]


def break_at(text: str, width: int, sep: str = ":") -> str:
    """Break ``text`` into lines of at most ``width`` after ``sep`` (a token is never split)."""
    lines: list[str] = []
    for token in _tokens(text, sep):
        if lines and len(lines[-1]) + len(token) <= width:
            lines[-1] += token
        else:
            lines.append(token)
    return "\n".join(lines)


def _narrow(text: str, sep: str) -> int:
    return max(len(t) for t in _tokens(text, sep))


def legend(cells: Iterable[str]) -> str:
    """One line naming every kind of cell among ``cells`` (empty if none)."""
    kinds = {kind_of(part) for c in cells if c for part in c.split(";")}
    known = [text for kind, text in LEGEND.items() if kind in kinds]
    other = sorted(k for k in kinds if k not in LEGEND)
    return "; ".join(known + [f"{k} = see docs/" for k in other])


def _column_chunks(widths: Sequence[int], first: int, limit: int) -> list[list[int]]:
    """Indices of columns per table so that each table is at most ``limit`` wide."""
    chunks: list[list[int]] = []
    used = 1 + first + _PER_COLUMN
    for i, w in enumerate(widths):
        if chunks and chunks[-1] and used + w + _PER_COLUMN <= limit:
            chunks[-1].append(i)
            used += w + _PER_COLUMN
        else:
            chunks.append([i])
            used = 1 + first + _PER_COLUMN + w + _PER_COLUMN
    return chunks


def render_rich(title: str, rows: Sequence[str], cols: Sequence[str],
                grid: dict[tuple[str, str], str], console: Console,
                row_header: str = "path") -> None:
    limit = console.width
    cells = {(r, c): grid.get((r, c), "") for r in rows for c in cols}
    first = max([len(row_header), *(len(r) for r in rows)])
    natural = [max([len(c), *(len(cells[(r, c)]) for r in rows)]) for c in cols]
    wrap = 1 + first + _PER_COLUMN + sum(w + _PER_COLUMN for w in natural) > limit
    if wrap:
        widths = [max([_narrow(c, "/"), *(_narrow(cells[(r, c)], ":") for r in rows)])
                  for c in cols]
    else:
        widths = natural
    chunks = _column_chunks(widths, first, limit)
    if wrap:
        widths = list(widths)
        for chunk in chunks:  # give each table's spare width back to its wrapped columns
            spare = limit - (1 + first + _PER_COLUMN + sum(widths[i] + _PER_COLUMN for i in chunk))
            for i in sorted(chunk, key=lambda i: natural[i] - widths[i]):  # most cells unbroken
                grow = max(0, min(natural[i] - widths[i], spare))
                widths[i] += grow
                spare -= grow
    for n, chunk in enumerate(chunks):
        part = f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        from rich.table import Table

        table = Table(title=title + part, title_justify="left")
        table.add_column(row_header, no_wrap=True, overflow="fold")
        for i in chunk:
            head = break_at(cols[i], widths[i], "/") if wrap else cols[i]
            table.add_column(head, overflow="fold", min_width=widths[i])
        for r in rows:
            shown = []
            for i in chunk:
                x = cells[(r, cols[i])]
                shown.append(styled(break_at(x, widths[i]) if wrap else x, x))
            table.add_row(r, *shown)
        console.print(table)
    text = legend(cells.values())
    if text:
        console.print(f"[dim]cells: {text}[/dim]", highlight=False)


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown pipe table."""
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def md_cell(cell: str) -> str:
    return f"`{cell}`" if cell else ""


def render_md(title: str, rows: Sequence[str], cols: Sequence[str],
              grid: dict[tuple[str, str], str], row_header: str = "path") -> str:
    body = md_table([row_header, *cols],
                    ([row, *(md_cell(grid.get((row, c), "")) for c in cols)] for row in rows))
    text = legend(grid.get((r, c), "") for r in rows for c in cols)
    return f"### {title}\n\n{body}\n" + (f"\nCells: {text}.\n" if text else "")


def render_json(meta: dict[str, object], rows: Sequence[str], cols: Sequence[str],
                grid: dict[tuple[str, str], str]) -> str:
    cells = {row: {c: grid.get((row, c), "") for c in cols} for row in rows}
    return json.dumps({**meta, "columns": list(cols), "cells": cells}, indent=2)
