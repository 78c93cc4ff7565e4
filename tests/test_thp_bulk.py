"""The vectorised THP range paths (``change_huge_pmd_range``, ``zap_huge_pmd_range``, the
bulk compound free) leave exactly the machine state that the kernel's PMD-by-PMD steps
(``change_huge_pmd``, ``zap_huge_pmd``, ``__split_huge_pmd`` at the ends) leave, on a
range that mixes exclusive, pinned, shared, PTE-mapped-elsewhere and split THPs with
the huge zero page; on v5.12, 6.1 and 6.18 (the 6.2+ write upgrade)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm import memory, mprotect
from kvmpoison.mm.gup import FOLL, pin_user_pages
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_SIZE,
    __split_huge_pmd,
    change_huge_pmd,
    pmd_trans_huge,
    thp_pmd_mapping,
    zap_huge_pmd,
)
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.mm_types import Vma
from kvmpoison.mm.mmap import MAP_FIXED, PROT_READ
from kvmpoison.mm.page import Page

HPAGE = HPAGE_PMD_SIZE
N = 10
KCFGS = [RFC_BASE, KernelConfig(version=KernelVersion.V6_1),
         KernelConfig(version=KernelVersion.V6_18)]


def change_huge_pmd_range_per_pmd(vma: Vma, start: int, end: int, newprot: int) -> int:
    """The kernel's change_pmd_range loop, one PMD at a time."""
    changed = 0
    for haddr, pmd in vma.vm_mm.pgd.pmd_leaves(start, end):
        if not pmd_trans_huge(pmd):
            continue
        if start <= haddr and haddr + HPAGE <= end:
            changed += change_huge_pmd(vma, haddr, newprot)
        else:
            __split_huge_pmd(vma, haddr)
    return changed


def zap_huge_pmd_range_per_pmd(vma: Vma, start: int, end: int) -> int:
    """The kernel's zap_pmd_range loop, one PMD at a time."""
    unmapped = 0
    for haddr, pmd in vma.vm_mm.pgd.pmd_leaves(start, end):
        if not pmd_trans_huge(pmd):
            continue
        if start <= haddr and haddr + HPAGE <= end:
            unmapped += zap_huge_pmd(vma, haddr)
        else:
            __split_huge_pmd(vma, haddr)
    return unmapped


@contextmanager
def per_pmd_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(mprotect, "change_huge_pmd_range", change_huge_pmd_range_per_pmd)
        m.setattr(memory, "zap_huge_pmd_range", zap_huge_pmd_range_per_pmd)
        yield


GIB = 1 << 30
STRADDLE = 4 * GIB - 5 * HPAGE  # PMDs 0-4 in one PMD table, 5-9 in the next


def mixed(kcfg: KernelConfig, at: int | None = None
          ) -> tuple[Kernel, Process, Process, int, list[Page]]:
    """N aligned 2 MiB of one MADV_HUGEPAGE VMA: 0 huge (partly covered later), 1 the huge
    zero page, 2 pinned, 3 shared with a child that split its own PMD (the parent's
    THP is PTE-mapped elsewhere), 4 shared with the child by PMD, 5 split in this mm
    (one page zapped), 6 none, 7-9 exclusive THPs (9 partly covered later); at a fixed
    2 MiB-aligned address ``at`` if given."""
    k = boot(kcfg, mem=96 << 20)
    p = proc(k)
    if at is None:
        addr = ok(p.mmap(0, (N + 1) * HPAGE, RW, ANON))
        addr = (addr + HPAGE - 1) & ~(HPAGE - 1)
    else:
        addr = ok(p.mmap(at, N * HPAGE, RW, ANON | MAP_FIXED))
    ok(p.madvise(addr, N * HPAGE, MADV_HUGEPAGE))
    for i in (3, 4):
        ok(p.store(addr + i * HPAGE, bytes([i]) * 64))
    child = p.fork()
    ok(child.store(addr + 3 * HPAGE + 7 * PAGE, b"c"))  # the child splits its PMD
    for i in (0, 2, 5, 7, 8, 9):
        ok(p.store(addr + i * HPAGE, bytes([i]) * 64))
    assert p.load(addr + HPAGE, 8).data == bytes(8)  # the huge zero page
    pins: list[Page] = []
    assert pin_user_pages(p.mm, addr + 2 * HPAGE, 1, FOLL.WRITE, pins) == 1
    ok(p.madvise(addr + 5 * HPAGE + 3 * PAGE, PAGE, MADV_DONTNEED))  # splits PMD 5
    for i in (0, 2, 3, 4, 7, 8, 9):
        assert thp_pmd_mapping(p.mm, addr + i * HPAGE) is not None, i
    assert thp_pmd_mapping(p.mm, addr + 5 * HPAGE) is None
    return k, p, child, addr, pins


