"""``kvmpoison matrix``: what each host access path gets, per backing."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.errors import CliError, Format
from kvmpoison.config import DEFAULT_INTEGRITY
from kvmpoison.designs import DESIGNS
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.matrix import protocol
from kvmpoison.matrix.designs import PAGE_STATES, run_design_matrix
from kvmpoison.matrix.designs import PATHS as DESIGN_PATHS
from kvmpoison.matrix.model import run_matrix
from kvmpoison.report.progress import progress
from kvmpoison.report.table import render_json, render_md, render_rich


def _pick(text: str | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None:
        return known
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        raise CliError(f"unknown {what} {', '.join(unknown) or repr(text)} "
                       f"(known: {', '.join(known)})")
    return chosen


def matrix(
    designs: Annotated[str | None, typer.Option(
        help="Comma-separated designs: the VMM-side matrix (design x page state).")] = None,
    states: Annotated[str | None, typer.Option(help="Page states, with --designs.")] = None,
    backings: Annotated[str | None, typer.Option(help="Comma-separated backing ids.")] = None,
    paths: Annotated[str | None, typer.Option(help="Comma-separated path ids.")] = None,
    kernel: Annotated[str, typer.Option(help="Modelled kernel: 5.12 or 6.18.")] = "6.18",
    memory_failure: Annotated[bool, typer.Option(
        "--memory-failure/--no-memory-failure",
        help="CONFIG_MEMORY_FAILURE (off on this machine's kernel).")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    integrity: Annotated[IntegrityMode | None, typer.Option(
        help="Host memory integrity for every design, with --designs (TDX Ci by default).")]
    = None,
) -> None:
    """Run the MATRIX.md access matrix on the model (per backing, or per design)."""
    if designs is not None:
        _design_matrix(designs, states, paths, fmt, integrity or DEFAULT_INTEGRITY)
        return
    if integrity is not None:
        raise CliError("--integrity goes with --designs: the per-backing matrix models this "
                       "machine's kernel, a host without TDX")
    try:
        version = KernelVersion.parse(kernel)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    cols = _pick(backings, protocol.BACKINGS, "backing")
    rows = _pick(paths, protocol.PATHS, "path")
    kcfg = KernelConfig(version=version, memory_failure=memory_failure)
    with progress(len(rows) * len(cols), "matrix") as tick:
        cells = run_matrix(kcfg, rows, cols, lambda _cell: tick())
    grid = {(c.path, c.backing): c.cell for c in cells}
    title = f"model, kernel {version.value}, MEMORY_FAILURE={'y' if memory_failure else 'n'}"
    if fmt is Format.JSON:
        print(render_json({"source": "model", "kernel": version.value,
                           "memory_failure": memory_failure}, rows, cols, grid))
    elif fmt is Format.MD:
        print(render_md(title, rows, cols, grid))
    else:
        render_rich(title, rows, cols, grid, Console())


def _design_matrix(designs: str, states: str | None, paths: str | None, fmt: Format,
                   integrity: IntegrityMode) -> None:
    chosen = _pick(designs, tuple(DESIGNS), "design")
    cols_states = _pick(states, PAGE_STATES, "page state")
    rows = _pick(paths, DESIGN_PATHS, "path")
    with progress(len(rows) * len(chosen) * len(cols_states), "design matrix") as tick:
        cells = run_design_matrix(chosen, cols_states, rows, integrity, tick)
    cols = [f"{d}/{s}" for d in chosen for s in cols_states]
    grid = {(c.path, c.column): c.cell for c in cells}
    title = f"model, VMM view: design / page state, integrity {integrity.value}"
    if fmt is Format.JSON:
        print(render_json({"source": "model", "view": "vmm", "designs": list(chosen),
                           "integrity": integrity.value}, rows, cols, grid))
    elif fmt is Format.MD:
        print(render_md(title, rows, cols, grid))
    else:
        render_rich(title, rows, cols, grid, Console())
