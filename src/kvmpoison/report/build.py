"""``kvmpoison report``: one static HTML page with the design matrix, the E-cases,
GPA page-state maps and the oracle's verdict, written with its PNGs into a directory.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.config import DEFAULT_INTEGRITY
from kvmpoison.designs import DESIGNS
from kvmpoison.explore import scenario_monitor
from kvmpoison.matrix.designs import PAGE_STATES, PATHS, run_design_matrix
from kvmpoison.matrix.protocol import BACKINGS, THP_BACKINGS, THP_PATHS
from kvmpoison.matrix.protocol import PATHS as ORACLE_PATHS
from kvmpoison.report import html
from kvmpoison.report.gpa_map import GpaTrace, plot_traces, trace_scenario
from kvmpoison.scenario.library import shipped, title_of
from kvmpoison.scenario.loader import load
from kvmpoison.scenario.runner import ScenarioRun, run_scenario

DEFAULT_MAPS = ("seed-3-poison-and-unmap", "e09-33rd-shared-range")
Tick = Callable[[], None]


@dataclass(frozen=True)
class ReportOptions:
    designs: tuple[str, ...] = tuple(DESIGNS)
    states: tuple[str, ...] = PAGE_STATES
    paths: tuple[str, ...] = PATHS
    maps: tuple[str, ...] = DEFAULT_MAPS
    cases: tuple[str, ...] | None = None  # None: every shipped scenario
    oracle: bool = True
    integrity: IntegrityMode = DEFAULT_INTEGRITY

    def work(self) -> int:
        """Units of progress: matrix cells, scenario runs, map runs, oracle cells."""
        thp = (len(ORACLE_PATHS) + len(THP_PATHS)) * len(THP_BACKINGS)
        oracle = len(ORACLE_PATHS) * len(BACKINGS) + thp if self.oracle else 0
        return (len(self.paths) * len(self.designs) * len(self.states)
                + len(self.case_names()) * len(self.designs)
                + len(self.maps) * len(self.designs)
                + oracle)

    def case_names(self) -> tuple[str, ...]:
        return tuple(shipped()) if self.cases is None else self.cases


def kvm_unusable_reason() -> str | None:
    """Why /dev/kvm cannot be opened read-write here, or None."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror or exc}"
    return None


def _matrix_section(opts: ReportOptions, tick: Tick) -> str:
    cells = run_design_matrix(opts.designs, opts.states, opts.paths, opts.integrity, tick)
    grid = {(c.path, c.column): c.cell for c in cells}
    return (f'<p class="note">Each cell is one fresh machine ({escape(opts.integrity.value)} '
            "integrity, the same for every design): guest page T is put in the page state, "
            "then the VMM (or another process) takes the path against T.</p>"
            + html.legend_html(list(grid.values()))
            + html.heat_map(opts.paths, opts.designs, opts.states, grid))


def _headline(run: ScenarioRun) -> tuple[str, bool]:
    expected = [r for r in run.results if r.expected is not None]
    last = (expected or run.results)[-1] if run.results else None
    return (last.outcome.cell if last is not None else "", run.passed)


def _cases_section(opts: ReportOptions, tick: Tick) -> tuple[str, int, int]:
    rows, runs, passed = [], 0, 0
    lib = shipped()
    for name in opts.case_names():
        path = lib[name]
        sc = load(path)
        row = html.CaseRow(name, title_of(path))
        for d in opts.designs:
            run = run_scenario(sc, d, monitor=scenario_monitor(sc))
            row.results[d] = _headline(run)
            runs, passed = runs + 1, passed + run.passed
            tick()
        rows.append(row)
    cases = [r for r in rows if r.name.startswith("e")] + [r for r in rows
                                                          if not r.name.startswith("e")]
    body = (f"<p>{passed}/{runs} scenario runs met every expectation. Each cell is the outcome "
            "of the scenario's last checked step on that design, and whether all of its "
            "expectations were met; every scenario runs on the hardware its [machine] table "
            "names (TDX Ci unless it says otherwise).</p>"
            + html.legend_html([c for r in cases for c, _ in r.results.values()])
            + html.case_table(cases, opts.designs))
    return body, runs, passed