def state(k: Kernel, procs: tuple[Process, ...]) -> dict[str, object]:
    """Everything the THP paths may touch: the page arrays, each mm's PMD leaves, PTEs,
    counters and deposited tables, the deferred split queue and the free page count."""
    mem = k.core.pages
    out: dict[str, object] = {
        name: getattr(mem, name).copy()
        for name in ("flags", "_refcount", "_mapcount", "order", "mapping", "index")}
    out["compound_mapcount"] = dict(mem.compound_mapcount)
    out["compound_pincount"] = dict(mem.compound_pincount)
    out["deferred"] = sorted(k.core.deferred_split_queue)
    out["nr_free"] = k.core.buddy.nr_free
    for n, p in enumerate(procs):
        pgd = p.mm.pgd
        lo, hi = p.mm.vmas[0].vm_start, p.mm.vmas[-1].vm_end
        out[f"{n}.leaves"] = pgd.pmd_leaves(lo, hi)
        out[f"{n}.ptes"] = [(a, pgd.get(a)) for a in range(lo, hi, PAGE) if pgd.get(a)]
        out[f"{n}.counts"] = (pgd.nr_ptes, pgd.nr_pmd_leaves, p.mm.rss_anon, len(pgd.deposited))
        out[f"{n}.vmas"] = [(v.vm_start, v.vm_end, int(v.vm_flags)) for v in p.mm.vmas]
    return out


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            diff = np.flatnonzero(x != y)
            assert not len(diff), f"{key} differs at pfns {diff[:8].tolist()}"
        else:
            assert x == y, key


def run_both(kcfg: KernelConfig, monkeypatch: pytest.MonkeyPatch,
             steps: Callable[[Process, int], None], at: int | None) -> dict[str, object]:
    k1, p1, c1, a1, _ = mixed(kcfg, at)
    steps(p1, a1)
    bulk = state(k1, (p1, c1))
    k2, p2, c2, a2, _ = mixed(kcfg, at)
    assert a1 == a2
    with per_pmd_paths(monkeypatch):
        steps(p2, a2)
    assert_same(bulk, state(k2, (p2, c2)))
    return bulk


# every version across two PMD tables; one table and other range ends on 6.18
CASES = [(c, STRADDLE, 5 * PAGE, N * HPAGE - 9 * PAGE) for c in KCFGS] + [
    (KCFGS[2], None, 5 * PAGE, N * HPAGE - 9 * PAGE),  # PMDs 0 and 9 covered in part
    (KCFGS[2], STRADDLE, 0, N * HPAGE),  # every PMD whole
    (KCFGS[2], STRADDLE, 4 * HPAGE + PAGE, 6 * HPAGE - PAGE),  # both ends, across tables
    (KCFGS[2], None, 2 * HPAGE + PAGE, 2 * HPAGE + 9 * PAGE),  # inside one pinned THP
]


@pytest.mark.parametrize(("kcfg", "at", "start", "end"), CASES,
                         ids=lambda v: str(getattr(v, "version", v)))
