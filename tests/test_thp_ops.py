"""THP under mprotect, mremap, fork, split_huge_page, deferred split, khugepaged,
MADV_COLLAPSE, memory_failure and the PMD decoder (mm/huge_memory.c, mm/khugepaged.c,
mm/memory-failure.c; v5.12, 6.1 and 6.18)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_PSE, _PAGE_RW
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.kernel.process import Process
from kvmpoison.mm import ptdump
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_NR,
    deferred_split_scan,
    split_huge_page,
    thp_pmd_mapping,
)
from kvmpoison.mm.khugepaged import khugepaged_scan
from kvmpoison.mm.madvise import MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.memory_failure import MF_ACTION_REQUIRED, MfReport
from kvmpoison.mm.mmap import PROT_NONE, PROT_READ
from kvmpoison.mm.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from kvmpoison.mm.page import Page, PageHWPoison, compound_mapcount, page_count, page_mapcount
from kvmpoison.mm.swapops import SwapTypes
from kvmpoison.uapi.errno import EHWPOISON

HPAGE = 2 << 20
V6_1 = KernelConfig(version=KernelVersion.V6_1)
V6_18 = KernelConfig(version=KernelVersion.V6_18)  # with CONFIG_MEMORY_FAILURE


def thp(p: Process, n: int = 4, fill: bytes = b"\x33") -> int:
    """``n`` 2 MiB-aligned THPs, written full of ``fill``."""
    addr = ok(p.mmap(0, (n + 1) * HPAGE, RW, ANON))
    addr = (addr + HPAGE - 1) & ~(HPAGE - 1)
    ok(p.madvise(addr, n * HPAGE, MADV_HUGEPAGE))
    ok(p.store(addr, fill * (n * HPAGE)))
    assert all(thp_pmd_mapping(p.mm, addr + i * HPAGE) for i in range(n))
    return addr


def head_of(p: Process, addr: int) -> int:
    found = thp_pmd_mapping(p.mm, addr)
    assert found is not None
    return found[0]


# -- mprotect -------------------------------------------------------------------------


def test_mprotect_of_a_whole_thp_changes_the_pmd_in_place() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p)
    head = head_of(p, addr)
    ok(p.mprotect(addr, HPAGE, PROT_READ))
    pmd = p.mm.pgd.pmd_leaf(addr)
    assert pmd & _PAGE_PSE and not pmd & _PAGE_RW and head_of(p, addr) == head
    assert p.store(addr, b"x").cell == "sig:SIGSEGV:SEGV_ACCERR"


def test_mprotect_of_one_page_splits_the_pmd_and_changes_only_that_pte() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p)
    head = head_of(p, addr)
    ok(p.mprotect(addr + PAGE, PAGE, PROT_NONE))
    assert thp_pmd_mapping(p.mm, addr) is None
    assert pte_pfn(p.mm.pgd.get(addr + PAGE)) == head + 1
    assert p.mm.pgd.get(addr) & _PAGE_RW and not p.mm.pgd.get(addr + PAGE) & _PAGE_RW
    assert len(p.mm.vmas) >= 3  # the VMA split in three around the page
    assert page_count(k.core.pages[head]) == HPAGE_PMD_NR
    assert p.load(addr + 2 * PAGE, 1).data == b"\x33"


@pytest.mark.parametrize(("kcfg", "writable"), [(RFC_BASE, False), (V6_1, False),
                                                (V6_18, True)], ids=["5.12", "6.1", "6.18"])
def test_mprotect_back_to_rw_upgrades_an_exclusive_thp_only_from_6_2(
        kcfg: KernelConfig, writable: bool) -> None:
    k = boot(kcfg)
    p = proc(k)
    addr = thp(p)
    ok(p.mprotect(addr, HPAGE, PROT_READ))
    ok(p.mprotect(addr, HPAGE, RW))
    assert bool(p.mm.pgd.pmd_leaf(addr) & _PAGE_RW) is writable
    head = head_of(p, addr)
    ok(p.store(addr, b"y"))  # either way a write then reuses the THP in place
    assert head_of(p, addr) == head


# -- mremap -----------------------------------------------------------------------------


def test_mremap_to_an_aligned_address_moves_the_pmd_and_its_table() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=2)
    head = head_of(p, addr + HPAGE)
    dst = ok(p.mmap(0, 3 * HPAGE, RW, ANON))
    dst = (dst + HPAGE - 1) & ~(HPAGE - 1)
    ptes = p.mm.pgd.nr_ptes
    assert ok(p.mremap(addr + HPAGE, HPAGE, HPAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst)) == dst
    assert head_of(p, dst) == head and p.mm.pgd.nr_ptes == ptes
    assert p.load(dst + 5, 1).data == b"\x33"


def test_mremap_to_an_unaligned_address_splits_and_moves_ptes() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=2)
    head = head_of(p, addr + HPAGE)
    dst = ok(p.mmap(0, 4 * HPAGE, RW, ANON))
    dst = ((dst + HPAGE - 1) & ~(HPAGE - 1)) + PAGE
    ok(p.mremap(addr + HPAGE, HPAGE, HPAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst))
    assert thp_pmd_mapping(p.mm, dst) is None
    assert pte_pfn(p.mm.pgd.get(dst + 3 * PAGE)) == head + 3
    assert p.load(dst + HPAGE - 1, 1).data == b"\x33"


# -- fork -------------------------------------------------------------------------------


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18], ids=["5.12", "6.18"])
def test_fork_shares_the_thp_and_a_child_write_splits_its_pmd(kcfg: KernelConfig) -> None:
    k = boot(kcfg)
    parent = proc(k)
    addr = thp(parent, n=1)
    head = head_of(parent, addr)
    child = parent.fork()
    assert head_of(child, addr) == head
    mem = k.core.pages
    assert compound_mapcount(mem[head]) == 2 and page_count(mem[head]) == 2
    assert not parent.mm.pgd.pmd_leaf(addr) & _PAGE_RW
    assert child.mm.rss_anon == HPAGE_PMD_NR
    ok(child.store(addr + 9 * PAGE, b"c"))
    assert thp_pmd_mapping(child.mm, addr) is None and head_of(parent, addr) == head
    assert pte_pfn(child.mm.pgd.get(addr + 9 * PAGE)) != head + 9
    assert pte_pfn(child.mm.pgd.get(addr + 8 * PAGE)) == head + 8
    assert page_count(mem[head]) == 1 + HPAGE_PMD_NR - 1  # the parent's PMD, 511 child PTEs
    assert parent.load(addr + 9 * PAGE, 1).data == b"\x33"
    ok(parent.store(addr, b"p"))  # the parent still shares subpages: it splits too
    assert thp_pmd_mapping(parent.mm, addr) is None


def test_fork_splits_a_pinned_thp_and_copies_the_pinned_pages() -> None:
    k = boot()
    parent = proc(k)
    addr = thp(parent, n=1)
    head = head_of(parent, addr)
    pins: list[Page] = []
    assert pin_user_pages(parent.mm, addr, 1, FOLL.WRITE, pins) == 1
    child = parent.fork()
    assert thp_pmd_mapping(parent.mm, addr) is None  # copy_huge_pmd: -EAGAIN after a split
    assert pte_pfn(parent.mm.pgd.get(addr)) == head
    assert pte_pfn(child.mm.pgd.get(addr)) != head  # copy_present_page gave the child its own
    assert child.load(addr, 1).data == b"\x33"
    unpin_user_pages(pins)


# -- split_huge_page and deferred split -----------------------------------------------------


def test_split_huge_page_succeeds_with_only_mappings_and_the_callers_reference() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    mem = k.core.pages
    mem._refcount[head] += 1  # the caller's reference
    assert split_huge_page(k.core, mem[head + 7]) == 0
    assert int(mem.order[head]) == 0 and int(mem.order[head + 300]) == 0
    assert page_count(mem[head + 7]) == 2 and page_count(mem[head + 8]) == 1
    assert page_mapcount(mem[head + 8]) == 1 and thp_pmd_mapping(p.mm, addr) is None
    assert p.load(addr + 300 * PAGE, 1).data == b"\x33"


def test_split_huge_page_is_ebusy_with_a_pin_or_for_the_huge_zero_page() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    mem = k.core.pages
    pins: list[Page] = []
    pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pins)
    mem._refcount[head] += 1
    assert split_huge_page(k.core, mem[head]) == -errno.EBUSY
    assert head_of(p, addr) == head
    zero_at = ok(p.mmap(0, 2 * HPAGE, RW, ANON))
    zero_at = (zero_at + HPAGE - 1) & ~(HPAGE - 1)
    ok(p.madvise(zero_at, HPAGE, MADV_HUGEPAGE))
    p.load(zero_at, 1)
    assert split_huge_page(k.core, mem[k.core.huge_zero_pfn]) == -errno.EBUSY


def test_deferred_split_frees_the_unmapped_subpages_of_a_partly_unmapped_thp() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    ok(p.madvise(addr, 100 * PAGE, MADV_DONTNEED))
    assert k.core.deferred_split_queue == [head]
    free = k.core.buddy.nr_free
    assert deferred_split_scan(k.core) == 1
    assert k.core.buddy.nr_free == free + 100 and not k.core.deferred_split_queue
    assert p.load(addr + 200 * PAGE, 1).data == b"\x33"


def test_deferred_split_keeps_a_pinned_thp_queued() -> None:
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    ok(p.madvise(addr + HPAGE - PAGE, PAGE, MADV_DONTNEED))
    pins: list[Page] = []
    pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pins)
    assert deferred_split_scan(k.core) == 0 and len(k.core.deferred_split_queue) == 1
    unpin_user_pages(pins)
    assert deferred_split_scan(k.core) == 1


# -- khugepaged and MADV_COLLAPSE -----------------------------------------------------------


def small_pages(p: Process, pages: int) -> int:
    addr = ok(p.mmap(0, 3 * HPAGE, RW, ANON))
    addr = (addr + HPAGE - 1) & ~(HPAGE - 1)
    ok(p.store(addr, b"\x44" * (pages * PAGE)))
    assert thp_pmd_mapping(p.mm, addr) is None
    return addr


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18], ids=["5.12", "6.18"])
def test_khugepaged_collapses_only_madvised_ranges_in_madvise_mode(kcfg: KernelConfig) -> None:
    k = boot(kcfg)
    p = proc(k)
    addr = small_pages(p, 64)
    assert khugepaged_scan(k.core) == 0
    ok(p.madvise(addr, 2 * HPAGE, MADV_HUGEPAGE))
    ptes = p.mm.pgd.nr_ptes
    assert khugepaged_scan(k.core) == 1
    assert thp_pmd_mapping(p.mm, addr) is not None and p.mm.rss_anon == HPAGE_PMD_NR
    assert p.mm.pgd.nr_ptes == ptes  # the PTE table is deposited, not freed
    assert p.load(addr + 63 * PAGE, 1).data == b"\x44"
    assert p.load(addr + 64 * PAGE, 1).data == b"\x00"


def test_khugepaged_refuses_a_range_with_a_pinned_page() -> None:
    k = boot()
    p = proc(k)
    addr = small_pages(p, 8)
    ok(p.madvise(addr, 2 * HPAGE, MADV_HUGEPAGE))
    pins: list[Page] = []
    pin_user_pages(p.mm, addr + PAGE, 1, FOLL.WRITE, pins)
    assert khugepaged_scan(k.core) == 0  # SCAN_PAGE_COUNT
    unpin_user_pages(pins)
    assert khugepaged_scan(k.core) == 1


def test_madvise_collapse_is_einval_on_5_12_and_collapses_from_6_1() -> None:
    for kcfg, want in ((RFC_BASE, -errno.EINVAL), (V6_1, 0), (V6_18, 0)):
        k = boot(kcfg)
        p = proc(k)
        addr = small_pages(p, 3)  # no MADV_HUGEPAGE: MADV_COLLAPSE ignores the sysfs mode
        out = p.madvise(addr, HPAGE, MADV_COLLAPSE)
        assert (out.value if out.succeeded else -(out.value or 0)) == want, kcfg.version
        assert (thp_pmd_mapping(p.mm, addr) is not None) is (want == 0)


def test_madvise_collapse_errnos() -> None:
    k = boot(V6_18)
    p = proc(k)
    addr = small_pages(p, 3)
    pins: list[Page] = []
    pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pins)
    assert p.madvise(addr, HPAGE, MADV_COLLAPSE).cell == "err:EAGAIN"  # SCAN_PAGE_COUNT
    unpin_user_pages(pins)
    assert p.madvise(addr + HPAGE, HPAGE, MADV_COLLAPSE).cell == "err:EINVAL"  # no table
    ok(p.mprotect(addr, HPAGE, PROT_READ))
    assert p.madvise(addr, HPAGE, MADV_COLLAPSE).cell == "err:EINVAL"  # SCAN_PAGE_RO


# -- memory_failure --------------------------------------------------------------------------


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18], ids=["5.12", "6.18"])
def test_memory_failure_splits_the_thp_and_unmaps_only_the_bad_subpage(
        kcfg: KernelConfig) -> None:
    k = boot(kcfg)
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    assert k.core.memory_failure is not None
    assert k.core.memory_failure(head + 5, 0, None) == 0
    assert thp_pmd_mapping(p.mm, addr) is None
    types = SwapTypes.for_config(kcfg)
    bad = ptdump.decode(p.mm.pgd.get(addr + 5 * PAGE), kcfg)
    assert bad.kind == "hwpoison" and types.hwpoison is not None
    assert pte_pfn(p.mm.pgd.get(addr + 6 * PAGE)) == head + 6
    assert int(k.core.pages.order[head + 6]) == 0
    assert p.load(addr + 6 * PAGE, 1).data == b"\x33"


@pytest.mark.parametrize(("kcfg", "ret", "result", "signals"), [
    (RFC_BASE, -errno.EBUSY, "Ignored", 0),  # v5.12 gives up silently
    (V6_18, -EHWPOISON, "Failed", 1),  # 6.18 signals and returns -EHWPOISON
])
def test_memory_failure_on_a_pinned_thp(kcfg: KernelConfig, ret: int, result: str,
                                        signals: int) -> None:
    k = boot(kcfg)
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    pins: list[Page] = []
    pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pins)
    sent: list[object] = []
    k.core.send_signal = lambda pid, info: sent.append(info)
    assert k.core.memory_failure is not None
    assert k.core.memory_failure(head + 5, MF_ACTION_REQUIRED, p.pid) == ret
    report = k.core.mf_reports[-1]
    assert isinstance(report, MfReport)
    assert (report.page_type, report.result.value) == ("unsplit thp", result)
    assert head_of(p, addr) == head and PageHWPoison(k.core.pages[head + 5])
    assert len(sent) == signals and page_count(k.core.pages[head]) == 2  # PMD + pin


# -- pte decode --level pmd ------------------------------------------------------------------


def test_pmd_decoder_names_huge_table_and_migration_entries() -> None:
    cfg = THIS_MACHINE
    huge = ptdump.decode(ptdump.encode_present(0x200, _PAGE_RW, "pmd"), cfg, "pmd")
    assert huge.as_dict()["fields"]["pmd"].startswith("huge")  # type: ignore[index]
    table = ptdump.decode(0x1234067, cfg, "pmd")
    assert table.as_dict()["fields"]["pmd"].startswith("table")  # type: ignore[index]
    types = SwapTypes.for_config(cfg)
    assert types.migration_write is not None
    mig = ptdump.decode(ptdump.encode_swap(types.migration_write, 0x200), cfg, "pmd")
    assert mig.kind == "migration" and "PMD migration" in mig.as_dict()["fields"]["pmd"]  # type: ignore[index]
    bad = ptdump.decode(ptdump.encode_hwpoison(0x200, RFC_BASE), RFC_BASE, "pmd")
    assert "not a PMD encoding" in bad.as_dict()["fields"]["pmd"]  # type: ignore[index]


# -- mlock and UFFDIO_POISON over a huge PMD ------------------------------------------------


def test_mlock_marks_a_pmd_mapped_thp_mlocked_and_munlock_clears_it() -> None:
    from kvmpoison.mm.page_flags import PG
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    mem = k.core.pages
    bit = mem.mask(PG.mlocked)
    ok(p.mlock(addr, HPAGE))
    assert mem.flags[head] & bit and head_of(p, addr) == head
    ok(p.munlock(addr, HPAGE))
    assert not mem.flags[head] & bit


def test_uffdio_poison_stops_at_a_huge_pmd_with_eexist() -> None:
    from kvmpoison.mm.userfaultfd import UFFDIO_REGISTER_MODE_MISSING
    k = boot(V6_18)
    p = proc(k)
    addr = thp(p, n=1)
    ctx = p.userfaultfd()
    ok(p.uffdio_register(ctx, addr, HPAGE,
                         UFFDIO_REGISTER_MODE_MISSING))
    assert p.uffdio_poison(ctx, addr + PAGE, PAGE).cell == "err:EEXIST"
    assert head_of(p, addr) is not None


def test_a_freed_thp_with_a_poisoned_subpage_keeps_only_that_page_out() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = thp(p, n=2)
    head = head_of(p, addr)
    pins: list[Page] = []
    pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pins)
    assert k.core.memory_failure is not None
    assert k.core.memory_failure(head + 5, 0, None) == -errno.EBUSY  # unsplit: stays a THP
    unpin_user_pages(pins)
    free, withheld = k.core.buddy.nr_free, k.core.buddy.withheld_hwpoison
    ok(p.munmap(addr, 2 * HPAGE))  # both THPs in one batch
    assert k.core.buddy.withheld_hwpoison == withheld + 1
    assert k.core.buddy.nr_free == free + 2 * HPAGE_PMD_NR - 1 + 2  # and 2 deposited tables


def test_pmd_modify_array_matches_pmd_modify() -> None:
    from kvmpoison.arch.x86.pgtable import pfn_pmd, pmd_modify, pmd_modify_array
    from kvmpoison.arch.x86.pgtable_types import PAGE_NONE
    from kvmpoison.mm.mm_types import VM, vm_get_page_prot
    olds = [pfn_pmd(0x200 * i, vm_get_page_prot(f) | _PAGE_PSE)
            for i, f in enumerate((VM.READ, VM.READ | VM.WRITE, VM(0), VM.EXEC), start=1)]
    for prot in (PAGE_NONE, vm_get_page_prot(VM.READ), vm_get_page_prot(VM.READ | VM.WRITE
                                                                         | VM.SHARED)):
        arr = pmd_modify_array(np.array(olds, dtype=np.uint64), prot)
        assert [int(v) for v in arr] == [pmd_modify(o, prot) for o in olds]


def test_soft_offline_splits_a_thp_before_failing_to_migrate() -> None:
    from kvmpoison.mm.madvise import MADV_SOFT_OFFLINE
    k = boot(RFC_BASE)
    p = proc(k)
    addr = thp(p, n=2)
    head = head_of(p, addr)
    assert p.madvise(addr + PAGE, PAGE, MADV_SOFT_OFFLINE).cell == "err:EBUSY"
    assert thp_pmd_mapping(p.mm, addr) is None  # split, then migration is not modelled
    assert page_count(k.core.pages[head + 1]) == 1 and int(k.core.pages.order[head]) == 0
    pins: list[Page] = []
    pin_user_pages(p.mm, addr + HPAGE, 1, FOLL.WRITE, pins)
    assert p.madvise(addr + HPAGE, PAGE, MADV_SOFT_OFFLINE).cell == "err:EBUSY"
    assert thp_pmd_mapping(p.mm, addr + HPAGE) is not None  # the pin stops the split
    assert k.core.dmesg[-1].endswith("thp split failed")


def test_kvm_side_queries_see_the_pmd_leaf_and_lose_it_on_split() -> None:
    from kvmpoison.mm.huge_memory import split_huge_pmd
    from kvmpoison.mm.page import PageTransCompoundMap
    k = boot()
    p = proc(k)
    addr = thp(p, n=1)
    head = head_of(p, addr)
    entry, level = p.mm.pgd.lookup_address(addr + 3 * PAGE)
    assert level == 2 and entry == p.mm.pgd.pmd_leaf(addr)
    assert PageTransCompoundMap(k.core.pages[head + 3])
    vma = next(v for v in p.mm.vmas if v.vm_start <= addr < v.vm_end)
    assert split_huge_pmd(vma, addr)
    entry, level = p.mm.pgd.lookup_address(addr + 3 * PAGE)
    assert level == 1 and pte_pfn(entry) == head + 3
    assert not PageTransCompoundMap(k.core.pages[head + 3])  # PTE-mapped now
    assert thp_pmd_mapping(p.mm, addr) is None


def test_madvise_collapse_refuses_a_nohugepage_vma() -> None:
    from kvmpoison.mm.madvise import MADV_NOHUGEPAGE
    k = boot(V6_18)
    p = proc(k)
    addr = small_pages(p, 3)
    ok(p.madvise(addr, 2 * HPAGE, MADV_NOHUGEPAGE))
    assert p.madvise(addr, HPAGE, MADV_COLLAPSE).cell == "err:EINVAL"
    assert thp_pmd_mapping(p.mm, addr) is None


def test_scenario_machine_thp_mode_always_gives_guest_ram_thps_without_madvise() -> None:
    from kvmpoison.scenario.loader import ScenarioError, load_text
    from kvmpoison.scenario.runner import run_scenario
    text = '''[scenario]
name = "thp-mode"
designs = ["baseline"]

[machine]
integrity = "off"
{mode}

[[vm]]
name = "a"
backing = "anon"
memory = "8M"

[[step]]
actor = "vmm:a"
op = "store"
gpa = 0x200000
data = "x"

[[step]]
actor = "vmm:a"
op = "madvise"
gpa = 0x200000
size = 0x1000
advice = "dontneed"

[[step]]
actor = "host"
op = "deferred_split_scan"
'''
    cells = {}
    for mode in ('thp = "always"', 'thp = "madvise"', ""):
        sc = load_text(text.replace("{mode}", mode), "thp.toml")
        cells[mode] = run_scenario(sc, "baseline").results[-1].outcome.cell
    assert cells == {'thp = "always"': "ret:1", 'thp = "madvise"': "ret:0", "": "ret:0"}
    with pytest.raises(ScenarioError, match="thp must be"):
        load_text(text.replace("{mode}", 'thp = "sometimes"'), "thp.toml")
