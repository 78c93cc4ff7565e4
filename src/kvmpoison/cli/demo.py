"""``kvmpoison demo``: the hazard the RFC exists for, narrated step by step.

Until the KVM layer lands, the demo runs on the hardware model alone: a TD
owns a page, the host (KeyID 0, as QEMU would) writes into it, and the TD's
next read consumes poison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvmpoison.arch.x86.integrity import IntegrityMode, MemoryController, PlatformConfig, WriteHow
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.cli.errors import Format
from kvmpoison.outcome import Outcome

PAGE_PA = 0x20_0000
TD_KEYID = 17  # first private KeyID is 16, used by the TDX module as its global KeyID


@dataclass(frozen=True, slots=True)
class Step:
    actor: str
    action: str
    outcome: Outcome

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "actor": self.actor,
            "action": self.action,
            "cell": self.outcome.cell,
            "detail": self.outcome.detail,
        }
        if self.outcome.data is not None:
            d["data"] = self.outcome.data.hex()
        if self.outcome.mce is not None:
            d["mci_status"] = f"{self.outcome.mce.mci_status:#018x}"
            d["mcg_status"] = f"{self.outcome.mce.mcg_status:#x}"
        return d


def run_hazard(
    *,
    seam_nr: bool = True,
    mode: IntegrityMode = IntegrityMode.CI,
    consumer: Ctx = Ctx.TD,
    seed: int = 0,
) -> list[Step]:
    """The RFC's motivating hazard on the hardware model; returns each step's outcome."""
    mc = MemoryController(
        PlatformConfig(mem_bytes=16 << 20, integrity=mode, seam_nr=seam_nr, seed=seed)
    )
    secret = b"TD secret: 42 42"
    steps: list[Step] = []

    def note(actor: str, action: str, outcome: Outcome) -> None:
        steps.append(Step(actor, action, outcome))

    mc.write(PAGE_PA, bytes(4096), TD_KEYID, WriteHow.MOVDIR64B)
    note("td", "TDG.MEM.PAGE.ACCEPT: page zeroed with MOVDIR64B under the TD KeyID", Outcome.ok())
    mc.write(PAGE_PA, secret, TD_KEYID)
    note("td", "store a secret", Outcome.ok())
    note("td", "load it back", mc.load(PAGE_PA, len(secret), TD_KEYID, Ctx.TD))
    note(
        "host", "QEMU (KeyID 0) reads the TD page", mc.load(PAGE_PA, len(secret), 0, Ctx.HOST_USER)
    )
    mc.write(PAGE_PA, b"oops", 0)
    note("host", "QEMU writes 4 bytes into the TD page (writes are never checked)", Outcome.ok())
    state = mc.line_state(PAGE_PA)
    note(
        "hw",
        f"line now TD={int(state.td)}, poison={int(state.poison)}; "
        f"oracle: KeyID {state.intruder} wrote a TD line",
        Outcome.ok(),
    )
    keyid = TD_KEYID if consumer in (Ctx.TD, Ctx.SEAM_ROOT) else 0
    note(consumer.value, "reads the line again", mc.load(PAGE_PA, len(secret), keyid, consumer))
    return steps


def demo(
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.TABLE,
    seam_nr: Annotated[
        bool,
        typer.Option(
            "--seam-nr/--no-seam-nr", help="MCG_CAP.SEAM_NR: can the host survive a TD #MC?"
        ),
    ] = True,
    consumer: Annotated[Ctx, typer.Option(help="Who consumes the poisoned line.")] = Ctx.TD,
) -> None:
    """Show why a host write to TD-private memory is fatal (the RFC's motivation)."""
    steps = run_hazard(seam_nr=seam_nr, consumer=consumer)
    if fmt is Format.JSON:
        print(json.dumps([s.as_dict() for s in steps], indent=2))
        return
    if fmt is Format.MD:
        print("| # | actor | action | outcome |\n|---|---|---|---|")
        for i, s in enumerate(steps, 1):
            print(f"| {i} | {s.actor} | {s.action} | `{s.outcome.cell}` |")
        return
    console = Console()
    console.rule("[bold]kvmpoison: a host write to TD-private memory")
    table = Table(show_lines=False)
    for col in ("#", "actor", "action", "outcome"):
        table.add_column(col)
    for i, s in enumerate(steps, 1):
        shown = s.outcome.cell
        if s.outcome.data is not None:
            shown += f" {s.outcome.data!r}"
        if s.outcome.detail:
            shown += f"\n[dim]{s.outcome.detail}[/dim]"
        table.add_row(str(i), s.actor, s.action, shown)
    console.print(table)
    last = steps[-1].outcome
    if last.mce is not None:
        console.print(
            f"MCi_STATUS={last.mce.mci_status:#018x} MCG_STATUS={last.mce.mcg_status:#x}"
            f" MCi_ADDR={last.mce.addr:#x}"
        )
    console.print(
        "The RFC's answer: never let the host map the page. "
        "Replace its PTEs with SWP_HWPOISON entries so the host touch is a SIGBUS."
    )