def test_mprotect_bulk_path_matches_the_per_pmd_path(
        kcfg: KernelConfig, at: int | None, start: int, end: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def steps(p: Process, addr: int) -> None:
        ok(p.mprotect(addr + start, end - start, PROT_READ))
        ok(p.mprotect(addr + start, end - start, RW))  # the 6.2+ write upgrade

    run_both(kcfg, monkeypatch, steps, at)


def test_the_bulk_write_upgrade_takes_exclusive_thps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """6.18: after RO -> RW, the pinned and the exclusive THPs are writable at once; the
    shared ones (by PMD, or PTE-mapped in the child) and the huge zero page are not."""
    _k, p, _, addr, _ = mixed(KernelConfig(version=KernelVersion.V6_18))
    ok(p.mprotect(addr + HPAGE, (N - 2) * HPAGE, PROT_READ))
    ok(p.mprotect(addr + HPAGE, (N - 2) * HPAGE, RW))
    writable = {i for i in (1, 2, 3, 4, 7, 8)
                if p.mm.pgd.pmd_leaf(addr + i * HPAGE) & _PAGE_RW}
    assert writable == {2, 7, 8}


@pytest.mark.parametrize(("kcfg", "at"), [(c, STRADDLE) for c in KCFGS] + [(KCFGS[2], None)],
                         ids=lambda v: str(getattr(v, "version", v)))
def test_munmap_and_dontneed_bulk_paths_match_the_per_pmd_path(
        kcfg: KernelConfig, at: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    def steps(p: Process, addr: int) -> None:
        ok(p.madvise(addr + 3 * PAGE, 2 * HPAGE, MADV_DONTNEED))  # PMDs 0 and 2 in part
        ok(p.munmap(addr + 3 * HPAGE, N * HPAGE - 3 * HPAGE - 11 * PAGE))  # 9 in part

    after = run_both(kcfg, monkeypatch, steps, at)
    assert after["deferred"]  # the parent's THP 3 stays PTE-mapped in the child


@pytest.mark.parametrize("table_flags", [None, 0x800])
def test_pmd_leaves_are_told_from_tables_by_their_entries(table_flags: int | None) -> None:
    """``_leaf_mask`` (by PSE/PRESENT, or slot by slot for other pointer flags) names
    exactly the slots that hold no PTE table: huge, zero-page and empty ones apart."""
    _k, p, _, addr, _ = mixed(KernelConfig(version=KernelVersion.V6_18))
    pgd = p.mm.pgd
    if table_flags is not None:
        pgd.table_flags = table_flags  # the general path; the pointers' own bits are unchanged
    pmd = pgd._pmd_table(addr, False)
    assert pmd is not None
    first = (addr >> 21) & 511
    last = min(first + N - 1, 511)
    want = [bool(pmd.entries[i]) and pmd.children[i] is None for i in range(first, last + 1)]
    got = pgd._leaf_mask(pmd, first, last).tolist()
    assert got == want and any(got) and not all(got)


def test_pmd_modify_array_matches_pmd_modify_on_every_branch() -> None:
    """Present, PROT_NONE (stored inverted) and empty entries, to a present newprot, to
    PROT_NONE, and to an empty newprot (where each entry decides alone)."""
    from kvmpoison.arch.x86.pgtable import pfn_pmd, pmd_modify, pmd_modify_array
    from kvmpoison.arch.x86.pgtable_types import _PAGE_PSE, PAGE_NONE
    from kvmpoison.mm.mm_types import VM, vm_get_page_prot
    olds = [0] + [pfn_pmd(0x200 * i, p | _PAGE_PSE) for i, p in enumerate(
        (vm_get_page_prot(VM.READ), PAGE_NONE, vm_get_page_prot(VM.READ | VM.WRITE | VM.SHARED)),
        start=1)]
    for prot in (0, PAGE_NONE, vm_get_page_prot(VM.READ), _PAGE_PSE):
        arr = pmd_modify_array(np.array(olds, dtype=np.uint64), prot)
        assert [int(v) for v in arr] == [pmd_modify(o, prot) for o in olds], hex(prot)
