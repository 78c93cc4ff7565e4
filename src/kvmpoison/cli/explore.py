"""``kvmpoison explore``: drive a design at random, check invariants, shrink what breaks them."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvmpoison.cli.errors import CliError, Format
from kvmpoison.cli.options import pick
from kvmpoison.designs import DESIGNS
from kvmpoison.explore.invariants import INVARIANTS

if TYPE_CHECKING:
    from kvmpoison.explore.campaign import SeedResult

STEPS_MAX = 10_000_000
SEEDS_MAX = 100_000
WORKERS_MAX = 256


@contextmanager
def _bar(total: int) -> Iterator[Callable[[int, int], None]]:
    """Yield ``tick(steps, violations)`` once per finished seed; a bar only on a terminal."""
    if not sys.stderr.isatty():
        yield lambda steps, found: None
        return
    console = Console(file=sys.stderr, force_terminal=True)
    seen = {"steps": 0, "found": 0}
    with Progress(TextColumn("explore"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} steps/s"),
                  TextColumn("{task.fields[found]} violations"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("seeds", total=total, rate="-", found=0)

        def tick(steps: int, found: int) -> None:
            seen["steps"] += steps
            seen["found"] += found
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, advance=1, rate=f"{seen['steps'] / elapsed:.0f}",
                       found=seen["found"])

        yield tick


def explore(
    design: Annotated[str, typer.Option(help="The design to explore.")],
    steps: Annotated[int, typer.Option(help="Steps per seed.")] = 1000,
    seed: Annotated[int, typer.Option(help="The first seed.")] = 0,
    seeds: Annotated[int, typer.Option(help="How many seeds (seed, seed+1, ...).")] = 1,
    invariants: Annotated[str | None, typer.Option(
        help=f"Comma-separated invariants to check (default: all of {', '.join(INVARIANTS)}).")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="Write results.json and one reproducer scenario per violation here.")] = None,
    workers: Annotated[int, typer.Option(
        help="Dask LocalCluster worker processes (1: run here, no cluster).")] = 1,
    scheduler: Annotated[str | None, typer.Option(
        help="A running Dask scheduler's address (tcp://host:8786) instead of a LocalCluster.")]
    = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
) -> None:
    """Explore a design for invariant violations; exit 1 if any is found, 2 on bad input."""
    if design not in DESIGNS:
        raise CliError(f"unknown design {design!r} (known: {', '.join(DESIGNS)})")
    for name, value, lo, hi in (("--steps", steps, 1, STEPS_MAX), ("--seed", seed, 0, 2**32 - 1),
                                ("--seeds", seeds, 1, SEEDS_MAX),
                                ("--workers", workers, 1, WORKERS_MAX)):
        if not lo <= value <= hi:
            raise CliError(f"{name} must be from {lo} to {hi}, not {value}")
    if scheduler is not None and workers != 1:
        raise CliError("give --workers or --scheduler, not both")
    if scheduler is not None and not scheduler.strip():
        raise CliError("--scheduler needs an address (tcp://host:8786)")
    checked = pick(invariants, tuple(INVARIANTS), "invariant")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"{out}: cannot create the output directory: {exc.strerror}") from None

    from kvmpoison.explore.campaign import run_campaign, seeds_of

    found: list[SeedResult] = []
    with _bar(seeds) as tick:
        def done(r: SeedResult) -> None:
            tick(r.steps, 1 if r.violation else 0)
            if r.violation:
                found.append(r)
        try:
            results = run_campaign(design, seeds_of(seed, seeds), steps, checked, workers,
                                   scheduler, done)
        except OSError as exc:  # the scheduler cannot be reached
            raise CliError(f"cannot run the campaign: {exc}") from None
    doc = {"design": design, "invariants": list(checked), "steps_per_seed": steps,
           "seeds": [r.as_json() for r in results],
           "steps": sum(r.steps for r in results),
           "refused": sum(r.refused for r in results),
           "seconds": round(sum(r.seconds for r in results), 3),
           "violations": {r.violation: sum(x.violation == r.violation for x in results)
                          for r in found if r.violation}}
    if out is not None:
        for r in found:
            if r.reproducer is not None:
                (out / f"x-{design}-{(r.violation or '').lower()}-seed{r.seed}.toml").write_text(
                    r.reproducer)
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    if fmt is Format.JSON:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc, results)
    if found:
        raise typer.Exit(1)


def _print(doc: dict[str, object], results: list[SeedResult]) -> None:
    table = Table(title=f"explore {doc['design']}", title_justify="left")
    for col in ("seed", "steps", "steps/s", "violation", "after", "shrunk", "replays",
                "first problem"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(str(r.seed), str(r.steps), f"{r.steps_per_s:.0f}", r.violation or "",
                      "" if r.found_after is None else str(r.found_after),
                      "" if r.shrunk_steps is None else f"{r.shrunk_steps}→{r.reproducer_steps}",
                      "" if r.replays is None else ("yes" if r.replays else "NO"),
                      r.problems[0] if r.problems else "")
    console = Console()
    console.print(table)
    console.print(f"{doc['steps']} steps ({doc['refused']} draws refused by the model, "
                  f"not counted) in {doc['seconds']} s; violations: "
                  f"{doc['violations'] or 'none'}", highlight=False)
