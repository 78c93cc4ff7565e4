"""x86-64 page-table entry bits.

Follows ``arch/x86/include/asm/pgtable_types.h`` and ``page_64_types.h``
(v5.12; the same positions hold in v6.18 except where noted).
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PUD_SHIFT = 30
PTRS_PER_PTE = 512

_PAGE_BIT_PRESENT = 0
_PAGE_BIT_RW = 1
_PAGE_BIT_USER = 2
_PAGE_BIT_PWT = 3
_PAGE_BIT_PCD = 4
_PAGE_BIT_ACCESSED = 5
_PAGE_BIT_DIRTY = 6
_PAGE_BIT_PSE = 7  # 2M/1G page in a PMD/PUD
_PAGE_BIT_PAT = 7  # PAT bit in a 4K PTE
_PAGE_BIT_GLOBAL = 8
_PAGE_BIT_SOFTW1 = 9
_PAGE_BIT_SOFTW2 = 10
_PAGE_BIT_SOFTW3 = 11
_PAGE_BIT_PAT_LARGE = 12
_PAGE_BIT_SOFTW5 = 57
_PAGE_BIT_SOFTW4 = 58
_PAGE_BIT_PKEY_BIT0 = 59
_PAGE_BIT_NX = 63

_PAGE_BIT_SPECIAL = _PAGE_BIT_SOFTW1
_PAGE_BIT_UFFD_WP = _PAGE_BIT_SOFTW2
_PAGE_BIT_SOFT_DIRTY = _PAGE_BIT_SOFTW3
_PAGE_BIT_DEVMAP = _PAGE_BIT_SOFTW4  # v5.12; the bit is free again in v6.18
_PAGE_BIT_SAVED_DIRTY = _PAGE_BIT_SOFTW5  # shadow-stack saved dirty, v6.6+
# Only meaningful when PRESENT is clear: marks a PROT_NONE (NUMA-hinting) PTE.
_PAGE_BIT_PROTNONE = _PAGE_BIT_GLOBAL


class PteFlag(enum.IntFlag):
    """Flag bits of a present (or PROT_NONE) x86-64 PTE/PMD."""

    PRESENT = 1 << _PAGE_BIT_PRESENT
    RW = 1 << _PAGE_BIT_RW
    USER = 1 << _PAGE_BIT_USER
    PWT = 1 << _PAGE_BIT_PWT
    PCD = 1 << _PAGE_BIT_PCD
    ACCESSED = 1 << _PAGE_BIT_ACCESSED
    DIRTY = 1 << _PAGE_BIT_DIRTY
    PSE = 1 << _PAGE_BIT_PSE
    GLOBAL = 1 << _PAGE_BIT_GLOBAL
    SPECIAL = 1 << _PAGE_BIT_SPECIAL
    UFFD_WP = 1 << _PAGE_BIT_UFFD_WP
    SOFT_DIRTY = 1 << _PAGE_BIT_SOFT_DIRTY
    PAT_LARGE = 1 << _PAGE_BIT_PAT_LARGE
    SAVED_DIRTY = 1 << _PAGE_BIT_SAVED_DIRTY
    DEVMAP = 1 << _PAGE_BIT_DEVMAP
    PKEY_BIT0 = 1 << _PAGE_BIT_PKEY_BIT0
    PKEY_BIT1 = 1 << (_PAGE_BIT_PKEY_BIT0 + 1)
    PKEY_BIT2 = 1 << (_PAGE_BIT_PKEY_BIT0 + 2)
    PKEY_BIT3 = 1 << (_PAGE_BIT_PKEY_BIT0 + 3)
    NX = 1 << _PAGE_BIT_NX


_PAGE_PRESENT = int(PteFlag.PRESENT)
_PAGE_RW = int(PteFlag.RW)
_PAGE_USER = int(PteFlag.USER)
_PAGE_PWT = int(PteFlag.PWT)
_PAGE_ACCESSED = int(PteFlag.ACCESSED)
_PAGE_DIRTY = int(PteFlag.DIRTY)
_PAGE_PSE = int(PteFlag.PSE)
_PAGE_PAT = _PAGE_PSE
_PAGE_GLOBAL = int(PteFlag.GLOBAL)
_PAGE_PROTNONE = 1 << _PAGE_BIT_PROTNONE
_PAGE_SPECIAL = int(PteFlag.SPECIAL)
_PAGE_UFFD_WP = int(PteFlag.UFFD_WP)
_PAGE_SOFT_DIRTY = int(PteFlag.SOFT_DIRTY)
_PAGE_NX = int(PteFlag.NX)
_PAGE_KNL_ERRATUM_MASK = _PAGE_DIRTY | _PAGE_ACCESSED
_PAGE_PCD = int(PteFlag.PCD)
_PAGE_DEVMAP = int(PteFlag.DEVMAP)

# Swap-PTE software bits reuse hardware positions; safe because PRESENT is clear.
_PAGE_SWP_SOFT_DIRTY = _PAGE_RW
_PAGE_SWP_UFFD_WP = _PAGE_USER
_PAGE_SWP_EXCLUSIVE = _PAGE_PWT  # v5.19+

# The kernel's protection templates (pgtable_types.h), used by mprotect/mmap.
PAGE_NONE = _PAGE_PROTNONE | _PAGE_ACCESSED
PAGE_SHARED = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
PAGE_COPY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
PAGE_READONLY = PAGE_COPY

__PHYSICAL_MASK_SHIFT = 52  # with both 4-level and 5-level paging
__PHYSICAL_MASK = (1 << __PHYSICAL_MASK_SHIFT) - 1
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
PTE_PFN_MASK = PAGE_MASK & __PHYSICAL_MASK
PTE_FLAGS_MASK = ~PTE_PFN_MASK & 0xFFFF_FFFF_FFFF_FFFF
# Bits pte_modify() keeps across a protection change.
_PAGE_CHG_MASK = (
    PTE_PFN_MASK
    | _PAGE_PCD
    | _PAGE_PWT
    | _PAGE_SPECIAL
    | _PAGE_ACCESSED
    | _PAGE_DIRTY
    | _PAGE_SOFT_DIRTY
    | _PAGE_DEVMAP
    | _PAGE_UFFD_WP
)
PMD_PAGE_MASK = ~((1 << PMD_SHIFT) - 1) & 0xFFFF_FFFF_FFFF_FFFF
PHYSICAL_PMD_PAGE_MASK = PMD_PAGE_MASK & __PHYSICAL_MASK


def physical_mask_shift(la57: bool) -> int:
    """``__PHYSICAL_MASK_SHIFT``: 52 for both 4- and 5-level paging."""
    del la57
    return __PHYSICAL_MASK_SHIFT


def pte_pfn_mask(la57: bool) -> int:
    """``PTE_PFN_MASK``: bits 12-51 for both paging modes (page_64_types.h)."""
    return PAGE_MASK & ((1 << physical_mask_shift(la57)) - 1)


def virtual_mask_shift(la57: bool) -> int:
    """``__VIRTUAL_MASK_SHIFT``: 47 (4-level) or 56 (LA57)."""
    return 56 if la57 else 47


def max_physmem_bits(la57: bool) -> int:
    """``MAX_PHYSMEM_BITS`` (sparsemem.h): 46 (4-level) or 52 (5-level)."""
    return 52 if la57 else 46
