"""Random sequences of THP-relevant operations keep data, RSS and the page allocator
consistent (v5.12 and 6.18): every load returns the last store, every mm's MM_ANONPAGES
equals what its page tables map, and after exit every page is free again."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.kernel.process import Process
from kvmpoison.mm.huge_memory import HPAGE_PMD_NR, deferred_split_scan, is_huge_zero_pmd
from kvmpoison.mm.khugepaged import khugepaged_scan
from kvmpoison.mm.madvise import MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.mmap import PROT_READ
from kvmpoison.mm.mremap import MREMAP_FIXED, MREMAP_MAYMOVE

HPAGE = 2 << 20
SIZE = 3 * HPAGE
PAGES = SIZE // PAGE
V6_18 = KernelConfig(version=KernelVersion.V6_18)


def mapped_anon(mm: MmStruct) -> int:
    """Anon pages the page tables of ``mm`` map: PTE-mapped ones plus 512 per huge PMD."""
    core = mm.core
    mem = core.pages
    total = 0
    for vma in mm.vmas:
        for chunk in mm.pgd.chunks(vma.vm_start, vma.vm_end):
            ptes = core.ptes.rows[chunk.rows, chunk.cols]
            normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
            total += int(((mem.mapping[pte_pfn_array(ptes[normal])] & 1) != 0).sum())
        for _, pmd in mm.pgd.pmd_leaves(vma.vm_start, vma.vm_end):
            if not is_huge_zero_pmd(core, pmd):
                total += HPAGE_PMD_NR
    return total


_OPS = st.one_of(
    st.tuples(st.just("store"), st.integers(0, PAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("load"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("dontneed"), st.integers(0, PAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("mprotect"), st.integers(0, PAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("mremap"), st.just(0), st.just(0)),
    st.tuples(st.just("fork"), st.integers(0, PAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("khugepaged"), st.just(0), st.just(0)),
    st.tuples(st.just("collapse"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("deferred_split"), st.just(0), st.just(0)),
)


def check(p: Process, shadow: bytearray, addr: int, pages: list[int]) -> None:
    assert p.mm.rss_anon == mapped_anon(p.mm)
    for page in pages:
        want = shadow[page * PAGE]
        assert p.load(addr + page * PAGE, 1).data == bytes([want]), page


@settings(max_examples=50, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, min_size=1, max_size=12), modern=st.booleans())
def test_random_thp_operations_keep_data_rss_and_the_allocator_consistent(
        ops: list[tuple[str, int, int]], modern: bool) -> None:
    k = boot(V6_18 if modern else RFC_BASE)
    free_before = k.core.buddy.nr_free
    p = proc(k)
    base = ok(p.mmap(0, SIZE + HPAGE, RW, ANON))
    addr = (base + HPAGE - 1) & ~(HPAGE - 1)
    if addr > base:
        ok(p.munmap(base, addr - base))
    if addr + SIZE < base + SIZE + HPAGE:
        ok(p.munmap(addr + SIZE, base + SIZE + HPAGE - addr - SIZE))
    ok(p.madvise(addr, SIZE, MADV_HUGEPAGE))
    shadow = bytearray(SIZE)
    touched: list[int] = []
    children: list[Process] = []
    spare = 0
    for op, a, b in ops:
        if op == "store":
            ok(p.store(addr + a * PAGE, bytes([b])))
            shadow[a * PAGE] = b
            touched.append(a)
        elif op == "load":
            assert p.load(addr + a * PAGE, 1).data == bytes([shadow[a * PAGE]])
        elif op == "dontneed":
            n = min(b, PAGES - a)
            ok(p.madvise(addr + a * PAGE, n * PAGE, MADV_DONTNEED))
            shadow[a * PAGE : (a + n) * PAGE] = bytes(n * PAGE)
        elif op == "mprotect":
            n = min(b, PAGES - a)
            ok(p.mprotect(addr + a * PAGE, n * PAGE, PROT_READ))
            ok(p.mprotect(addr + a * PAGE, n * PAGE, RW))
        elif op == "mremap":
            if not spare:
                spare = ok(p.mmap(0, SIZE + HPAGE, RW, ANON))
            dst = (spare + HPAGE - 1) & ~(HPAGE - 1)
            if sum(v.vm_start < addr + SIZE and v.vm_end > addr for v in p.mm.vmas) > 1:
                continue  # mprotect left several VMAs (the model does not merge them back)
            ok(p.mremap(addr, SIZE, SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, dst))
            spare, addr = addr, dst  # the old range is free address space now
            spare = ok(p.mmap(0, SIZE + HPAGE, RW, ANON))
        elif op == "fork":
            child = p.fork()
            ok(child.store(addr + a * PAGE, bytes([b])))
            assert p.load(addr + a * PAGE, 1).data == bytes([shadow[a * PAGE]])
            children.append(child)
        elif op == "khugepaged":
            khugepaged_scan(k.core)
        elif op == "collapse" and modern:
            p.madvise(addr + a * HPAGE, HPAGE, MADV_COLLAPSE)
        elif op == "deferred_split":
            deferred_split_scan(k.core)
        check(p, shadow, addr, touched[-8:])
        for child in children:
            assert child.mm.rss_anon == mapped_anon(child.mm)
    for child in children:
        child.exit()
    p.exit()
    zero = HPAGE_PMD_NR if k.core.huge_zero_pfn >= 0 else 0
    assert k.core.buddy.nr_free == free_before - zero
