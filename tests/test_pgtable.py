from hypothesis import given
from hypothesis import strategies as st

from kvmpoison.arch.x86.pgtable import (
    is_swap_pte,
    pfn_pmd,
    pfn_pte,
    pmd_pfn,
    pmd_present,
    pte_modify,
    pte_none,
    pte_pfn,
    pte_present,
    pte_protnone,
)
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PSE,
    PAGE_NONE,
    PAGE_SHARED,
    PTE_PFN_MASK,
    PteFlag,
    max_physmem_bits,
    pte_pfn_mask,
    virtual_mask_shift,
)

PFNS = st.integers(min_value=0, max_value=(1 << 40) - 1)


def test_bit_positions_match_pgtable_types_h() -> None:
    expected = {
        "PRESENT": 0,
        "RW": 1,
        "USER": 2,
        "PWT": 3,
        "PCD": 4,
        "ACCESSED": 5,
        "DIRTY": 6,
        "PSE": 7,
        "GLOBAL": 8,
        "SPECIAL": 9,
        "UFFD_WP": 10,
        "SOFT_DIRTY": 11,
        "PAT_LARGE": 12,
        "SAVED_DIRTY": 57,
        "DEVMAP": 58,
        "PKEY_BIT0": 59,
        "NX": 63,
    }
    for name, bit in expected.items():
        assert PteFlag[name] == 1 << bit, name


def test_pfn_mask_is_bits_12_to_51_for_both_paging_modes() -> None:
    assert PTE_PFN_MASK == 0x000F_FFFF_FFFF_F000
    assert pte_pfn_mask(False) == pte_pfn_mask(True) == PTE_PFN_MASK
    assert (virtual_mask_shift(False), virtual_mask_shift(True)) == (47, 56)
    assert (max_physmem_bits(False), max_physmem_bits(True)) == (46, 52)


def test_pte_none_ignores_knl_erratum_bits() -> None:
    assert pte_none(0)
    assert pte_none(_PAGE_DIRTY | _PAGE_ACCESSED)
    assert not pte_none(PteFlag.RW)


@given(PFNS)
def test_present_pte_round_trips_pfn(pfn: int) -> None:
    pte = pfn_pte(pfn, PAGE_SHARED)
    assert pte_present(pte) and not pte_protnone(pte) and not is_swap_pte(pte)
    assert pte_pfn(pte) == pfn
    assert (pte & PTE_PFN_MASK) >> 12 == pfn  # stored as is


@given(PFNS)
def test_protnone_pte_stores_inverted_pfn(pfn: int) -> None:
    pte = pfn_pte(pfn, PAGE_NONE)
    assert pte_present(pte) and pte_protnone(pte)
    assert pte_pfn(pte) == pfn
    assert (pte & PTE_PFN_MASK) >> 12 == pfn ^ ((1 << 40) - 1)  # L1TF inversion


@given(PFNS)
def test_pte_modify_reinverts_across_present_changes(pfn: int) -> None:
    pte = pfn_pte(pfn, PAGE_SHARED) | _PAGE_DIRTY
    none = pte_modify(pte, PAGE_NONE)
    assert pte_protnone(none) and pte_pfn(none) == pfn and none & _PAGE_DIRTY
    back = pte_modify(none, PAGE_SHARED)
    assert back == pte


@given(st.integers(min_value=0, max_value=(1 << 31) - 1))
def test_pmd_round_trip_and_presence(hpfn: int) -> None:
    pfn = hpfn << 9
    pmd = pfn_pmd(pfn, PAGE_SHARED | _PAGE_PSE)
    assert pmd_present(pmd) and pmd_pfn(pmd) == pfn
    assert pmd_present(pmd & ~int(PteFlag.PRESENT))  # PSE alone still counts
