"""PTE predicates, pfn <-> PTE conversion and L1TF PFN inversion.

Follows ``arch/x86/include/asm/pgtable.h`` and ``pgtable-invert.h`` (v5.12;
unchanged in v6.18). Values are raw 64-bit integers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_CHG_MASK,
    _PAGE_KNL_ERRATUM_MASK,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    PAGE_SHIFT,
    PHYSICAL_PMD_PAGE_MASK,
    PTE_FLAGS_MASK,
    PTE_PFN_MASK,
)

U64 = 0xFFFF_FFFF_FFFF_FFFF
U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


def pte_flags(pte: int) -> int:
    return pte & PTE_FLAGS_MASK


def pte_none(pte: int) -> bool:
    """True for an empty PTE; the KNL erratum bits (A/D) are ignored."""
    return (pte & ~_PAGE_KNL_ERRATUM_MASK & U64) == 0


def pte_present(pte: int) -> bool:
    """PRESENT or PROTNONE: a PROT_NONE PTE still maps its page."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_protnone(pte: int) -> bool:
    return (pte & (_PAGE_PROTNONE | _PAGE_PRESENT)) == _PAGE_PROTNONE


def pmd_present(pmd: int) -> bool:
    """A PMD being split has PRESENT cleared but keeps PSE, so PSE counts too."""
    return bool(pmd & (_PAGE_PRESENT | _PAGE_PROTNONE | _PAGE_PSE))


def pmd_large(pmd: int) -> bool:
    return bool(pmd & _PAGE_PSE)


def is_swap_pte(pte: int) -> bool:
    """``include/linux/swapops.h``: neither empty nor present."""
    return not pte_none(pte) and not pte_present(pte)


def __pte_needs_invert(val: int) -> bool:
    """L1TF: any non-empty entry with PRESENT clear holds an inverted PFN."""
    return val != 0 and not (val & _PAGE_PRESENT)


def protnone_mask(val: int) -> int:
    return U64 if __pte_needs_invert(val) else 0


def pfn_pte(pfn: int, prot: int) -> int:
    """Build a PTE; a PROT_NONE protection stores the PFN inverted."""
    phys = (pfn << PAGE_SHIFT) & U64
    phys ^= protnone_mask(prot)
    return (phys & PTE_PFN_MASK) | (prot & PTE_FLAGS_MASK)


def pte_pfn(pte: int) -> int:
    phys = pte ^ protnone_mask(pte)
    return (phys & PTE_PFN_MASK) >> PAGE_SHIFT


def pfn_pmd(pfn: int, prot: int) -> int:
    phys = (pfn << PAGE_SHIFT) & U64
    phys ^= protnone_mask(prot)
    return (phys & PHYSICAL_PMD_PAGE_MASK) | (prot & PTE_FLAGS_MASK)


def pmd_pfn(pmd: int) -> int:
    phys = pmd ^ protnone_mask(pmd)
    mask = PHYSICAL_PMD_PAGE_MASK if pmd & _PAGE_PSE else PTE_PFN_MASK
    return (phys & mask) >> PAGE_SHIFT


def flip_protnone_guard(oldval: int, val: int, mask: int) -> int:
    """Re-invert the PFN bits when PRESENT changes (pgtable-invert.h)."""
    if __pte_needs_invert(oldval) != __pte_needs_invert(val):
        val = (val & ~mask) | (~val & mask)
    return val & U64


def pte_modify(pte: int, newprot: int) -> int:
    """Change protection bits; the PFN and ``_PAGE_CHG_MASK`` bits are kept."""
    val = pte & _PAGE_CHG_MASK
    val |= newprot & ~_PAGE_CHG_MASK & U64
    return flip_protnone_guard(pte, val, PTE_PFN_MASK)


