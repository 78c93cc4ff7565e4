"""The machine-check record: what ``struct mce`` (arch/x86/include/uapi/asm/mce.h) carries.

Only the fields the model uses: MCi_STATUS, MCG_STATUS and MCi_ADDR. It lives with
the uapi vocabulary because every layer's :class:`~kvmpoison.outcome.Outcome` can
carry one; the grading of a record is arch's (``arch/x86/mce.py``). The two masks
its accessors need come from ``arch/x86/include/asm/mce.h`` (v6.18; SEAM_NR from
commit 7911f145de5f "x86/mce: Implement recovery for errors in TDX/SEAM non-root
mode").
"""

from __future__ import annotations

from dataclasses import dataclass

MCG_STATUS_SEAM_NR = 1 << 12  # the #MC happened in SEAM non-root (a TD)
MCACOD_MASK = 0xFFFF


@dataclass(frozen=True, slots=True)
class MceRecord:
    """One bank's status as ``do_machine_check`` sees it."""

    mci_status: int
    mcg_status: int
    addr: int  # MCi_ADDR: the physical address of the poisoned line

    @property
    def mcacod(self) -> int:
        return self.mci_status & MCACOD_MASK

    @property
    def in_seam_nonroot(self) -> bool:
        return bool(self.mcg_status & MCG_STATUS_SEAM_NR)

    def __repr__(self) -> str:
        return (
            f"MceRecord(mci_status={self.mci_status:#018x}, "
            f"mcg_status={self.mcg_status:#x}, addr={self.addr:#x})"
        )
