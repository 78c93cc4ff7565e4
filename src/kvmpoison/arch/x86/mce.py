"""Machine-check records and Linux's grading of them.

Bit positions follow ``arch/x86/include/asm/mce.h`` (v6.18; ``MCG_STATUS_SEAM_NR``
from commit 7911f145de5f "x86/mce: Implement recovery for errors in TDX/SEAM
non-root mode"). :func:`mce_severity` follows the Intel rows of
``arch/x86/kernel/cpu/mce/severity.c`` that a memory-integrity poison can reach;
it ignores the table rows for other error classes.
"""

from __future__ import annotations

import enum

from kvmpoison.uapi.mce import MCACOD_MASK, MCG_STATUS_SEAM_NR, MceRecord

__all__ = ["MCACOD_MASK", "MCG_STATUS_SEAM_NR", "MceRecord"]  # re-exported beside the grading

MCG_STATUS_RIPV = 1 << 0  # restart IP valid
MCG_STATUS_EIPV = 1 << 1  # IP points at the faulting instruction
MCG_STATUS_MCIP = 1 << 2  # machine check in progress
MCG_STATUS_LMCES = 1 << 3  # local machine check signalled
MCG_CAP_SEAM_NR = 1 << 12

MCI_STATUS_VAL = 1 << 63
MCI_STATUS_OVER = 1 << 62
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_MISCV = 1 << 59
MCI_STATUS_ADDRV = 1 << 58
MCI_STATUS_PCC = 1 << 57
MCI_STATUS_S = 1 << 56
MCI_STATUS_AR = 1 << 55
MCACOD_DATA = 0x0134  # data load
MCACOD_INSTR = 0x0150  # instruction fetch

TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE = 0x6000000500000000
"""TDH.VP.ENTER status once the TDX module has marked a TD fatal after a #MC."""


class Severity(enum.Enum):
    """``MCE_*_SEVERITY`` outcomes of the grading table."""

    KEEP = "keep"  # unaffected thread is continuable
    UCNA = "ucna"  # log only
    AO = "ao"  # action optional
    AR = "ar"  # action required: kill or recover the consumer
    PANIC = "panic"


def srar_record(
    pa: int, *, instruction_fetch: bool = False, lmce: bool = True, seam_nr: bool = False
) -> MceRecord:
    """The record a consumed poison produces: an SRAR data-load (or fetch) error."""
    status = (
        MCI_STATUS_VAL
        | MCI_STATUS_UC
        | MCI_STATUS_EN
        | MCI_STATUS_MISCV
        | MCI_STATUS_ADDRV
        | MCI_STATUS_S
        | MCI_STATUS_AR
        | (MCACOD_INSTR if instruction_fetch else MCACOD_DATA)
    )
    mcg = MCG_STATUS_RIPV | MCG_STATUS_EIPV | MCG_STATUS_MCIP
    if lmce:
        mcg |= MCG_STATUS_LMCES
    if seam_nr:
        mcg |= MCG_STATUS_SEAM_NR
    return MceRecord(mci_status=status, mcg_status=mcg, addr=pa & ~0x3F)


def mce_severity(rec: MceRecord, *, kernel_mode: bool, mc_safe: bool = False,
                 memory_failure: bool = True) -> Severity:
    """Grade a record the way the Intel severity table does, row by row in its order.

    ``severities[]`` and ``mce_severity_intel`` (arch/x86/kernel/cpu/mce/severity.c;
    read in Debian's 6.1 tree, the same rows as v5.12 for these classes, plus
    the SEAM_NR rows of 6.18). ``kernel_mode`` is where the consumer ran (a
    guest's #MC counts as user mode: KVM fakes ``cs = 3``); ``mc_safe`` marks
    an ``EX_TYPE_*MCE_SAFE`` copy (IN_KERNEL_RECOV); ``memory_failure`` is
    CONFIG_MEMORY_FAILURE, without which the AR rows do not exist and an SRAR
    error is "Action required: unknown MCACOD", a panic. A consumption in SEAM
    non-root is AR when SEAM_NR is set. Simplified: no MCIP/EN/VAL rows, no
    AO MCACOD rows (every SRAO is AO), no model-specific quirks.
    """
    status, mcg = rec.mci_status, rec.mcg_status
    if status & MCI_STATUS_PCC:
        return Severity.PANIC  # "Processor context corrupt"
    if not mcg & (MCG_STATUS_RIPV | MCG_STATUS_EIPV):
        return Severity.PANIC  # "Neither restart nor error IP"
    if kernel_mode and not mcg & MCG_STATUS_RIPV:
        return Severity.PANIC  # "In kernel and no restart IP"
    if not status & MCI_STATUS_UC:
        return Severity.KEEP
    if not status & MCI_STATUS_S:
        # "Uncorrected no action required", or "Illegal combination (UCNA with AR=1)"
        return Severity.PANIC if status & MCI_STATUS_AR else Severity.UCNA
    if not status & MCI_STATUS_AR:
        return Severity.AO
    if status & MCI_STATUS_OVER:
        return Severity.PANIC  # "Action required with lost events"
    if not memory_failure:
        return Severity.PANIC  # "Action required: unknown MCACOD"
    addr = MCI_STATUS_ADDRV | MCI_STATUS_MISCV
    if status & addr == addr and mcg & MCG_STATUS_RIPV and not mcg & MCG_STATUS_EIPV:
        return Severity.KEEP  # "Action required but unaffected thread is continuable"
    if rec.mcacod not in (MCACOD_DATA, MCACOD_INSTR):
        return Severity.PANIC  # "Action required: unknown MCACOD"
    if rec.in_seam_nonroot:
        return Severity.AR  # "Data load / Instruction fetch error in SEAM non-root mode"
    if not kernel_mode:
        return Severity.AR  # "... error in a user process"
    if mc_safe and rec.mcacod == MCACOD_DATA:
        return Severity.AR  # "data load in error recoverable area of kernel"
    return Severity.PANIC  # "... in unrecoverable area of kernel" / "Instruction fetch error"
