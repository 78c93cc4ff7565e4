"""``kvmpoison run``: run scenario files (or shipped scenarios by name) on the designs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.errors import CliError, Format
from kvmpoison.designs import DESIGNS
from kvmpoison.report.progress import progress
from kvmpoison.report.table import break_at, legend, md_cell, md_table, styled
from kvmpoison.scenario.library import shipped, title_of
from kvmpoison.scenario.loader import Scenario, ScenarioError, load, short_path
from kvmpoison.scenario.runner import ScenarioRun, run_scenario, trace_records

if TYPE_CHECKING:
    from rich.console import Console

    from kvmpoison.explore import InvariantMonitor
    from kvmpoison.report.scenario_live import LiveRun

# rich and the invariant checker load only when used: `run --format json` draws nothing,
# and few scenarios name invariants.


def _resolve(item: str) -> Path:
    path = Path(item)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. ENAMETOOLONG
        raise CliError(f"{short_path(item)}: {exc.strerror}") from None
    if exists:
        return path
    lib = shipped()
    if item in lib:
        return lib[item]
    raise CliError(f"{item}: no such file, and no shipped scenario of that name "
                   "(kvmpoison run --list)")


def _print_run(console: Console, run: ScenarioRun) -> None:
    from rich.table import Table

    table = Table(title=f"{run.scenario.name} on {run.design}", title_justify="left")
    for col in ("#", "actor", "op", "outcome", "expected", ""):
        table.add_column(col, overflow="fold")
    for r in run.results:
        cell = r.outcome.cell
        shown = styled(break_at(cell, 13), cell)  # cells break after a ':', never cut
        if r.outcome.data:
            shown += f" {r.outcome.data[:24]!r}"
        mark = "" if r.met is None and r.data_met is None and r.violation_met is None \
            else ("ok" if r.ok else "FAIL")
        table.add_row(str(r.step.index), r.step.actor, r.step.op, shown,
                      break_at(r.expected or "", 13),
                      f"[green]{mark}[/]" if mark == "ok" else f"[red]{mark}[/]")
    console.print(table)


def _monitor(sc: Scenario) -> InvariantMonitor | None:
    """``[scenario] invariants``: checked after every step; a violation fails the run."""
    from kvmpoison.explore import scenario_monitor  # only a scenario naming invariants needs it

    return scenario_monitor(sc) if sc.invariants else None


def _violations(run: ScenarioRun) -> list[str]:
    """Violations no step expects (each fails the run)."""
    return [f"step {i}: {v}" for i, v in run.violations]


def _expected(run: ScenarioRun) -> list[str]:
    """Violations a step's ``expect_violation`` names."""
    return [f"step {i}: {v}" for i, v in run.expected_violations]


def _held(run: ScenarioRun) -> list[str]:
    """Steps whose ``expect_violation`` did not happen (each fails the run)."""
    return [f"step {r.step.index}: {r.step.expected_violation(run.design)} was expected to "
            "break here, and it held" for r in run.results if r.violation_met is False]


def _md_run(run: ScenarioRun) -> str:
    rows = []
    for r in run.results:
        mark = "" if r.met is None and r.data_met is None and r.violation_met is None \
            else ("ok" if r.ok else "FAIL")
        data = f" `{r.outcome.data[:24]!r}`" if r.outcome.data else ""
        rows.append([str(r.step.index), r.step.actor, r.step.op,
                     md_cell(r.outcome.cell) + data, md_cell(r.expected or ""), mark])
    return (f"### {run.scenario.name} on {run.design}\n\n"
            + md_table(["#", "actor", "op", "outcome", "expected", ""], rows) + "\n")


