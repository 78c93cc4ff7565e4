"""``kvmpoison bench``: the model's speed and memory against the real kernel, same run."""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated

import typer

from kvmpoison.cli.errors import CliError

if TYPE_CHECKING:
    from kvmpoison.report.bench import Row


class BenchFormat(enum.Enum):
    TABLE = "table"
    JSON = "json"


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"


def bench(
    fmt: Annotated[BenchFormat, typer.Option("--format", help="Output format.")]
    = BenchFormat.TABLE,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Small sizes: runs in seconds (figures are rougher).")] = False,
) -> None:
    """Time the model against the real kernel (same run) and measure its memory per page.

    Each row prints the model's figure, the reference's (the kernel doing the same
    work, or hashlib, or the target), their ratio and the target ratio.
    """
    # Imported here: the other commands need neither the benchmarks nor the kernel side.
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from kvmpoison.report.bench import as_json, tasks

    rows: list[Row] = []
    steps = tasks(quick)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("bench", total=len(steps))
        for what, run in steps:
            progress.update(task, description=what)
            try:
                rows.extend(run())
            except (OSError, RuntimeError) as exc:  # the kernel side refused, or a child died
                raise CliError(f"bench: {what}: {exc}") from None
            progress.advance(task)
    if fmt is BenchFormat.JSON:
        print(json.dumps(as_json(rows, quick), indent=2))
        return
    table = Table(title="kvmpoison bench" + (" --quick" if quick else ""), title_justify="left")
    for col in ("what", "model", "reference", "unit", "ratio", "target", "reference is"):
        table.add_column(col, justify="right" if col in ("model", "reference", "ratio") else "left")
    for r in rows:
        ratio = f"[{'green' if r.met else 'red'}]{r.ratio:.2f}[/]"
        table.add_row(r.name, _fmt(r.model), _fmt(r.reference), r.unit, ratio,
                      f"<= {r.target:g}", r.reference_is + (f"; {r.note}" if r.note else ""))
    Console().print(table)
