"""shmem/memfd THP: the shmem_enabled modes, the order-9 page-cache page, its PMD mapping,
the counters, unmap and split of a file PMD, and partial punch/truncate
(mm/shmem.c, mm/memory.c do_set_pmd, mm/huge_memory.c; v5.12, 6.1 and 6.18)."""

from __future__ import annotations

from signal import SIGBUS

import numpy as np
import pytest

from helpers import ANON, PAGE, RW, SHARED, boot, ok, proc
from kvmpoison.fs.proc_task_mmu import smaps_rollup, smaps_shmem_pmd_mapped
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.fault import find_vma
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages
from kvmpoison.mm.huge_memory import HPAGE_PMD_NR, ThpSettings, thp_pmd_mapping
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE, MADV_HWPOISON, MADV_NOHUGEPAGE
from kvmpoison.mm.mmap import MAP_FIXED, MAP_PRIVATE
from kvmpoison.mm.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from kvmpoison.mm.page import (
    Page,
    PageDirty,
    PageTransCompoundMap,
    compound_mapcount,
    page_count,
    page_mapcount,
    total_mapcount,
)
from kvmpoison.mm.shmem_huge import (
    SHMEM_HUGE_ADVISE,
    SHMEM_HUGE_DENY,
    SHMEM_HUGE_FORCE,
    SHMEM_HUGE_NEVER,
    meminfo_shmem_thp,
    shm_mnt_huge,
    shmem_huge_enabled,
    shmem_parse_huge,
)
from kvmpoison.outcome import Kind

HPAGE = 2 << 20
V5_12, V6_1, V6_18 = RFC_BASE, KernelConfig(version=KernelVersion.V6_1), THIS_MACHINE
KERNELS = pytest.mark.parametrize("kcfg", [V5_12, V6_1, V6_18], ids=["5.12", "6.1", "6.18"])
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def memfd_thp(kcfg: KernelConfig, shmem_enabled: str = "advise", size: int = 2 * HPAGE,
              advise: bool = True, flags: int = SHARED,
              pgoff: int = 0) -> tuple[Kernel, Process, int, int]:
    """A memfd of ``size`` mapped at a 2 MiB-aligned address (file offset ``pgoff``
    pages), MADV_HUGEPAGE unless told not to: (kernel, process, address, fd)."""
    k = boot(kcfg)
    k.core.thp = ThpSettings(shmem_enabled=shmem_enabled)
    p = proc(k)
    base = ok(p.mmap(0, size + 2 * HPAGE, RW, ANON))
    t = (base + HPAGE - 1) & ~(HPAGE - 1)
    fd = ok(p.memfd_create("thp"))
    ok(p.ftruncate(fd, size + (pgoff << 12)))
    ok(p.mmap(t, size, RW, flags | MAP_FIXED, fd, pgoff << 12))
    if advise:
        ok(p.madvise(t, size, MADV_HUGEPAGE))
    return k, p, t, fd


def cached_pfn(p: Process, fd: int, index: int) -> int:
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None
    pfn = mapping.lookup(index)
    assert pfn is not None
    return pfn


def head_of(k: Kernel, pfn: int) -> Page:
    return k.core.pages[pfn & ~(HPAGE_PMD_NR - 1)]


def test_sysfs_words_and_the_internal_mount() -> None:
    assert shmem_parse_huge("within_size") == 2 and shmem_parse_huge("force") == SHMEM_HUGE_FORCE
    with pytest.raises(ValueError, match="not one of"):
        shmem_parse_huge("madvise")  # the anon word is not a shmem one
    k = boot()
    for word, mount in (("advise", SHMEM_HUGE_ADVISE), ("deny", SHMEM_HUGE_NEVER),
                        ("force", SHMEM_HUGE_NEVER), ("never", SHMEM_HUGE_NEVER)):
        k.core.thp = ThpSettings(shmem_enabled=word)
        assert shm_mnt_huge(k.core) == mount, word
    assert shmem_parse_huge("deny") == SHMEM_HUGE_DENY


@KERNELS
@pytest.mark.parametrize(("mode", "advise", "huge"), [
    ("advise", True, True), ("advise", False, False), ("never", True, False),
    ("always", False, True), ("within_size", False, True), ("deny", True, False),
    ("force", False, True)])
def test_fault_maps_a_pmd_per_mode(kcfg: KernelConfig, mode: str, advise: bool,
                                   huge: bool) -> None:
    k, p, t, fd = memfd_thp(kcfg, mode, advise=advise)
    ok(p.store(t + 5 * PAGE, b"hello"))
    assert (thp_pmd_mapping(p.mm, t) is not None) == huge
    assert int(k.core.pages.order[cached_pfn(p, fd, 5)]) == (9 if huge else 0)
    assert p.load(t + 5 * PAGE, 5).data == b"hello"
    assert p.mm.rss_shmem == (HPAGE_PMD_NR if huge else 1)


