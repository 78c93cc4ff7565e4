"""Random sequences over a memfd backed by shmem THP keep data, RSS, reference counts and
the page allocator consistent (v5.12, 6.1, 6.18): every load returns the last store,
MM_SHMEMPAGES equals what the page tables map, each cached THP holds exactly its 512
cache references plus one per mapping and pin, and after exit and truncate to 0 every
page is free again."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ANON, PAGE, RW, SHARED, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn_array, pte_present_array
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import AddressSpace
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages
from kvmpoison.mm.huge_memory import HPAGE_PMD_NR, ThpSettings
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.mmap import MAP_FIXED, PROT_READ
from kvmpoison.mm.page import Page, page_count, total_mapcount

HPAGE = 2 << 20
SIZE = 3 * HPAGE
PAGES = SIZE // PAGE
KERNELS = (RFC_BASE, KernelConfig(version=KernelVersion.V6_1),
           KernelConfig(version=KernelVersion.V6_18))


def mapped_shmem(mm: MmStruct) -> int:
    """Shmem pages the page tables of ``mm`` map: present PTEs plus 512 per PMD leaf."""
    core = mm.core
    mem = core.pages
    total = 0
    for vma in mm.vmas:
        if vma.vm_file is None:
            continue
        for chunk in mm.pgd.chunks(vma.vm_start, vma.vm_end):
            ptes = core.ptes.rows[chunk.rows, chunk.cols]
            pfns = pte_pfn_array(ptes[pte_present_array(ptes)])
            total += int(((mem.mapping[pfns] & 1) == 0).sum())
        total += HPAGE_PMD_NR * len(mm.pgd.pmd_leaves(vma.vm_start, vma.vm_end))
    return total


def check_thp_refs(p: Process, mapping: AddressSpace, pins: list[Page]) -> None:
    mem = p.mm.core.pages
    pfns = mapping.pages[mapping.pages >= 0]
    heads = np.unique(pfns[mem.order[pfns] != 0] & ~(HPAGE_PMD_NR - 1))
    for head in heads.tolist():
        pinned = sum(1 for pg in pins if pg.pfn & ~(HPAGE_PMD_NR - 1) == head
                     and mem.order[pg.pfn])
        page = mem[head]
        assert page_count(page) == HPAGE_PMD_NR + total_mapcount(page) + pinned, head


_OPS = st.one_of(
    st.tuples(st.just("store"), st.integers(0, PAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("pwrite"), st.integers(0, PAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("load"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("dontneed"), st.integers(0, PAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("mprotect"), st.integers(0, PAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("punch"), st.integers(0, SIZE - 1), st.integers(1, 3 * PAGE)),
    st.tuples(st.just("punch_big"), st.integers(0, PAGES - 1), st.integers(1, 1100)),
    st.tuples(st.just("truncate"), st.integers(0, SIZE - 1), st.just(0)),
    st.tuples(st.just("pin"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("unpin"), st.just(0), st.just(0)),
    st.tuples(st.just("fork"), st.integers(0, PAGES - 1), st.integers(1, 255)),
)


@settings(max_examples=40, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, min_size=1, max_size=10), kernel=st.integers(0, 2),
       mode=st.sampled_from(["advise", "always", "within_size"]))
def test_random_shmem_thp_operations_stay_consistent(ops: list[tuple[str, int, int]],
                                                     kernel: int, mode: str) -> None:
    k = boot(KERNELS[kernel])
    k.core.thp = ThpSettings(shmem_enabled=mode)
    free_before = k.core.buddy.nr_free
    p = proc(k)
    base = ok(p.mmap(0, SIZE + 2 * HPAGE, RW, ANON))
    addr = (base + HPAGE - 1) & ~(HPAGE - 1)
    fd = ok(p.memfd_create("fuzz"))
    ok(p.ftruncate(fd, SIZE))
    ok(p.mmap(addr, SIZE, RW, SHARED | MAP_FIXED, fd))
    ok(p.madvise(addr, SIZE, MADV_HUGEPAGE))
    buf = ok(p.mmap(0, PAGE, RW, ANON))
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None
    shadow = bytearray(SIZE)
    touched: list[int] = []
    pins: list[Page] = []
    children: list[Process] = []
    for op, a, b in ops:
        if op == "store":
            ok(p.store(addr + a * PAGE, bytes([b])))
            shadow[a * PAGE] = b
            touched.append(a)
        elif op == "pwrite":
            ok(p.store(buf, bytes([b])))
            assert ok(p.pwrite(fd, buf, 1, a * PAGE)) == 1
            shadow[a * PAGE] = b
            touched.append(a)
        elif op == "load":
            assert p.load(addr + a * PAGE, 1).data == bytes([shadow[a * PAGE]])
        elif op == "dontneed":
            ok(p.madvise(addr + a * PAGE, min(b, PAGES - a) * PAGE, MADV_DONTNEED))
        elif op == "mprotect":
            n = min(b, PAGES - a)
            ok(p.mprotect(addr + a * PAGE, n * PAGE, PROT_READ))
            ok(p.mprotect(addr + a * PAGE, n * PAGE, RW))
        elif op in ("punch", "punch_big"):
            off, n = (a, b) if op == "punch" else (a * PAGE, b * PAGE)
            n = min(n, SIZE - off)
            ok(p.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, n))
            shadow[off : off + n] = bytes(n)
        elif op == "truncate":
            ok(p.ftruncate(fd, a))
            ok(p.ftruncate(fd, SIZE))
            shadow[a:] = bytes(SIZE - a)
        elif op == "pin":
            assert pin_user_pages(p.mm, addr + a * PAGE, 1, FOLL.WRITE | FOLL.LONGTERM,
                                  pins) == 1
        elif op == "unpin" and pins:
            unpin_user_pages([pins.pop()])
        elif op == "fork":
            child = p.fork()
            ok(child.store(addr + a * PAGE, bytes([b])))  # shared: the parent sees it
            shadow[a * PAGE] = b
            touched.append(a)
            children.append(child)
        assert p.mm.rss_shmem == mapped_shmem(p.mm)
        for child in children:
            assert child.mm.rss_shmem == mapped_shmem(child.mm)
        check_thp_refs(p, mapping, pins)
        for page in touched[-6:]:
            assert p.load(addr + page * PAGE, 1).data == bytes([shadow[page * PAGE]]), page
    unpin_user_pages(pins)
    for child in children:
        child.exit()
    ok(p.ftruncate(fd, 0))
    p.exit()
    assert k.core.buddy.nr_free == free_before
