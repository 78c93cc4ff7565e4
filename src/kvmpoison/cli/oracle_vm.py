"""``kvmpoison oracle --kernel debian-6.1``: every cell of the second referee, live and model."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.cli.errors import CliError, Format
from kvmpoison.report.vm_oracle import KERNELS, VmComparison, compare_vm


def oracle_vm(kernel: str, accel: str, fmt: Format) -> None:
    if kernel not in KERNELS:
        raise CliError(f"unknown --kernel {kernel!r} (known: {', '.join(KERNELS)}; "
                       "omit it to referee the running kernel)")
    if accel not in ("auto", "tcg", "kvm"):
        raise CliError(f"unknown --accel {accel!r} (known: auto, tcg, kvm)")
    try:
        result = compare_vm(kernel, accel)
    except VmKernelUnavailableError as exc:
        print(f"kvmpoison: oracle unavailable: {exc}")
        raise typer.Exit(2) from None
    if fmt is Format.JSON:
        print(json.dumps(as_json(result), indent=2))
    else:
        _print_table(result)
    if result.disagreements:
        raise typer.Exit(1)


def as_json(result: VmComparison) -> dict[str, object]:
    return {
        "kernel": result.kernel, "modelled_as": result.kcfg.version.value,
        "memory_failure": result.kcfg.memory_failure, "accel": result.accel,
        "backings": list(result.backings), "cells": len(result.cells), "agreed": result.agreed,
        "boot_seconds": round(result.boot_seconds, 2),
        "probe_seconds": round(result.probe_seconds, 2),
        "wall_seconds": round(result.wall_seconds, 2),
        "model_seconds": round(result.model_seconds, 2), "notes": result.notes,
        "not_refereed": [{"backing": b, "path": p, "reason": why}
                         for b, p, why in result.not_refereed],
        "disagreements": [{"path": p, "backing": b, "live": live, "model": model}
                          for p, b, live, model in result.disagreements],
        "table": [{"path": p, "backing": b, "live": live, "model": model}
                  for p, b, live, model in result.cells],
    }


def _print_table(result: VmComparison) -> None:
    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for every column
        console = Console(width=220)
    console.print(f"kernel {result.kernel} under QEMU ({result.accel}), modelled as "
                  f"{result.kcfg.version.value} with its /boot/config "
                  f"(CONFIG_MEMORY_FAILURE={'y' if result.kcfg.memory_failure else 'n'})")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    grid: dict[str, dict[str, str]] = {}
    for path, backing, live, model in result.cells:
        shown = live if live == model else f"[red]{live} (model {model})[/red]"
        grid.setdefault(path, {})[backing] = shown
    table = Table(title="live cells (red: the model disagrees)")
    table.add_column("path")
    for backing in result.backings:
        table.add_column(backing)
    for path, row in grid.items():
        table.add_row(path, *(row.get(b, "-") for b in result.backings))
    console.print(table)
    console.print(f"agreement: {result.agreed}/{len(result.cells)} cells; boot "
                  f"{result.boot_seconds:.1f} s, probes {result.probe_seconds:.1f} s (guest "
                  f"clock), whole run {result.wall_seconds:.1f} s")