@KERNELS
def test_nohugepage_refuses_even_always(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg, "always", advise=False)
    ok(p.madvise(t, HPAGE, MADV_NOHUGEPAGE))
    ok(p.store(t, b"x"))
    assert thp_pmd_mapping(p.mm, t) is None and not k.core.pages.order[cached_pfn(p, fd, 0)]
    ok(p.store(t + HPAGE, b"x"))  # the other 2 MiB has no VM_NOHUGEPAGE
    assert thp_pmd_mapping(p.mm, t + HPAGE) is not None


def test_within_size_rounds_differently_in_5_12_and_6_1() -> None:
    """v5.12 tests round_up(index, 512) <= i_size pages (a huge page may reach past
    EOF); 6.1 round_up(index + 1, 512): with i_size 2 MiB + 4 KiB, index 512 is huge
    on v5.12 only."""
    for kcfg, huge in ((V5_12, True), (V6_1, False)):
        k, p, t, fd = memfd_thp(kcfg, "within_size", size=2 * HPAGE, advise=False)
        ok(p.ftruncate(fd, HPAGE + PAGE))
        ok(p.store(t + HPAGE, b"x"))
        assert bool(k.core.pages.order[cached_pfn(p, fd, HPAGE_PMD_NR)]) == huge, kcfg


@KERNELS
def test_write_and_fallocate_take_a_huge_page_only_without_advise(kcfg: KernelConfig) -> None:
    """write() and fallocate pass no VMA: advise never gives them a huge page, always does."""
    for mode, huge in (("advise", False), ("always", True)):
        k, p, _t, fd = memfd_thp(kcfg, mode, advise=False)
        buf = ok(p.mmap(0, PAGE, RW, ANON))
        ok(p.store(buf, b"abc"))
        assert ok(p.pwrite(fd, buf, 3, 7 * PAGE)) == 3
        ok(p.fallocate(fd, 0, HPAGE, PAGE))
        order = k.core.pages.order
        assert bool(order[cached_pfn(p, fd, 7)]) == huge
        assert bool(order[cached_pfn(p, fd, HPAGE_PMD_NR)]) == huge
        if huge:  # one THP covers the 512 indices: every lookup in it is a subpage
            assert cached_pfn(p, fd, 9) == cached_pfn(p, fd, 7) + 2


@KERNELS
def test_counters_and_mapcounts_of_a_pmd_mapped_shmem_thp(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"x"))
    head = head_of(k, cached_pfn(p, fd, 0))
    # the cache's 512 references and the PMD mapping's one
    assert page_count(head) == HPAGE_PMD_NR + 1
    assert compound_mapcount(head) == 1 and total_mapcount(head) == 1
    assert page_mapcount(k.core.pages[head.pfn + 77]) == 1
    assert meminfo_shmem_thp(k.core) == {"ShmemHugePages": 2048, "ShmemPmdMapped": 2048}
    vma = find_vma(p.mm, t)
    assert vma is not None and smaps_shmem_pmd_mapped(vma) == 2048
    assert smaps_rollup(p.mm)["Rss"] == 2048 and smaps_rollup(p.mm)["AnonHugePages"] == 0
    assert p.mm.pgd.nr_ptes == 0 or p.mm.pgd.deposited == {}  # no table deposited (x86)
    ok(p.munmap(t, HPAGE))
    assert page_count(head) == HPAGE_PMD_NR and total_mapcount(head) == 0
    assert meminfo_shmem_thp(k.core) == {"ShmemHugePages": 2048, "ShmemPmdMapped": 0}
    assert p.mm.rss_shmem == 0


@KERNELS
def test_a_second_mapping_shares_the_thp(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"shared"))
    t2 = ok(p.mmap(0, 3 * HPAGE, RW, ANON))
    t2 = (t2 + HPAGE - 1) & ~(HPAGE - 1)
    ok(p.mmap(t2, HPAGE, RW, SHARED | MAP_FIXED, fd))
    ok(p.madvise(t2, HPAGE, MADV_HUGEPAGE))
    assert p.load(t2, 6).data == b"shared"  # a read fault: fault-around maps the PMD
    head = head_of(k, cached_pfn(p, fd, 0))
    assert compound_mapcount(head) == 2 and page_mapcount(k.core.pages[head.pfn + 3]) == 2
    assert total_mapcount(head) == 2 and page_count(head) == HPAGE_PMD_NR + 2


