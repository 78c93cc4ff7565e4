"""``kvmpoison demo``: the main job, a short narrated run per design."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvmpoison.cli.errors import CliError, Format
from kvmpoison.demo import SUMMARY_ROWS, Step, run_story, summary
from kvmpoison.designs import DESIGNS
from kvmpoison.report.table import render_md, render_rich, style_of


def _steps_table(design: str, steps: list[Step]) -> Table:
    table = Table(title=f"design {design}: {DESIGNS[design].summary}", title_justify="left")
    for col in ("#", "actor", "action", "outcome"):
        table.add_column(col)
    for i, s in enumerate(steps, 1):
        cell = s.outcome.cell
        shown = f"[{style_of(cell)}]{cell}[/]" if style_of(cell) else cell
        if s.outcome.data:
            shown += f" {s.outcome.data!r}"
        if s.outcome.siginfo is not None and s.outcome.siginfo.addr_lsb is not None:
            shown += f" si_addr={s.outcome.siginfo.addr:#x} lsb={s.outcome.siginfo.addr_lsb}"
        if s.outcome.detail:
            shown += f"\n[dim]{s.outcome.detail}[/dim]"
        table.add_row(str(i), s.actor, s.action, shown)
    return table


def demo(
    design: Annotated[str | None, typer.Option(
        help="Run one design (baseline, rfc-v1, rfc-v2); default: baseline and rfc-v2.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    seed: Annotated[int, typer.Option(help="Machine seed.")] = 0,
) -> None:
    """A VM boots, does virtio I/O, and its VMM reaches for private memory, per design."""
    if design is not None and design not in DESIGNS:
        raise CliError(f"unknown design {design!r} (known: {', '.join(DESIGNS)})")
    designs = (design,) if design else ("baseline", "rfc-v2")
    stories = {d: run_story(d, seed) for d in designs}
    grid = summary(tuple(DESIGNS))
    cols = tuple(DESIGNS)
    if fmt is Format.JSON:
        print(json.dumps({"stories": {d: [s.as_dict() for s in st] for d, st in stories.items()},
                          "summary": {r: {d: grid[(r, d)] for d in cols} for r in SUMMARY_ROWS}},
                         indent=2))
        return
    if fmt is Format.MD:
        for d, steps in stories.items():
            print(f"### {d}\n\n| # | actor | action | outcome |\n|---|---|---|---|")
            for i, s in enumerate(steps, 1):
                print(f"| {i} | {s.actor} | {s.action} | `{s.outcome.cell}` |")
            print()
        print(render_md("a private guest page, per design", SUMMARY_ROWS, cols, grid))
        return
    console = Console()
    console.rule("[bold]kvmpoison: KVM: unmap guest memory using poisoned pages")
    for d, steps in stories.items():
        console.print(_steps_table(d, steps))
    render_rich("a private guest page, per design", SUMMARY_ROWS, cols, grid, console)
    console.print("baseline: a VMM write silently breaks TD integrity; the TD's next read is a "
                  "#MC. rfc-v2: the VMM gets SIGBUS, GUP -EFAULT, the page cache -EIO, and the "
                  "guest reads its data back. rfc-v1: GUP still reaches private pages.")
