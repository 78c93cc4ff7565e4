"""Render a grid of cells (rows x columns) as a rich table, Markdown or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

_STYLE = {"ok": "green", "ret": "green", "vec": "cyan", "err": "yellow", "sig": "red",
          "mce": "magenta", "shutdown": "bold red", "panic": "bold red"}


def style_of(cell: str) -> str:
    return _STYLE.get(cell.partition(":")[0], "")


def render_rich(title: str, rows: Sequence[str], cols: Sequence[str],
                grid: dict[tuple[str, str], str], console: Console) -> None:
    table = Table(title=title, show_lines=False)
    table.add_column("path")
    for col in cols:
        table.add_column(col, no_wrap=True)
    for row in rows:
        cells = [grid.get((row, c), "") for c in cols]
        table.add_row(row, *(f"[{style_of(x)}]{x}[/]" if style_of(x) else x for x in cells))
    console.print(table)


def render_md(title: str, rows: Sequence[str], cols: Sequence[str],
              grid: dict[tuple[str, str], str]) -> str:
    lines = [f"### {title}", "", "| path | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"`{grid.get((row, c), '')}`" for c in cols)
                     + " |")
    return "\n".join(lines)


def render_json(meta: dict[str, object], rows: Sequence[str], cols: Sequence[str],
                grid: dict[tuple[str, str], str]) -> str:
    cells = {row: {c: grid.get((row, c), "") for c in cols} for row in rows}
    return json.dumps({**meta, "columns": list(cols), "cells": cells}, indent=2)