@KERNELS
def test_partial_unmap_zaps_the_whole_file_pmd_and_it_refaults(kcfg: KernelConfig) -> None:
    """split_huge_pmd of a file PMD zaps it: no PTE table, the page stays cached."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"keep"))
    head = head_of(k, cached_pfn(p, fd, 0))
    ok(p.madvise(t + 3 * PAGE, PAGE, MADV_DONTNEED))
    assert thp_pmd_mapping(p.mm, t) is None and p.mm.pgd.get(t) == 0
    assert p.mm.rss_shmem == 0 and smaps_rollup(p.mm)["Rss"] == 0
    assert page_count(head) == HPAGE_PMD_NR and int(k.core.pages.order[head.pfn]) == 9
    assert p.load(t, 4).data == b"keep"  # refault: the PMD again
    assert thp_pmd_mapping(p.mm, t) == (head.pfn, 9)


@KERNELS
def test_mprotect_of_one_page_leaves_ptes_after_refault(kcfg: KernelConfig) -> None:
    _k, p, t, _fd = memfd_thp(kcfg)
    ok(p.store(t, b"data"))
    ok(p.mprotect(t + 4 * PAGE, PAGE, 0x1))
    assert thp_pmd_mapping(p.mm, t) is None
    assert p.load(t, 4).data == b"data"  # the VMA no longer holds the 2 MiB: a PTE
    assert thp_pmd_mapping(p.mm, t) is None and p.mm.pgd.get(t) != 0
    assert smaps_rollup(p.mm)["ShmemPmdMapped"] == 0


def test_misaligned_offset_v5_12_caches_a_thp_but_maps_ptes_6_18_caches_small() -> None:
    """do_set_pmd needs the file offset aligned with the address; 6.11+'s
    shmem_suitable_orders does not allocate the THP at all then."""
    for kcfg, order in ((V5_12, 9), (V6_18, 0)):
        k, p, t, fd = memfd_thp(kcfg, "always", pgoff=1)
        ok(p.store(t, b"x"))
        assert thp_pmd_mapping(p.mm, t) is None
        assert int(k.core.pages.order[cached_pfn(p, fd, 1)]) == order, kcfg


@KERNELS
def test_private_mapping_write_splits_the_pmd_and_cows_one_page(kcfg: KernelConfig) -> None:
    _k, p, t, fd = memfd_thp(kcfg, "always", flags=MAP_PRIVATE, advise=False)
    buf = ok(p.mmap(0, PAGE, RW, ANON))
    ok(p.store(buf, b"file"))
    ok(p.pwrite(fd, buf, 4, 0))  # always: write() caches a THP
    assert p.load(t, 4).data == b"file" and thp_pmd_mapping(p.mm, t) is not None
    anon = p.mm.rss_anon
    ok(p.store(t + PAGE, b"cow"))  # read-only PMD: wp_huge_pmd splits (zaps) it
    assert thp_pmd_mapping(p.mm, t) is None and p.mm.rss_anon == anon + 1
    assert p.load(t, 4).data == b"file"
    other = ok(p.mmap(0, PAGE, RW, ANON))
    assert ok(p.pread(fd, other, 3, PAGE)) == 3 and p.load(other, 3).data == bytes(3)


@KERNELS
def test_punch_one_page_splits_the_thp(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, bytes([7]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    ok(p.fallocate(fd, PUNCH, 9 * PAGE, PAGE))
    mem = k.core.pages
    assert not mem.order[head : head + HPAGE_PMD_NR].any()
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None and mapping.lookup(9) is None and mapping.lookup(10) == head + 10
    assert meminfo_shmem_thp(k.core)["ShmemHugePages"] == 0
    assert p.load(t + 9 * PAGE, 4).data == bytes(4)
    assert p.load(t + 10 * PAGE, 4).data == bytes([7]) * 4
    assert thp_pmd_mapping(p.mm, t) is None  # small pages now: PTEs


@KERNELS
def test_punch_with_a_pin_keeps_the_thp_and_zeroes_the_range(kcfg: KernelConfig) -> None:
    """split_huge_page fails (-EBUSY: a GUP pin is an extra reference); shmem_undo_range
    zeroes the punched pages instead (v5.12 clear_highpage, 6.x folio_zero_range) and
    keeps the THP, dirty, with all 512 indices cached."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, bytes([7]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0))
    pages: list[Page] = []
    assert pin_user_pages(p.mm, t + 100 * PAGE, 1, FOLL.WRITE | FOLL.LONGTERM, pages) == 1
    ok(p.fallocate(fd, PUNCH, 9 * PAGE, 2 * PAGE))
    mem = k.core.pages
    assert int(mem.order[head.pfn]) == 9 and PageDirty(head)
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None and mapping.lookup(9) == head.pfn + 9 and mapping.nrpages == 512
    assert p.load(t + 9 * PAGE, 8).data == bytes(8)
    assert p.load(t + 10 * PAGE + PAGE - 8, 8).data == bytes(8)
    assert p.load(t + 11 * PAGE, 4).data == bytes([7]) * 4
    assert p.load(t + 8 * PAGE + PAGE - 4, 4).data == bytes([7]) * 4
    unpin_user_pages(pages)
    assert page_count(head) == HPAGE_PMD_NR + int(thp_pmd_mapping(p.mm, t) is not None)


