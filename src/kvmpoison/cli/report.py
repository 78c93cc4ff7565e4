"""``kvmpoison report --out DIR``: a static HTML page with pictures."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.errors import CliError
from kvmpoison.cli.options import pick
from kvmpoison.config import DEFAULT_INTEGRITY
from kvmpoison.designs import DESIGNS
from kvmpoison.matrix.designs import PAGE_STATES, PATHS
from kvmpoison.report.build import DEFAULT_MAPS, ReportOptions, build_report
from kvmpoison.report.progress import progress
from kvmpoison.scenario.library import shipped


def report(
    out: Annotated[Path, typer.Option("--out", help="Directory for index.html and its PNGs.")],
    designs: Annotated[str | None, typer.Option(help="Comma-separated designs (default: all).")]
    = None,
    paths: Annotated[str | None, typer.Option(help="Matrix paths (default: all).")] = None,
    states: Annotated[str | None, typer.Option(help="Matrix page states (default: all).")]
    = None,
    maps: Annotated[str | None, typer.Option(
        help=f"Scenarios to draw GPA maps of (default: {', '.join(DEFAULT_MAPS)}).")] = None,
    cases: Annotated[str | None, typer.Option(
        help="Scenarios for the E-case table (default: every shipped one).")] = None,
    oracle: Annotated[bool, typer.Option(
        "--oracle/--no-oracle", help="Referee the model live on /dev/kvm where usable.")]
    = True,
    integrity: Annotated[IntegrityMode, typer.Option(
        help="Host memory integrity of the design matrix, for every design.")]
    = DEFAULT_INTEGRITY,
) -> None:
    """Write a static HTML report: design matrix, E-cases, GPA maps, oracle summary."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("kvmpoison report draws with matplotlib: pip install 'kvmpoison[plot]'")
    opts = ReportOptions(
        designs=pick(designs, tuple(DESIGNS), "design", tuple(DESIGNS)),
        states=pick(states, PAGE_STATES, "page state", PAGE_STATES),
        paths=pick(paths, PATHS, "path", PATHS),
        maps=pick(maps, tuple(shipped()), "scenario", DEFAULT_MAPS),
        cases=None if cases is None else pick(cases, tuple(shipped()), "scenario", ()),
        oracle=oracle, integrity=integrity)
    if out.exists() and not out.is_dir():
        raise CliError(f"{out}: exists and is not a directory")
    try:
        with progress(opts.work(), "report") as tick:
            index = build_report(out, opts, tick)
    except OSError as exc:
        raise CliError(f"{out}: cannot write the report: {exc.strerror or exc}") from None
    print(index)