def pmd_modify(pmd: int, newprot: int) -> int:
    """``pmd_modify`` (arch/x86/include/asm/pgtable.h, v5.12 and 6.1): like
    :func:`pte_modify`, keeping ``_PAGE_PSE`` (``_HPAGE_CHG_MASK``) and re-inverting only
    the 2 MiB frame bits."""
    keep = (_PAGE_CHG_MASK | _PAGE_PSE) & ~PTE_PFN_MASK | PHYSICAL_PMD_PAGE_MASK
    val = pmd & keep
    val |= newprot & ~keep & U64
    return flip_protnone_guard(pmd, val, PHYSICAL_PMD_PAGE_MASK)


# -- vectorised forms for bulk paths (numpy uint64 arrays) ------------------------

_U = np.uint64


def pte_none_array(ptes: U64Array) -> BoolArray:
    return np.asarray((ptes & _U(~_PAGE_KNL_ERRATUM_MASK & U64)) == 0, dtype=np.bool_)


def pte_present_array(ptes: U64Array) -> BoolArray:
    return np.asarray((ptes & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0, dtype=np.bool_)


def _protnone_mask_array(vals: U64Array) -> U64Array:
    invert = (vals != 0) & ((vals & _U(_PAGE_PRESENT)) == 0)
    return np.where(invert, _U(U64), _U(0))


def pte_pfn_array(ptes: U64Array) -> npt.NDArray[np.int64]:
    phys = ptes ^ _protnone_mask_array(ptes)
    return ((phys & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)


def pfn_pte_array(pfns: npt.NDArray[np.int64], prot: int) -> U64Array:
    phys = pfns.astype(np.uint64) << _U(PAGE_SHIFT)
    if __pte_needs_invert(prot):
        phys = ~phys
    return (phys & _U(PTE_PFN_MASK)) | _U(prot & PTE_FLAGS_MASK)


def pte_modify_array(ptes: U64Array, newprot: int) -> U64Array:
    """Vectorised :func:`pte_modify` for present (or PROT_NONE) PTEs."""
    val = (ptes & _U(_PAGE_CHG_MASK)) | _U(newprot & ~_PAGE_CHG_MASK & U64)
    flip = (
        ((ptes != 0) & ((ptes & _U(_PAGE_PRESENT)) == 0))
        != ((val != 0) & ((val & _U(_PAGE_PRESENT)) == 0))
    )
    mask = _U(PTE_PFN_MASK)
    return np.where(flip, (val & ~mask) | (~val & mask), val)


def pmd_pfn_array(pmds: U64Array) -> npt.NDArray[np.int64]:
    """Vectorised :func:`pmd_pfn` of huge (PSE) PMDs: the 2 MiB frame, un-inverted when
    PRESENT is clear (L1TF)."""
    invert = (pmds != 0) & ((pmds & _U(_PAGE_PRESENT)) == 0)
    phys = np.where(invert, ~pmds, pmds) & _U(PHYSICAL_PMD_PAGE_MASK)
    return np.asarray(phys >> _U(PAGE_SHIFT), dtype=np.int64)


def pmd_modify_array(pmds: U64Array, newprot: int) -> U64Array:
    """Vectorised :func:`pmd_modify` for huge PMDs."""
    keep = _PMD_MODIFY_KEEP
    add = newprot & ~keep & U64
    val = (pmds & _U(keep)) | _U(add)
    was_np = (pmds != 0) & ((pmds & _U(_PAGE_PRESENT)) == 0)  # stored inverted (L1TF)
    # PRESENT is not kept, so whether the new value is non-present is one answer for
    # all of them unless newprot is empty (then each zero entry stays zero)
    if add & _PAGE_PRESENT:
        flip = was_np
    elif add:
        flip = ~was_np
    else:
        flip = was_np != ((val != 0) & ((val & _U(_PAGE_PRESENT)) == 0))
    return np.asarray(np.where(flip, val ^ _U(PHYSICAL_PMD_PAGE_MASK), val), dtype=np.uint64)


_PMD_MODIFY_KEEP = (_PAGE_CHG_MASK | _PAGE_PSE) & ~PTE_PFN_MASK | PHYSICAL_PMD_PAGE_MASK
assert not _PMD_MODIFY_KEEP & _PAGE_PRESENT