@pytest.mark.parametrize(("kcfg", "splits"), [(V5_12, False), (V6_18, True)],
                         ids=["5.12", "6.18"])
def test_punching_bytes_inside_one_page_splits_only_on_6x(kcfg: KernelConfig,
                                                          splits: bool) -> None:
    """v5.12 splits only for whole pages of the range; 6.x's truncate_inode_partial_folio
    splits the folio a partial range falls in."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, bytes([7]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    ok(p.fallocate(fd, PUNCH, 9 * PAGE + 100, 50))
    assert (not k.core.pages.order[head]) == splits
    assert p.load(t + 9 * PAGE + 96, 60).data == bytes([7]) * 4 + bytes(50) + bytes([7]) * 6


@KERNELS
def test_punching_the_whole_thp_frees_it(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"x"))
    free = k.core.buddy.nr_free
    ok(p.fallocate(fd, PUNCH, 0, HPAGE))
    assert k.core.buddy.nr_free == free + HPAGE_PMD_NR
    assert meminfo_shmem_thp(k.core)["ShmemHugePages"] == 0 and p.mm.rss_shmem == 0
    assert p.load(t, 1).data == b"\0"


@KERNELS
def test_truncate_into_a_thp_splits_and_drops_the_pages_past_eof(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg, size=HPAGE)
    ok(p.store(t, bytes([5]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    free = k.core.buddy.nr_free
    ok(p.ftruncate(fd, 100 * PAGE + 10))
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None and mapping.nrpages == 101 and mapping.lookup(101) is None
    assert k.core.buddy.nr_free == free + HPAGE_PMD_NR - 101
    assert not k.core.pages.order[head]
    assert p.load(t + 100 * PAGE, 12).data == bytes([5]) * 10 + bytes(2)
    past = p.load(t + 101 * PAGE, 1)  # SIGBUS past EOF
    assert past.kind is Kind.SIG and past.siginfo is not None and past.siginfo.signo == SIGBUS


@KERNELS
def test_truncate_with_a_pin_keeps_the_thp_zeroed_past_eof(kcfg: KernelConfig) -> None:
    k, p, t, fd = memfd_thp(kcfg, size=HPAGE)
    ok(p.store(t, bytes([5]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0))
    pages: list[Page] = []
    assert pin_user_pages(p.mm, t, 1, FOLL.WRITE | FOLL.LONGTERM, pages) == 1
    ok(p.ftruncate(fd, 100 * PAGE))
    assert int(k.core.pages.order[head.pfn]) == 9
    data = k.core.hw.read((head.pfn + 300) << 12, 8, 0).data
    assert data == bytes(8)  # zeroed, still cached beyond EOF
    assert k.core.hw.read((head.pfn + 99) << 12, 8, 0).data == bytes([5]) * 8
    unpin_user_pages(pages)


@KERNELS
def test_fork_child_refaults_the_pmd(kcfg: KernelConfig) -> None:
    """copy_huge_pmd skips a file VMA ("can be re-fill on fault")."""
    _k, p, t, _fd = memfd_thp(kcfg)
    ok(p.store(t, b"parent"))
    child = p.fork()
    assert thp_pmd_mapping(child.mm, t) is None
    assert child.load(t, 6).data == b"parent"
    assert thp_pmd_mapping(child.mm, t) == thp_pmd_mapping(p.mm, t)
    ok(child.store(t + PAGE, b"child"))  # shared: the parent sees it
    assert p.load(t + PAGE, 5).data == b"child"


def test_defaults_keep_small_pages() -> None:
    """THP off by default (shmem_enabled never): the bulk populate still maps order-0."""
    k = boot(V6_18)
    p = proc(k)
    fd = ok(p.memfd_create("plain"))
    ok(p.ftruncate(fd, HPAGE))
    t = ok(p.mmap(0, HPAGE, RW, SHARED, fd))
    ok(p.madvise(t, HPAGE, MADV_HUGEPAGE))
    ok(p.store(t, bytes(HPAGE)))
    pfns = np.array([cached_pfn(p, fd, i) for i in (0, 1, 511)])
    assert not k.core.pages.order[pfns].any() and meminfo_shmem_thp(k.core)["ShmemHugePages"] == 0


def test_shmem_huge_enabled_5_12() -> None:
    k, p, t, fd = memfd_thp(V5_12, "within_size", size=HPAGE, advise=False)
    vma = find_vma(p.mm, t)
    assert vma is not None and shmem_huge_enabled(vma)
    ok(p.ftruncate(fd, HPAGE - PAGE))
    assert not shmem_huge_enabled(vma)
    ok(p.madvise(t, HPAGE - PAGE, MADV_HUGEPAGE))
    assert shmem_huge_enabled(vma)  # within_size falls through to advise
    k.core.thp = ThpSettings(shmem_enabled="deny")
    assert not shmem_huge_enabled(vma)


@pytest.mark.parametrize(("kcfg", "split"), [(V5_12, False), (V6_1, True)], ids=["5.12", "6.1"])
def test_memory_failure_on_a_shmem_thp(kcfg: KernelConfig, split: bool) -> None:
    """v5.12's try_to_split_thp_page refuses a non-anon THP (-EBUSY, "non anonymous thp"):
    the THP stays and a refault maps the poisoned subpage by PMD again; 5.15+ splits it,
    and only the poisoned page is SIGBUS."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, bytes([7]) * HPAGE))
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    out = p.madvise(t + 5 * PAGE, PAGE, MADV_HWPOISON)
    assert out.succeeded == split and bool(k.core.pages.order[head]) != split
    assert p.fork().load(t + 6 * PAGE, 1).data == bytes([7])
    poisoned = p.fork().load(t + 5 * PAGE, 1)
    if split:
        assert poisoned.siginfo is not None and poisoned.siginfo.signo == SIGBUS
    else:
        assert poisoned.succeeded and any("non anonymous thp" in m for m in k.core.dmesg)


