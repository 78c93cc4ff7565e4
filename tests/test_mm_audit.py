"""Fixes from the mm audit (issue 9): each test fails on the model before its fix."""

from __future__ import annotations

from helpers import PAGE, RW, SHARED, boot, ok, proc
from kvmpoison.arch.x86.pgtable_types import _PAGE_ACCESSED, _PAGE_DIRTY
from kvmpoison.mm.page import PageDirty
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Kind


def test_the_page_walker_sets_accessed_and_dirty() -> None:
    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.load(addr, 1).kind is Kind.OK  # read fault: a writable, clean PTE
    page = k.core.pages[p.task.fds[fd].f_mapping.lookup(0)]
    k.core.pages.flags[page.pfn] &= ~k.core.pages.mask(PG.dirty) & 0xFFFF_FFFF
    pte = p.mm.pgd.get(addr)
    p.mm.pgd.set(addr, pte & ~(_PAGE_ACCESSED | _PAGE_DIRTY))
    k.core.flush_tlb_range(p.mm, addr, addr + PAGE)
    assert p.load(addr, 1).kind is Kind.OK
    assert p.mm.pgd.get(addr) & (_PAGE_ACCESSED | _PAGE_DIRTY) == _PAGE_ACCESSED
    assert p.store(addr, b"x").kind is Kind.OK  # no fault, but the walker sets Dirty
    assert p.mm.pgd.get(addr) & _PAGE_DIRTY
    assert p.munmap(addr, PAGE).cell == "ret:0"
    assert PageDirty(page)  # zap_pte_range moves the PTE's Dirty to the page


def test_a_walk_beyond_4_level_paging_does_not_wrap_onto_the_low_tables() -> None:
    from kvmpoison.mm.pagetable import TABLE_SPAN

    k = boot()
    p = proc(k)
    addr = ok(p.mmap(0, PAGE, RW, SHARED | 0x20))
    assert p.store(addr, b"x").kind is Kind.OK
    seen = [int(a) for c in p.mm.pgd.chunks(0, 16 * TABLE_SPAN) for a in c.addr]
    assert seen.count(addr) == 1 and max(seen) < TABLE_SPAN
    assert p.mm.pgd.get(addr + TABLE_SPAN) == 0  # not an alias of addr
