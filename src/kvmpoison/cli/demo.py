"""``kvmpoison demo``: the main job, a short narrated run per design."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.errors import CliError, Format
from kvmpoison.config import DEFAULT_INTEGRITY
from kvmpoison.demo import SUMMARY_ROWS, PageView, Step, run_story, summary
from kvmpoison.designs import DESIGNS
from kvmpoison.mm.ptdump import Decoding
from kvmpoison.report.progress import progress
from kvmpoison.report.table import break_at, md_cell, md_table, render_md, render_rich, styled

WIDTH = 80
_ACTION_W = 40
_OUTCOME_W = 24

INTEGRITY_TEXT = {
    IntegrityMode.CI: "a TDX host in Ci mode (TD bit and MAC per line)",
    IntegrityMode.LI: "a TDX host in Li mode (TD bit per line, no MAC)",
    IntegrityMode.OFF: "a host without memory integrity (plain KVM, as the RFC ran)",
}

def ending(design: str, integrity: IntegrityMode) -> str:
    """What the story showed, by design and hardware."""
    tdx = integrity is not IntegrityMode.OFF
    if design == "baseline":
        if tdx:
            return ("Baseline: the page stays mapped in the VMM (step 3: a present PTE, no "
                    "PG_hwpoison), so the VMM's write of step 9 goes through; the TD's next "
                    "read (step 12) fails the integrity check and a #MC kills the TD. On TDX "
                    "the host reads zeros (steps 8, 10, 11), never the secret.")
        return ("Baseline without memory integrity: the page stays mapped in the VMM (step 3), "
                "so the host reads the secret (step 8) and the VMM's write of step 9 lands in "
                "guest memory: the host (steps 10, 11) and the guest (step 12) read it back.")
    if design == "rfc-v1":
        return ("rfc-v1: protection turns the VMM's PTE into a hwpoison entry (step 3) while "
                "the EPT keeps mapping the frame; the VMM gets SIGBUS, the page cache -EIO, "
                "and the guest keeps its data. But GUP still follows the entry: "
                "process_vm_readv succeeds (step 10)"
                + (", though TDX hands it zeros." if tdx else " and reads the secret."))
    if design == "rfc-v2":
        return ("rfc-v2: as rfc-v1, and GUP needs FOLL_ALLOW_POISONED, which only KVM passes: "
                "process_vm_readv gets -EFAULT (step 10).")
    if design == "hardened":
        return ("hardened (a design, not upstream): the VMM's PTE becomes a guest-private "
                "PTE marker and the page gets PG_guest_private, never PG_hwpoison (step 3). "
                "Every path is refused with a cause of its own: SIGBUS BUS_ADRERR, not a "
                "memory error (steps 8, 9), -EFAULT for GUP (step 10), -EPERM for the page "
                "cache (step 11); the guest's data is intact (step 12). See docs/hardened.md.")
    return ""


def _decoded(d: Decoding) -> str:
    fields = ", ".join(f"{f.name} {f.value}" for f in d.fields if f.name != "pte_none")
    return f"{d.raw:#018x} {d.kind}" + (f": {fields}" if fields else "")


def _page_rows(v: PageView) -> list[tuple[str, str]]:
    rows = [("VMM PTE", _decoded(v.pte))]
    if v.pfn is None:
        rows.append(("page", "no frame backs the page"))
    else:
        rows.append(("page", f"pfn {v.pfn:#x}: PG_hwpoison {'set' if v.hwpoison else 'clear'}, "
                             f"refcount {v.refcount}, mapcount {v.mapcount}"))
        rows.append(("", f"flags {'|'.join(v.flags) or '0'}"))
    rows.append(("EPT", _decoded(v.ept) if v.ept is not None
                 else "none: KVM maps nothing at this gpa yet"))
    return rows


def _page_block(v: PageView) -> Padding:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=7, style="bold cyan")
    grid.add_column(style="cyan", overflow="fold")
    for label, value in _page_rows(v):
        grid.add_row(label, value)
    return Padding(grid, (0, 0, 0, 4))


def _data(data: bytes) -> str:
    return f"{len(data)} zero bytes" if not any(data) else repr(data)


def _outcome_text(s: Step) -> str:
    cell = s.outcome.cell
    shown = styled(break_at(cell, _OUTCOME_W), cell)
    if s.outcome.data:
        shown += f"\n{_data(s.outcome.data)}"
    si = s.outcome.siginfo
    if si is not None and si.addr_lsb is not None:
        shown += f"\nsi_addr={si.addr:#x} lsb={si.addr_lsb}"
    return shown


def _steps_table(steps: list[Step], header: bool) -> Table:
    table = Table(box=None, show_header=header, pad_edge=False, header_style="bold")
    table.add_column("#", width=2, justify="right")
    table.add_column("actor", width=8)
    table.add_column("action", width=_ACTION_W, overflow="fold")
    table.add_column("outcome", width=_OUTCOME_W, overflow="fold")
    for s in steps:
        action = s.action + (f"\n[dim]{s.outcome.detail}[/dim]" if s.outcome.detail else "")
        table.add_row(str(s.number), s.actor, action, _outcome_text(s))
    return table


def _print_story(console: Console, design: str, steps: list[Step],
                 integrity: IntegrityMode) -> None:
    console.rule(f"[bold]design {design}[/bold]", align="left")
    console.print(Text(DESIGNS[design].summary, style="italic"))
    chunk: list[Step] = []
    first = True
    for s in steps:
        chunk.append(s)
        if s.page is not None:
            console.print(_steps_table(chunk, first))
            first, chunk = False, []
            console.print(_page_block(s.page))
    if chunk:
        console.print(_steps_table(chunk, first))
    text = ending(design, integrity)
    if text:
        console.print(Padding(Text(text), (1, 0, 0, 0)))


def _md_story(design: str, steps: list[Step], integrity: IntegrityMode) -> str:
    out = [f"### {design}", "", DESIGNS[design].summary, ""]
    out.append(md_table(["#", "actor", "action", "outcome"],
                        ([str(s.number), s.actor, s.action,
                          md_cell(s.outcome.cell)
                          + (f" `{_data(s.outcome.data)}`" if s.outcome.data else "")]
                         for s in steps)))
    out += ["", f"The secret page (gpa {steps[-1].page.gpa:#x}) after steps "
            f"{', '.join(str(s.number) for s in steps if s.page)}:" if steps[-1].page else "", ""]
    rows = []
    for s in steps:
        if s.page is not None:
            v = s.page
            rows.append([str(s.number), f"`{_decoded(v.pte)}`",
                         "set" if v.hwpoison else "clear", str(v.refcount), str(v.mapcount),
                         f"`{_decoded(v.ept)}`" if v.ept else "none"])
    out.append(md_table(["after step", "VMM PTE", "PG_hwpoison", "refcount", "mapcount", "EPT"],
                        rows))
    text = ending(design, integrity)
    if text:
        out += ["", text]
    return "\n".join(out) + "\n"


def demo(
    design: Annotated[str | None, typer.Option(
        help="Run one design (default: every design).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    seed: Annotated[int, typer.Option(help="Machine seed.")] = 0,
    integrity: Annotated[IntegrityMode, typer.Option(
        help="Host memory integrity, the same for every design (default: TDX Ci).")]
    = DEFAULT_INTEGRITY,
) -> None:
    """A VM boots, does virtio I/O, and its VMM reaches for private memory, per design."""
    if design is not None and design not in DESIGNS:
        raise CliError(f"unknown design {design!r} (known: {', '.join(DESIGNS)})")
    designs = (design,) if design else tuple(DESIGNS)
    cols = tuple(DESIGNS)
    with progress(len(designs) + len(SUMMARY_ROWS), "demo") as tick:
        stories = {}
        for d in designs:
            stories[d] = run_story(d, seed, integrity)
            tick()
        grid: dict[tuple[str, str], str] = {}
        for row in SUMMARY_ROWS:
            grid.update(summary(cols, (row,), integrity))
            tick()
    title = "a private guest page, per design"
    if fmt is Format.JSON:
        print(json.dumps({"integrity": integrity.value,
                          "stories": {d: [s.as_dict() for s in st] for d, st in stories.items()},
                          "summary": {r: {d: grid[(r, d)] for d in cols} for r in SUMMARY_ROWS}},
                         indent=2))
        return
    if fmt is Format.MD:
        print(f"## kvmpoison demo\n\nHardware: {INTEGRITY_TEXT[integrity]}.\n")
        for d, steps in stories.items():
            print(_md_story(d, steps, integrity))
        print(render_md(title, SUMMARY_ROWS, cols, grid))
        return
    console = Console(width=min(Console().width, WIDTH))
    console.rule("[bold]kvmpoison: KVM: unmap guest memory using poisoned pages")
    console.print(f"Every design runs the same steps on {INTEGRITY_TEXT[integrity]}. "
                  "The guest's secret lives in guest page 0x30; its state is shown after "
                  "steps 2, 3 and 12.")
    for d, steps in stories.items():
        _print_story(console, d, steps, integrity)
    console.print()
    render_rich(title, SUMMARY_ROWS, cols, grid, console)