@KERNELS
def test_mremap_moves_a_whole_file_pmd_and_zaps_a_partial_one(kcfg: KernelConfig) -> None:
    """move_huge_pmd moves a file PMD as one entry (no deposited table to carry); a move
    of part of it splits, which for a file PMD is a zap."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"moved"))
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    spare = ok(p.mmap(0, 4 * HPAGE, RW, ANON))
    dst = (spare + HPAGE - 1) & ~(HPAGE - 1)
    assert ok(p.mremap(t, HPAGE, HPAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst)) == dst
    assert thp_pmd_mapping(p.mm, dst) == (head, 9) and p.mm.pgd.deposited == {}
    assert p.load(dst, 5).data == b"moved" and p.mm.rss_shmem == HPAGE_PMD_NR
    dst2 = dst + 2 * HPAGE + PAGE  # not 2 MiB-aligned: the PMD cannot move whole
    ok(p.mremap(dst, HPAGE, HPAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst2))
    assert thp_pmd_mapping(p.mm, dst2 & ~(HPAGE - 1)) is None and p.mm.rss_shmem == 0
    assert p.load(dst2, 5).data == b"moved"  # refaults with PTEs: the offset is misaligned
    assert int(k.core.pages.order[head]) == 9


@KERNELS
def test_mincore_and_kvm_view_of_a_pmd_mapped_shmem_thp(kcfg: KernelConfig) -> None:
    """mincore: every page under the PMD is resident, and after MADV_DONTNEED of one page
    (the whole PMD is zapped) the page cache still says resident. KVM's v5.12 test
    (``PageTransCompoundMap``: a file THP mapped by PMDs only) holds under the PMD and
    not once a subpage is PTE-mapped as well."""
    k, p, t, fd = memfd_thp(kcfg)
    ok(p.store(t, b"x"))
    assert p.mincore(t, HPAGE).data == bytes([1]) * HPAGE_PMD_NR
    head = head_of(k, cached_pfn(p, fd, 0)).pfn
    mem = k.core.pages
    assert PageTransCompoundMap(mem[head + 17])
    ok(p.madvise(t + PAGE, PAGE, MADV_DONTNEED))
    assert thp_pmd_mapping(p.mm, t) is None
    assert p.mincore(t, HPAGE).data == bytes([1]) * HPAGE_PMD_NR
    ok(p.mprotect(t, PAGE, 0x1))  # the VMA no longer holds the 2 MiB: PTEs from here on
    assert p.load(t + 17 * PAGE, 1).data == b"\0" and not PageTransCompoundMap(mem[head + 17])
