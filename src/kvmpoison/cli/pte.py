"""``kvmpoison pte decode|encode``: raw page-table values, field by field."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvmpoison.arch.x86.pgtable_64 import MAX_SWP_OFFSET, SWP_OFFSET_BITS
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.cli.errors import CliError, Format, parse_int
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.mm import ptdump
from kvmpoison.report.table import md_table

app = typer.Typer(
    help="Decode and encode x86-64 PTE/PMD/EPT values bit-exactly.", no_args_is_help=True
)

KernelOpt = Annotated[
    str, typer.Option("--kernel", help="Modelled kernel: 5.12 (the RFC's) or 6.18.")
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
MfOpt = Annotated[
    bool,
    typer.Option(
        "--memory-failure/--no-memory-failure",
        help="CONFIG_MEMORY_FAILURE (gives SWP_HWPOISON a number).",
    ),
]


def _kernel(text: str, memory_failure: bool) -> KernelConfig:
    try:
        version = KernelVersion.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return KernelConfig(version=version, memory_failure=memory_failure)


# A pfn below 2^(MAX_PHYSMEM_BITS - PAGE_SHIFT): 52-bit physical addresses (5-level paging).
PFN_BITS = 52 - PAGE_SHIFT


def _pfn(pfn: int) -> int:
    """A hwpoison entry holds the pfn of a real page (make_hwpoison_entry takes a page)."""
    if not 0 <= pfn < 1 << PFN_BITS:
        raise ValueError(f"pfn {pfn:#x} does not fit in {PFN_BITS} bits (MAX_PHYSMEM_BITS 52 - "
                         f"PAGE_SHIFT {PAGE_SHIFT}): the largest is {(1 << PFN_BITS) - 1:#x}")
    return pfn


def _show(dec: ptdump.Decoding, fmt: Format, out: Console) -> None:
    if fmt is Format.JSON:
        out.print_json(json.dumps(dec.as_dict()))
        return
    if fmt is Format.MD:
        print(f"`{dec.raw:#018x}` ({dec.kind})\n")
        print(md_table(["field", "value", "bits"], ([f.name, f.value, f.bits] for f in dec.fields)))
        return
    table = Table(title=f"{dec.raw:#018x}: {dec.kind}")
    for col in ("field", "value", "bits"):
        table.add_column(col)
    for f in dec.fields:
        table.add_row(f.name, f.value, f.bits)
    out.print(table)


@app.command()
def decode(
    value: Annotated[str, typer.Argument(help="Raw 64-bit value (0x... or decimal).")],
    kernel: KernelOpt = "5.12",
    level: Annotated[str, typer.Option(help="pte, pmd, or ept (an EPT entry).")] = "pte",
    memory_failure: MfOpt = True,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Name every field of a raw PTE, PMD or EPT entry."""
    raw = parse_int(value, "value")
    cfg = _kernel(kernel, memory_failure)
    try:
        dec = ptdump.decode_ept(raw) if level == "ept" else ptdump.decode(raw, cfg, level)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _show(dec, fmt, Console())


@app.command()
def encode(
    present: Annotated[str | None, typer.Option(help="Present entry mapping this PFN.")] = None,
    flags: Annotated[str, typer.Option(help="Flags for --present, e.g. 'RW|USER|NX'.")] = "RW|USER",
    swap: Annotated[tuple[str, str] | None, typer.Option(help="Swap entry: TYPE OFFSET.")] = None,
    hwpoison: Annotated[str | None, typer.Option(help="SWP_HWPOISON entry for this PFN.")] = None,
    marker: Annotated[
        str | None, typer.Option(help="PTE marker: POISONED, UFFD_WP, GUARD.")
    ] = None,
    level: Annotated[str, typer.Option(help="pte or pmd (for --present).")] = "pte",
    kernel: KernelOpt = "5.12",
    memory_failure: MfOpt = True,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Build a raw value from fields and show its decoding."""
    chosen = [
        name
        for name, v in (
            ("--present", present),
            ("--swap", swap),
            ("--hwpoison", hwpoison),
            ("--marker", marker),
        )
        if v is not None
    ]
    if len(chosen) != 1:
        raise CliError("give exactly one of --present, --swap, --hwpoison, --marker")
    cfg = _kernel(kernel, memory_failure)
    try:
        if present is not None:
            if level not in ptdump.LEVELS:
                raise ValueError(f"level must be one of {', '.join(ptdump.LEVELS)}")
            raw = ptdump.encode_present(parse_int(present, "pfn"), ptdump.parse_flags(flags), level)
        elif swap is not None:
            offset = parse_int(swap[1], "offset")
            if not 0 <= offset <= MAX_SWP_OFFSET:  # swp_entry() would mask it silently
                raise ValueError(f"swap offset {offset:#x} does not fit in the PTE's "
                                 f"{SWP_OFFSET_BITS} offset bits (largest {MAX_SWP_OFFSET:#x})")
            raw = ptdump.encode_swap(parse_int(swap[0], "type"), offset)
        elif hwpoison is not None:
            raw = ptdump.encode_hwpoison(_pfn(parse_int(hwpoison, "pfn")), cfg)
        else:
            assert marker is not None
            raw = ptdump.encode_marker(marker, cfg)
        dec = ptdump.decode(raw, cfg, level if present is not None else "pte")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _show(dec, fmt, Console())
