"""The EPT entry format.

Follows ``arch/x86/include/asm/vmx.h`` (``VMX_EPT_*``) and
``arch/x86/kvm/mmu/mmu_internal.h``/``spte.h`` for the large-page bit (v5.12;
the same layout in v6.18). Memory types are the MTRR encodings of
``arch/x86/include/uapi/asm/mtrr.h``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PTE_PFN_MASK

VMX_EPT_READABLE_MASK = 0x1
VMX_EPT_WRITABLE_MASK = 0x2
VMX_EPT_EXECUTABLE_MASK = 0x4
VMX_EPT_RWX_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_MT_MASK = 7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7  # a 2M/1G leaf in a PDE/PDPTE
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
VMX_EPT_USER_EXECUTABLE_MASK = 1 << 10  # mode-based execute control
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63


class MemType(enum.IntEnum):
    """EPT memory type field (MTRR encodings)."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


class EptFlag(enum.IntFlag):
    READ = VMX_EPT_READABLE_MASK
    WRITE = VMX_EPT_WRITABLE_MASK
    EXEC = VMX_EPT_EXECUTABLE_MASK
    IPAT = VMX_EPT_IPAT_BIT
    LARGE = PT_PAGE_SIZE_MASK
    ACCESSED = VMX_EPT_ACCESS_BIT
    DIRTY = VMX_EPT_DIRTY_BIT
    USER_EXEC = VMX_EPT_USER_EXECUTABLE_MASK
    SUPPRESS_VE = VMX_EPT_SUPPRESS_VE_BIT


_FLAG_BITS = int(
    EptFlag.READ
    | EptFlag.WRITE
    | EptFlag.EXEC
    | EptFlag.IPAT
    | EptFlag.LARGE
    | EptFlag.ACCESSED
    | EptFlag.DIRTY
    | EptFlag.USER_EXEC
    | EptFlag.SUPPRESS_VE
)


@dataclass(frozen=True, slots=True)
class EptEntry:
    """A decoded EPT entry. ``encode()`` gives the raw 64-bit value back."""

    pfn: int
    flags: EptFlag
    memtype: MemType = MemType.WB

    def encode(self) -> int:
        if self.pfn << PAGE_SHIFT & ~PTE_PFN_MASK:
            raise ValueError(f"pfn {self.pfn:#x} does not fit in EPT bits 12-51")
        return (
            (self.pfn << PAGE_SHIFT)
            | (int(self.memtype) << VMX_EPT_MT_EPTE_SHIFT)
            | int(self.flags)
        )

    @classmethod
    def decode(cls, raw: int) -> EptEntry:
        mt = (raw & VMX_EPT_MT_MASK) >> VMX_EPT_MT_EPTE_SHIFT
        try:
            memtype = MemType(mt)
        except ValueError as exc:
            raise ValueError(f"EPT memory type {mt} is reserved") from exc
        return cls(
            pfn=(raw & PTE_PFN_MASK) >> PAGE_SHIFT,
            flags=EptFlag(raw & _FLAG_BITS),
            memtype=memtype,
        )

    @property
    def present(self) -> bool:
        """An EPT entry is present when any of R/W/X is set (``is_shadow_present_pte``)."""
        return bool(self.flags & (EptFlag.READ | EptFlag.WRITE | EptFlag.EXEC))


def ept_leaf(
    pfn: int,
    *,
    writable: bool = True,
    executable: bool = True,
    memtype: MemType = MemType.WB,
    large: bool = False,
) -> int:
    """The hardware part of a leaf entry: pfn, R/W/X, memory type, large.

    KVM's full SPTE (IPAT, A/D, its software bits) is built on top of this by
    ``virt/kvm/x86/mmu.make_spte``.
    """
    flags = EptFlag.READ
    if writable:
        flags |= EptFlag.WRITE
    if executable:
        flags |= EptFlag.EXEC
    if large:
        flags |= EptFlag.LARGE
    return EptEntry(pfn, flags, memtype).encode()
