"""``kvmpoison matrix``: what each host access path gets, per backing."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.errors import CliError, Format
from kvmpoison.cli.options import pick
from kvmpoison.config import DEFAULT_INTEGRITY
from kvmpoison.designs import DESIGNS
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.matrix import protocol
from kvmpoison.matrix.designs import PAGE_STATES, run_design_matrix
from kvmpoison.matrix.designs import PATHS as DESIGN_PATHS
from kvmpoison.matrix.model import SetupError, run_cell, run_matrix
from kvmpoison.report.progress import progress
from kvmpoison.report.table import render_json, render_md, render_rich


def matrix(
    designs: Annotated[str | None, typer.Option(
        help="Comma-separated designs: the VMM-side matrix (design x page state).")] = None,
    states: Annotated[str | None, typer.Option(help="Page states, with --designs.")] = None,
    backings: Annotated[str | None, typer.Option(
        help="Comma-separated backing ids (without --designs).")] = None,
    paths: Annotated[str | None, typer.Option(help="Comma-separated path ids.")] = None,
    kernel: Annotated[str | None, typer.Option(
        help="Modelled kernel: 5.12, 6.1 or 6.18 [default: 6.18] (without --designs).")] = None,
    memory_failure: Annotated[bool | None, typer.Option(
        "--memory-failure/--no-memory-failure",
        help="CONFIG_MEMORY_FAILURE [default: off, as on this machine's kernel] "
             "(without --designs).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    integrity: Annotated[IntegrityMode | None, typer.Option(
        help="Host memory integrity for every design, with --designs (TDX Ci by default).")]
    = None,
) -> None:
    """Run the access matrix on the model: per backing, or per design and page state.

    The protocol and the cell notation are in docs/matrix.md.
    """
    if designs is not None:
        ignored = [name for name, value in (("--kernel", kernel), ("--backings", backings),
                                            ("--memory-failure", memory_failure))
                   if value is not None]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            raise CliError(f"{', '.join(ignored)} only {verb} without --designs: each design "
                           "brings its own kernel configuration and runs on guest RAM")
        _design_matrix(designs, states, paths, fmt, integrity or DEFAULT_INTEGRITY)
        return
    if states is not None:
        raise CliError("--states only applies with --designs (the page states of guest RAM)")
    if integrity is not None:
        raise CliError("--integrity goes with --designs: the per-backing matrix models this "
                       "machine's kernel, a host without TDX")
    try:
        version = KernelVersion.parse(kernel or "6.18")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    mf = bool(memory_failure)
    hwpoison = set(protocol.HWPOISON_BACKINGS)
    if not mf and backings is not None and hwpoison & set(backings.split(",")):
        raise CliError("the hwpoison backings need --memory-failure (memory_failure() poisons T)")
    kcfg = KernelConfig(version=version, memory_failure=mf)
    known = protocol.BACKINGS + (protocol.HWPOISON_BACKINGS if mf else ())
    every = protocol.BACKINGS + protocol.HWPOISON_BACKINGS + protocol.THP_BACKINGS
    chosen = pick(backings, every, "backing") if backings is not None else known
    only_thp = set(chosen) <= set(protocol.THP_BACKINGS)  # then the THP probes by default
    rows = (pick(paths, protocol.PATHS + protocol.THP_PATHS, "path") if paths is not None
            else protocol.PATHS + (protocol.THP_PATHS if only_thp else ()))
    thp_rows = [r for r in rows if r in protocol.THP_PATHS]
    if thp_rows and not only_thp:
        raise CliError(f"{thp_rows[0]} probes a transparent huge page: use it with --backings "
                       f"{','.join(protocol.THP_BACKINGS)} only")
    cols = _available(kcfg, chosen, rows[0], explicit=backings is not None)
    try:
        with progress(len(rows) * len(cols), "matrix") as tick:
            cells = run_matrix(kcfg, rows, cols, lambda _cell: tick())
    except SetupError as exc:
        raise CliError(f"the model cannot build a cell's set-up: {exc}") from None
    grid = {(c.path, c.backing): c.cell for c in cells}
    title = f"model, kernel {version.value}, MEMORY_FAILURE={'y' if mf else 'n'}"
    if fmt is Format.JSON:
        print(render_json({"source": "model", "kernel": version.value,
                           "memory_failure": mf}, rows, cols, grid))
    elif fmt is Format.MD:
        print(render_md(title, rows, cols, grid))
    else:
        render_rich(title, rows, cols, grid, Console())


def _available(kcfg: KernelConfig, backings: tuple[str, ...], path: str,
               explicit: bool) -> tuple[str, ...]:
    """The backings whose set-up exists on this kernel (UFFDIO_POISON is not in 5.12).

    A backing named with --backings that cannot be built is an error; one left out of
    the default set is dropped with a note on stderr.
    """
    kept = []
    for backing in backings:
        try:
            run_cell(kcfg, path, backing)
        except SetupError as exc:
            why = f"backing {backing} cannot be set up on kernel {kcfg.version.value} ({exc})"
            if explicit:
                raise CliError(why) from None
            print(f"kvmpoison: note: {why}: column left out", file=sys.stderr)
            continue
        kept.append(backing)
    if not kept:
        raise CliError(f"no backing can be set up on kernel {kcfg.version.value}")
    return tuple(kept)


def _design_matrix(designs: str, states: str | None, paths: str | None, fmt: Format,
                   integrity: IntegrityMode) -> None:
    chosen = pick(designs, tuple(DESIGNS), "design")
    cols_states = pick(states, PAGE_STATES, "page state")
    rows = pick(paths, DESIGN_PATHS, "path")
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