def run(
    files: Annotated[list[str] | None, typer.Argument(help="Scenario files or shipped names.")]
    = None,
    design: Annotated[str | None, typer.Option(help="Run on this design only.")] = None,
    all_designs: Annotated[bool, typer.Option(
        "--all-designs", help="Run on every design, not only those the scenario names.")]
    = False,
    trace: Annotated[Path | None, typer.Option(help="Write one JSON line per step here.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    live: Annotated[bool, typer.Option(
        "--live", help="Also run each scenario on this machine's kernel (/dev/kvm) and compare "
        "every step's cell with the model's; exit 1 on a disagreement.")] = False,
    kernel: Annotated[str | None, typer.Option(
        help="With --live: referee on another kernel, booted under QEMU: debian-6.1 "
             "(MEMORY_FAILURE=y; hwpoison steps refereed, KVM steps not).")] = None,
    accel: Annotated[str, typer.Option(
        help="QEMU accelerator with --kernel: auto (KVM only if hardware-assisted), tcg, kvm.")]
    = "auto",
    list_: Annotated[bool, typer.Option("--list", help="List the shipped scenarios.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Run every shipped scenario.")] = False,
    integrity: Annotated[IntegrityMode | None, typer.Option(
        help="Host memory integrity for every run, over [machine] integrity (default: the "
             "scenario's, else TDX Ci).")] = None,
) -> None:
    """Run scenarios; exit 1 if any expectation fails, 2 on bad input."""
    if list_:
        for name, path in shipped().items():
            print(f"{name}  {title_of(path)}")
        return
    if all_ and files:
        raise CliError("give scenario files or --all, not both")
    if all_:
        files = list(shipped())
    if not files:
        raise CliError("name at least one scenario file or shipped scenario (or --list, --all)")
    if design is not None and design not in DESIGNS:
        raise CliError(f"unknown design {design!r} (known: {', '.join(DESIGNS)})")
    if design is not None and all_designs:
        raise CliError("give --design or --all-designs, not both")
    if kernel is not None and not live:
        raise CliError("--kernel chooses the live referee: give it with --live")
    if kernel is not None and kernel not in ("debian-6.1",):
        raise CliError(f"unknown VM kernel {kernel!r} (known: debian-6.1)")
    if accel not in ("auto", "tcg", "kvm"):
        raise CliError(f"unknown accelerator {accel!r} (known: auto, tcg, kvm)")
    try:
        scenarios: list[Scenario] = [load(_resolve(f)) for f in files]
        todo = [(sc, d) for sc in scenarios
                for d in ((design,) if design else tuple(DESIGNS) if all_designs
                          else sc.designs)]
        with progress(len(todo), "scenarios") as tick:
            runs = []
            for sc, d in todo:
                runs.append(run_scenario(sc, d, integrity, monitor=_monitor(sc)))
                tick()
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    against = "this kernel"
    lives = None
    if live and kernel is not None:
        lives, against = _referee_in_vm(scenarios, kernel, accel)
    elif live:
        lives = _referee_all(scenarios)

    if trace is not None:
        try:
            with trace.open("w") as fh:
                for r in runs:
                    for rec in trace_records(r):
                        fh.write(json.dumps(rec) + "\n")
        except OSError as exc:
            raise CliError(f"{short_path(str(trace))}: cannot write the trace: "
                           f"{exc.strerror}") from None
    if lives is not None:
        _finish_live(runs, lives, fmt, against)  # its own output, and the exit status

    if fmt is Format.JSON:
        print(json.dumps([{"scenario": r.scenario.name, "design": r.design, "passed": r.passed,
                           **_checks_json(r), "steps": trace_records(r)}
                          for r in runs], indent=2))
    elif fmt is Format.MD:
        for r in runs:
            print(_md_run(r))
            for line in _violations(r):
                print(f"- invariant violated at {line}\n")
            for line in _expected(r):
                print(f"- invariant violated, as expected, at {line}\n")
            for line in _held(r):
                print(f"- {line}\n")
        cells = [x.outcome.cell for r in runs for x in r.results]
        failed = [f"{r.scenario.name}/{r.design}" for r in runs if not r.passed]
        print(f"{len(runs) - len(failed)}/{len(runs)} scenario runs met every expectation"
              + (f"; failed: {', '.join(failed)}" if failed else "")
              + f".\n\nCells: {legend(cells)}.")
    else:
        from rich.console import Console

        console = Console()
        for r in runs:
            _print_run(console, r)
            _print_checks(console, r)
        failed = [f"{r.scenario.name}/{r.design}" for r in runs if not r.passed]
        console.print(f"{len(runs) - len(failed)}/{len(runs)} scenario runs met every "
                      "expectation" + (f"; failed: {', '.join(failed)}" if failed else ""))
        console.print(f"[dim]cells: {legend(x.outcome.cell for r in runs for x in r.results)}"
                      "[/dim]", highlight=False)
    if any(not r.passed for r in runs):
        raise typer.Exit(1)