def _maps_section(opts: ReportOptions, out: Path, tick: Tick) -> str:
    lib = shipped()
    parts = ['<p class="note">Every guest page of the scenario\'s first VM, after each step '
             "(column 0: after boot). unmapped: no frame backs the page; shared: the guest "
             "shares it (or KVM records it shared); private: guest-private and still mappable "
             "by the host; poisoned: PG_hwpoison is set on its frame (the RFC's protection, or "
             "a memory error).</p>"]
    for name in opts.maps:
        sc = load(lib[name])
        traces: list[GpaTrace] = []
        for d in opts.designs:
            traces.append(trace_scenario(sc, d))
            tick()
        png = plot_traces(traces, out / f"gpa-{name}.png", f"{name}: GPA page states")
        steps = "; ".join(traces[0].steps[1:])
        parts.append(html.figure_html(html.Figure(png.name, f"GPA page-state map of {name}",
                                                  f"{name}: {title_of(lib[name])}. Steps: "
                                                  f"{steps}.")))
    return "\n".join(parts)


def _oracle_section(opts: ReportOptions, tick: Tick) -> str:
    if not opts.oracle:
        return "<p><b>Not refereed</b>: the live oracle was skipped (--no-oracle).</p>"
    reason = kvm_unusable_reason()
    if reason is not None:
        return (f"<p><b>Not refereed</b>: {escape(reason)}. The model's cells were not "
                "compared with the running kernel.</p>")
    # Imported here: the kernel backends load only when the report referees the model.
    from kvmpoison.report.oracle import OracleUnavailableError, compare

    try:
        result = compare(tick)
    except OracleUnavailableError as exc:
        return f"<p><b>Not refereed</b>: {escape(str(exc))}.</p>"
    kcfg = result.kcfg
    parts = [f"<p>Kernel {escape(result.kernel)} (modelled as {escape(kcfg.version.value)}, "
             f"CONFIG_MEMORY_FAILURE={'y' if kcfg.memory_failure else 'n'}): "
             f"<b>{result.agreed}/{len(result.cells)}</b> cells agree "
             f"({len(result.backings)} backings, {len(ORACLE_PATHS)} paths each, and "
             f"{len(THP_PATHS)} THP probes on a THP column; {result.seconds:.1f} s).</p>"]
    parts += [f'<p class="note">note: {escape(n)}</p>' for n in result.notes]
    if result.disagreements:
        rows = "".join(f"<tr><th>{escape(p)}</th><td>{escape(b)}</td>{html.cell_td(live)}"
                       f"{html.cell_td(model)}</tr>" for p, b, live, model in result.disagreements)
        parts.append("<table><tr><th>path</th><th>backing</th><th>live</th><th>model</th></tr>"
                     + rows + "</table>")
    return "\n".join(parts)


def build_report(out: Path, opts: ReportOptions, tick: Tick = lambda: None) -> Path:
    """Write ``out/index.html`` and its images; returns the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    matrix = _matrix_section(opts, tick)
    cases, _, _ = _cases_section(opts, tick)
    maps = _maps_section(opts, out, tick)
    oracle = _oracle_section(opts, tick)
    intro = (f"The model of 'KVM: unmap guest memory using poisoned pages' (RFC v1 and v2, "
             f"on v5.12) against the upstream baseline, on {opts.integrity.value} integrity "
             f"hardware. Designs: {', '.join(opts.designs)}. Host: {platform.system()} "
             f"{platform.release()}.")
    page = html.page("kvmpoison report", intro, [
        ("Design matrix: what each host path gets, per design and page state", matrix),
        ("E-cases: the shipped scenarios on every design", cases),
        ("GPA page-state maps", maps),
        ("Oracle: the model against the running kernel", oracle),
    ])
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
