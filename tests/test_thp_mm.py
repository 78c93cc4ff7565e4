"""Anonymous THP in the host mm: the PMD fault, the huge zero page, split, zap, GUP,
mincore and smaps (mm/huge_memory.c, v5.12 and 6.18)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_PSE, _PAGE_RW, _PAGE_SPECIAL
from kvmpoison.fs.proc_task_mmu import smaps_rollup
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.kernel.process import Process
from kvmpoison.mm.gup import FOLL, get_user_pages, pin_user_pages, put_pages, unpin_user_pages
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_NR,
    THP_OFF,
    ThpSettings,
    host_thp_settings,
    parse_thp_choice,
    thp_pmd_mapping,
)
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE
from kvmpoison.mm.page import (
    Page,
    PageTransCompoundMap,
    compound_mapcount,
    page_count,
    page_mapcount,
)

HPAGE = 2 << 20
V6_18 = THIS_MACHINE


def thp_region(p: Process, size: int = 4 * HPAGE, advise: bool = True) -> int:
    """A 2 MiB-aligned anon region of ``size`` (MADV_HUGEPAGE unless told not to)."""
    addr = ok(p.mmap(0, size + HPAGE, RW, ANON))
    aligned = (addr + HPAGE - 1) & ~(HPAGE - 1)
    if advise:
        ok(p.madvise(aligned, size, MADV_HUGEPAGE))
    return aligned


def test_write_fault_maps_a_zeroed_order9_thp_by_pmd() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    free = k.core.buddy.nr_free
    ok(p.store(addr + 5 * PAGE, b"hello"))
    head, order = thp_pmd_mapping(p.mm, addr + 7 * PAGE) or (0, 0)
    assert order == 9 and head % HPAGE_PMD_NR == 0
    pmd = p.mm.pgd.pmd_leaf(addr)
    assert pmd & _PAGE_PSE and pmd & _PAGE_RW
    assert p.mm.pgd.get(addr) == 0  # no PTE table under a leaf
    mem = k.core.pages
    assert int(mem.order[head + 100]) == 9 and compound_mapcount(mem[head + 100]) == 1
    assert page_count(mem[head]) == 1 and page_mapcount(mem[head + 3]) == 1
    assert p.mm.rss_anon == HPAGE_PMD_NR
    # the THP and the deposited PTE table page (plus upper tables on first touch)
    assert free - k.core.buddy.nr_free >= HPAGE_PMD_NR + 1
    assert p.load(addr + 5 * PAGE, 5).data == b"hello"
    assert p.load(addr + HPAGE - 8, 8).data == bytes(8)
    assert PageTransCompoundMap(mem[head + 5])


def test_no_thp_without_madvise_in_madvise_mode_nor_with_nohugepage() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p, advise=False)
    ok(p.store(addr, b"x"))
    assert thp_pmd_mapping(p.mm, addr) is None and p.mm.rss_anon == 1
    k.core.thp = ThpSettings(enabled="always")
    ok(p.madvise(addr + HPAGE, HPAGE, MADV_NOHUGEPAGE))
    ok(p.store(addr + HPAGE, b"x"))
    assert thp_pmd_mapping(p.mm, addr + HPAGE) is None
    ok(p.store(addr + 2 * HPAGE, b"x"))  # "always" needs no madvise
    assert thp_pmd_mapping(p.mm, addr + 2 * HPAGE) is not None
    k.core.thp = THP_OFF
    ok(p.store(addr + 3 * HPAGE, b"x"))
    assert thp_pmd_mapping(p.mm, addr + 3 * HPAGE) is None


def test_a_vma_smaller_than_an_aligned_2mib_falls_back() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p, size=HPAGE, advise=False)
    ok(p.munmap(addr + HPAGE - PAGE, PAGE))
    ok(p.madvise(addr, HPAGE - PAGE, MADV_HUGEPAGE))
    ok(p.store(addr, b"x"))
    assert thp_pmd_mapping(p.mm, addr) is None and p.mm.rss_anon == 1


def test_read_fault_maps_the_huge_zero_page_unless_use_zero_page_is_off() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    assert p.load(addr, 8).data == bytes(8)
    pmd = p.mm.pgd.pmd_leaf(addr)
    assert pmd & _PAGE_PSE and not pmd & _PAGE_RW
    assert thp_pmd_mapping(p.mm, addr) == (k.core.huge_zero_pfn, 9)
    assert p.mm.rss_anon == 0 and smaps_rollup(p.mm)["Rss"] == 0
    k.core.thp = ThpSettings(use_zero_page=False)
    assert p.load(addr + HPAGE, 8).data == bytes(8)
    head, _ = thp_pmd_mapping(p.mm, addr + HPAGE) or (0, 0)
    assert head != k.core.huge_zero_pfn and p.mm.rss_anon == HPAGE_PMD_NR


def test_v5_12_write_to_the_huge_zero_page_splits_it_into_small_zero_ptes() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = thp_region(p)
    p.load(addr, 8)
    ok(p.store(addr + 3 * PAGE, b"w"))
    assert thp_pmd_mapping(p.mm, addr) is None
    zero = p.mm.pgd.get(addr)
    assert zero & _PAGE_SPECIAL and pte_pfn(zero) == k.core.zero_pfn
    new = p.mm.pgd.get(addr + 3 * PAGE)
    assert not new & _PAGE_SPECIAL and new & _PAGE_RW
    assert p.mm.rss_anon == 1 and p.load(addr + 3 * PAGE, 1).data == b"w"


def test_6_18_write_to_the_huge_zero_page_allocates_a_thp() -> None:
    k = boot(V6_18)
    p = proc(k)
    addr = thp_region(p)
    p.load(addr, 8)
    ok(p.store(addr + 3 * PAGE, b"w"))
    head, order = thp_pmd_mapping(p.mm, addr) or (0, 0)
    assert order == 9 and head != k.core.huge_zero_pfn
    assert p.mm.rss_anon == HPAGE_PMD_NR and p.load(addr + 3 * PAGE, 1).data == b"w"


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18], ids=["5.12", "6.18"])
def test_partial_dontneed_splits_the_pmd_and_zaps_only_that_page(kcfg: KernelConfig) -> None:
    k = boot(kcfg)
    p = proc(k)
    addr = thp_region(p)
    ok(p.store(addr, b"\x11" * HPAGE))
    head, _ = thp_pmd_mapping(p.mm, addr) or (0, 0)
    ok(p.madvise(addr + 10 * PAGE, PAGE, MADV_DONTNEED))
    assert thp_pmd_mapping(p.mm, addr) is None
    mem = k.core.pages
    assert p.mm.pgd.get(addr + 10 * PAGE) == 0
    assert pte_pfn(p.mm.pgd.get(addr + 11 * PAGE)) == head + 11
    assert page_count(mem[head]) == HPAGE_PMD_NR - 1  # one reference per remaining PTE
    assert page_mapcount(mem[head + 10]) == 0 and page_mapcount(mem[head + 11]) == 1
    assert compound_mapcount(mem[head]) == 0
    assert p.mm.rss_anon == HPAGE_PMD_NR - 1
    assert head in k.core.deferred_split_queue
    assert p.load(addr + 10 * PAGE, 1).data == b"\x00"
    assert p.load(addr + 11 * PAGE, 1).data == b"\x11"


def test_munmap_of_a_whole_2mib_frees_the_thp_and_its_deposited_table() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    ok(p.store(addr, b"x"))
    ptes = p.mm.pgd.nr_ptes
    free = k.core.buddy.nr_free
    ok(p.munmap(addr, HPAGE))
    assert p.mm.pgd.nr_pmd_leaves == 0 and p.mm.rss_anon == 0
    assert p.mm.pgd.nr_ptes == ptes - 1
    assert k.core.buddy.nr_free == free + HPAGE_PMD_NR + 1


def test_partial_munmap_splits_and_keeps_the_rest_mapped() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    ok(p.store(addr, b"\x22" * HPAGE))
    head, _ = thp_pmd_mapping(p.mm, addr) or (0, 0)
    ok(p.munmap(addr + HPAGE - 4 * PAGE, 4 * PAGE))
    assert thp_pmd_mapping(p.mm, addr) is None
    assert p.load(addr, 1).data == b"\x22"
    assert p.mm.pgd.get(addr + HPAGE - PAGE) == 0
    assert page_count(k.core.pages[head]) == HPAGE_PMD_NR - 4
    ok(p.munmap(addr, HPAGE))
    assert k.core.pages._refcount[head] == 0 and head not in k.core.deferred_split_queue


def test_mincore_and_smaps_through_a_pmd() -> None:
    from kvmpoison.mm.mincore import do_mincore
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    ok(p.store(addr + HPAGE, b"x"))
    vec = do_mincore(p.mm, addr, 2 * HPAGE)
    assert isinstance(vec, np.ndarray)
    assert not vec[:HPAGE_PMD_NR].any() and vec[HPAGE_PMD_NR:].all()
    stats = smaps_rollup(p.mm)
    assert stats["AnonHugePages"] == 2048 and stats["Rss"] == 2048 and stats["Anonymous"] == 2048
    ok(p.madvise(addr + HPAGE, PAGE, MADV_DONTNEED))
    stats = smaps_rollup(p.mm)
    assert stats["AnonHugePages"] == 0 and stats["Rss"] == 2044


def test_gup_through_a_pmd_grabs_the_head_and_returns_subpages() -> None:
    k = boot()
    p = proc(k)
    addr = thp_region(p)
    ok(p.store(addr, b"x"))
    head, _ = thp_pmd_mapping(p.mm, addr) or (0, 0)
    pages: list[Page] = []
    assert get_user_pages(p.mm, addr + 3 * PAGE, 4, FOLL.WRITE, pages) == 4
    assert [pg.pfn for pg in pages] == [head + 3, head + 4, head + 5, head + 6]
    assert page_count(k.core.pages[head]) == 5
    put_pages(pages)
    pins: list[Page] = []
    assert pin_user_pages(p.mm, addr, 2, FOLL.WRITE, pins) == 2
    assert page_count(k.core.pages[head]) == 3  # compound: +1 per pin (pincount)
    unpin_user_pages(pins)
    assert page_count(k.core.pages[head]) == 1
    # a populate walk without pages[] steps over the huge page in one go
    assert get_user_pages(p.mm, addr, 2 * HPAGE_PMD_NR, FOLL.WRITE) == 2 * HPAGE_PMD_NR
    assert thp_pmd_mapping(p.mm, addr + HPAGE) is not None


def test_gup_write_of_the_huge_zero_page_faults_to_a_private_copy() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = thp_region(p)
    p.load(addr, 8)
    pages: list[Page] = []
    assert get_user_pages(p.mm, addr, 1, FOLL.WRITE, pages) == 1
    assert pages[0].pfn != k.core.huge_zero_pfn and thp_pmd_mapping(p.mm, addr) is None
    put_pages(pages)


def test_thp_sysfs_settings_parse_and_validate(tmp_path: object) -> None:
    import pathlib
    root = pathlib.Path(str(tmp_path))
    (root / "enabled").write_text("always [madvise] never\n")
    (root / "defrag").write_text("always defer defer+madvise madvise [never]\n")
    (root / "shmem_enabled").write_text("always within_size [advise] never deny force\n")
    (root / "use_zero_page").write_text("0\n")
    settings, assumed = host_thp_settings(str(root))
    assert settings == ThpSettings(enabled="madvise", defrag="never", shmem_enabled="advise",
                                   use_zero_page=False)
    assert assumed == ()
    assert parse_thp_choice("[always] madvise never") == "always"
    with pytest.raises(ValueError, match="not one of"):
        ThpSettings(enabled="sometimes")
    _, assumed = host_thp_settings(str(root / "missing"))
    assert "enabled" in assumed


def test_thp_settings_from_sysfs_texts_as_a_guest_reports_them() -> None:
    """The 6.1 referee's guest reports its sysfs texts; the model runs with those modes."""
    from kvmpoison.mm.huge_memory import thp_settings_from_sysfs

    got, assumed = thp_settings_from_sysfs({
        "enabled": "[always] madvise never\n", "defrag": "always defer [madvise] never\n",
        "shmem_enabled": "always within_size [advise] never deny force\n",
        "use_zero_page": "1\n"})
    assert (got.enabled, got.shmem_enabled, got.use_zero_page) == ("always", "advise", True)
    assert assumed == ()
    _, assumed = thp_settings_from_sysfs({"enabled": "[never]"})
    assert assumed == ("defrag", "shmem_enabled", "use_zero_page")