def _referee_all(scenarios: list[Scenario]) -> list[LiveRun]:
    """``--live``: referee every scenario on the running kernel."""
    from kvmpoison.backends.kvm.host import kvm_status
    from kvmpoison.report.scenario_live import referee

    problem = kvm_status()
    if problem is not None:
        raise CliError(f"--live needs /dev/kvm, which is {problem}")
    try:
        return [referee(sc) for sc in scenarios]
    except ScenarioError as exc:
        raise CliError(str(exc)) from None


def _referee_in_vm(scenarios: list[Scenario], kernel: str, accel: str
                   ) -> tuple[list[LiveRun], str]:
    """``--live --kernel``: referee every scenario in one boot of that kernel under QEMU."""
    from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
    from kvmpoison.report.scenario_vm import referee_in_vm

    try:
        done = referee_in_vm(scenarios, kernel, accel)
    except VmKernelUnavailableError as exc:
        raise CliError(f"--kernel {kernel}: {exc}") from None
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    return done.lives, (f"{done.kernel} under QEMU ({done.accel}, the boot took "
                        f"{done.wall_seconds:.0f} s)")


def _print_checks(console: Console, run: ScenarioRun) -> None:
    """The invariant checks of a run: violations, expected ones, expectations that held."""
    from rich.markup import escape

    for line in _violations(run):
        console.print(f"[red]invariant violated at {escape(line)}[/]", highlight=False)
    for line in _expected(run):
        console.print(f"invariant violated, as expected, at {line}", highlight=False,
                      markup=False)
    for line in _held(run):
        console.print(f"[red]{escape(line)}[/]", highlight=False)


def _checks_json(run: ScenarioRun) -> dict[str, list[str]]:
    return {"violations": _violations(run), "expected_violations": _expected(run),
            "held": _held(run)}


def _finish_live(runs: list[ScenarioRun], lives: list[LiveRun], fmt: Format,
                 against: str = "this kernel") -> None:
    """Print the runs and the live referee's verdicts; exit 1 on a failed expectation or a
    disagreement. JSON is one document: ``runs``, ``live`` and the counts."""
    from kvmpoison.report.scenario_live import records

    refereed = sum(r.refereed for r in lives)
    not_refereed = sum(r.not_refereed for r in lives)
    disagree = sum(len(r.disagreements) for r in lives)
    failed = [f"{r.scenario.name}/{r.design}" for r in runs if not r.passed]
    if fmt is Format.JSON:
        print(json.dumps({
            "runs": [{"scenario": r.scenario.name, "design": r.design, "passed": r.passed,
                      **_checks_json(r), "steps": trace_records(r)} for r in runs],
            "against": against,
            "live": [{"scenario": r.scenario.name, "design": r.design, "kernel": r.kernel,
                      "steps": records(r)} for r in lives],
            "refereed": refereed, "not_refereed": not_refereed, "disagreements": disagree},
            indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        for run_ in runs:
            _print_run(console, run_)
            _print_checks(console, run_)
        console.print(f"{len(runs) - len(failed)}/{len(runs)} scenario runs met every "
                      "expectation" + (f"; failed: {', '.join(failed)}" if failed else ""))
        for r in lives:
            table = Table(title=f"{r.scenario.name}: model ({r.design}, {r.kernel}) against "
                          f"{against}", title_justify="left")
            for col in ("#", "actor", "op", "model", "live", "verdict"):
                table.add_column(col)
            for s in r.steps:
                style = {"agree": "green", "DISAGREE": "red"}.get(s.verdict, "yellow")
                verdict = f"[{style}]{s.verdict}[/]" + (f": {s.reason}" if s.reason else "")
                table.add_row(str(s.step.index), s.step.actor, s.step.op, s.model, s.live or "",
                              verdict)
            console.print(table)
        console.print(f"live: {refereed} steps refereed ({refereed - disagree} agree, "
                      f"{disagree} disagree), {not_refereed} not refereed, over {len(lives)} "
                      f"scenarios, against {against}")
    raise typer.Exit(1 if failed or disagree else 0)
