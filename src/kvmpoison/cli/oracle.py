"""``kvmpoison oracle``: the model against the running kernel, cell by cell."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvmpoison.cli.errors import Format
from kvmpoison.matrix.protocol import BACKINGS, PATHS, THP_BACKINGS, THP_PATHS
from kvmpoison.report.progress import progress
from kvmpoison.report.table import break_at, legend, md_cell, md_table

if TYPE_CHECKING:
    from kvmpoison.report.scenario_live import LiveRun


def oracle(
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    kernel: Annotated[str | None, typer.Option(
        help="Referee another kernel, booted under QEMU: debian-6.1 (MEMORY_FAILURE=y).")] = None,
    accel: Annotated[str, typer.Option(
        help="QEMU accelerator with --kernel: auto (KVM only if hardware-assisted), tcg, kvm.")
    ] = "auto",
    scenarios: Annotated[bool, typer.Option(
        "--scenarios", help="Also run every shipped scenario live (kvmpoison run --all --live) "
        "and count its refereed steps; exit 1 on a disagreement.")] = False,
) -> None:
    """Probe a live kernel and compare every cell with the model's.

    The live kernel is this machine's, or with --kernel one booted under QEMU.

    With --scenarios, every shipped scenario is also refereed step by step on this kernel
    (as ``kvmpoison run --all --live``).

    Exit status: 0 every cell compared and agreed, 1 any disagreement, 2 the probes
    cannot run here, 3 all compared cells agreed but some could not be compared
    (no usable /dev/kvm).
    """
    # Imported here: the probes load the kernel backends, which other commands do not need.
    from kvmpoison.cli.oracle_vm import oracle_vm
    from kvmpoison.report.oracle import OracleUnavailableError, compare

    if kernel is not None:
        if scenarios:  # one boot per command: the scenarios have their own
            print("kvmpoison: error: --scenarios with --kernel: run the scenarios with "
                  f"kvmpoison run --all --live --kernel {kernel}", file=sys.stderr)
            raise typer.Exit(2)
        oracle_vm(kernel, accel, fmt)
        return
    try:
        thp_cells = (len(PATHS) + len(THP_PATHS)) * len(THP_BACKINGS)
        with progress(len(PATHS) * len(BACKINGS) + thp_cells, "oracle") as tick:
            result = compare(tick)
    except OracleUnavailableError as exc:
        print(f"kvmpoison: error: oracle unavailable: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    lives = _scenario_lives() if scenarios else None
    total = len(result.cells)
    if fmt is Format.JSON:
        print(json.dumps({
            "kernel": result.kernel, "modelled_as": result.kcfg.version.value,
            "memory_failure": result.kcfg.memory_failure, "kvm": result.kvm_available,
            "kvm_problem": result.kvm_problem, "skipped": result.skipped,
            "backings": list(result.backings), "cells": total, "agreed": result.agreed,
            "seconds": round(result.seconds, 2), "notes": result.notes,
            "not_refereed": [{"backing": b, "path": p, "reason": why}
                             for b, p, why in result.not_refereed],
            "disagreements": [{"path": p, "backing": b, "live": live, "model": model}
                              for p, b, live, model in result.disagreements],
            "every_cell": [{"path": p, "backing": b, "live": live, "model": model}
                           for p, b, live, model in result.cells],
            **({"scenarios": _scenarios_doc(lives)} if lives is not None else {}),
        }, indent=2))
    elif fmt is Format.MD:
        print(f"### oracle: kernel {result.kernel}\n\nModelled as {result.kcfg.version.value}, "
              f"CONFIG_MEMORY_FAILURE={'y' if result.kcfg.memory_failure else 'n'}, /dev/kvm "
              f"{'usable' if result.kvm_available else 'not usable'}.\n")
        for note in result.notes:
            print(f"- note: {note}")
        if result.disagreements:
            print("\n" + md_table(["path", "backing", "live", "model"],
                                  ([p, b, md_cell(live), md_cell(model)]
                                   for p, b, live, model in result.disagreements)))
        print(f"\nAgreement: {result.agreed}/{total} cells in {result.seconds:.1f} s.")
        if result.disagreements:
            print(f"\nCells: {legend(c for d in result.disagreements for c in d[2:])}.")
    else:
        console = Console()
        console.print(f"kernel {result.kernel} (modelled as {result.kcfg.version.value}, "
                      f"CONFIG_MEMORY_FAILURE={'y' if result.kcfg.memory_failure else 'n'}), "
                      f"/dev/kvm {result.kvm_problem or 'usable'}")
        for note in result.notes:
            console.print(f"note: {note}", markup=False)
        if result.disagreements:
            table = Table(title="disagreements")
            for col in ("path", "backing", "live", "model"):
                table.add_column(col, overflow="fold")
            for p, b, live, model in result.disagreements:
                table.add_row(p, b, break_at(live, 13), break_at(model, 13))
            console.print(table)
            cells = [c for _, _, live, model in result.disagreements for c in (live, model)]
            console.print(f"[dim]cells: {legend(cells)}[/dim]", highlight=False)
        console.print(f"agreement: {result.agreed}/{total} cells in {result.seconds:.1f} s")
    if lives is not None:
        _report_scenarios(lives, fmt)

    if result.disagreements:
        raise typer.Exit(1)
    if result.skipped:
        print(f"kvmpoison: {result.skipped} cells were not compared: /dev/kvm "
              f"{result.kvm_problem}", file=sys.stderr)
        raise typer.Exit(3)


def _scenario_lives() -> list[LiveRun]:
    """``--scenarios``: every shipped scenario, refereed step by step on this kernel."""
    from kvmpoison.backends.kvm.host import kvm_status
    from kvmpoison.report.scenario_live import referee
    from kvmpoison.scenario.library import shipped
    from kvmpoison.scenario.loader import ScenarioError, load

    problem = kvm_status()
    if problem is not None:
        print(f"kvmpoison: error: --scenarios needs /dev/kvm, which is {problem}",
              file=sys.stderr)
        raise typer.Exit(2)
    try:
        return [referee(load(path)) for path in shipped().values()]
    except ScenarioError as exc:
        print(f"kvmpoison: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


def _scenarios_doc(lives: list[LiveRun]) -> dict[str, object]:
    return {"count": len(lives), "refereed": sum(r.refereed for r in lives),
            "not_refereed": sum(r.not_refereed for r in lives),
            "disagreements": [{"scenario": r.scenario.name, "step": s.step.index,
                               "op": s.step.op, "model": s.model, "live": s.live,
                               "reason": s.reason} for r in lives for s in r.disagreements]}


def _report_scenarios(lives: list[LiveRun], fmt: Format) -> None:
    """The scenarios' counts (JSON has them already); exit 1 on a disagreement."""
    doc = _scenarios_doc(lives)
    bad = doc["disagreements"]
    assert isinstance(bad, list)
    if fmt is not Format.JSON:
        print(f"scenarios: {doc['refereed']} steps refereed live, {len(bad)} disagreeing, "
              f"{doc['not_refereed']} not refereed, over {doc['count']} shipped scenarios "
              "(kvmpoison run --all --live shows each step)")
        for d in bad:
            print(f"  DISAGREE {d['scenario']} step {d['step']} {d['op']}: model {d['model']}, "
                  f"live {d['live']}")
    if bad:
        raise typer.Exit(1)
