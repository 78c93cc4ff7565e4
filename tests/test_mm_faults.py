"""Faults, fork, COW, TLB, mprotect/mremap/munmap on the model's host mm."""

import numpy as np

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL
from kvmpoison.kconfig import RFC_BASE
from kvmpoison.mm.madvise import MADV_DONTFORK, MADV_DONTNEED, MADV_PAGEOUT
from kvmpoison.mm.mmap import MAP_SHARED, PROT_NONE, PROT_READ
from kvmpoison.mm.mremap import MREMAP_MAYMOVE
from kvmpoison.mm.page import page_count, page_mapcount
from kvmpoison.mm.ptdump import decode


def test_read_fault_maps_the_zero_page_and_write_allocates() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p)
    assert p.load(addr, 8).data == bytes(8)
    free = k.core.buddy.nr_free  # after the page tables were built
    pte = p.mm.pgd.get(addr)
    assert pte & _PAGE_SPECIAL and pte_pfn(pte) == k.core.zero_pfn
    assert p.mm.rss_anon == 0
    ok(p.store(addr, b"x"))
    pte = p.mm.pgd.get(addr)
    assert not pte & _PAGE_SPECIAL and p.mm.rss_anon == 1
    assert k.core.buddy.nr_free == free - 1


def test_fork_is_copy_on_write() -> None:
    k = boot()
    parent = proc(k)
    addr = anon(parent, fill=0xAA)
    pfn = pte_pfn(parent.mm.pgd.get(addr))
    child = parent.fork()
    page = k.core.pages[pfn]
    assert page_mapcount(page) == 2 and page_count(page) == 2
    ok(child.store(addr, b"\xbb"))
    assert parent.load(addr, 1).data == b"\xaa" and child.load(addr, 1).data == b"\xbb"
    assert pte_pfn(child.mm.pgd.get(addr)) != pfn and page_mapcount(page) == 1


def test_fork_shares_memfd_mappings_and_dontfork_drops_them() -> None:
    k = boot()
    parent = proc(k)
    fd = ok(parent.memfd_create("m"))
    ok(parent.ftruncate(fd, 2 * PAGE))
    addr = ok(parent.mmap(0, 2 * PAGE, RW, MAP_SHARED, fd))
    ok(parent.store(addr, b"\x01"))
    ok(parent.madvise(addr + PAGE, PAGE, MADV_DONTFORK))
    child = parent.fork()
    ok(child.store(addr, b"\x02"))
    assert parent.load(addr, 1).data == b"\x02"  # shared
    assert child.load(addr + PAGE, 1).cell == "sig:SIGSEGV:SEGV_MAPERR"


def test_tlb_keeps_a_stale_translation_until_flushed() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, fill=0x5A)
    assert p.load(addr, 1).data == b"\x5a"  # fills this CPU's TLB
    p.mm.pgd.set(addr, 0)  # a PTE change without a flush
    assert p.load(addr, 1).data == b"\x5a"  # the stale entry still translates
    k.core.flush_tlb_range(p.mm, addr, addr + PAGE)
    assert p.load(addr, 1).data == b"\x00"  # refault: a fresh zero page


def test_mprotect_rewrites_ptes_and_back() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, 64, fill=7)
    ok(p.mprotect(addr, 64 * PAGE, PROT_NONE))
    assert all(decode(p.mm.pgd.get(addr + i * PAGE), k.kcfg).kind == "protnone" for i in range(64))
    assert p.load(addr, 1).cell == "sig:SIGSEGV:SEGV_ACCERR"
    q = proc(k)
    addr = anon(q, 4, fill=7)
    ok(q.mprotect(addr, 4 * PAGE, PROT_NONE))
    ok(q.mprotect(addr, 4 * PAGE, RW))
    assert q.load(addr + 3 * PAGE, 1).data == b"\x07"
    ok(q.store(addr, b"\x08"))  # exclusive dirty anon page: writable again at once
    ok(q.mprotect(addr, PAGE, PROT_READ))
    assert q.store(addr, b"\x09").cell == "sig:SIGSEGV:SEGV_ACCERR"


def test_munmap_returns_pages_and_page_tables() -> None:
    k = boot()
    p = proc(k)
    free = k.core.buddy.nr_free
    addr = anon(p, 600, fill=1)
    assert k.core.buddy.nr_free < free - 600
    ok(p.munmap(addr, 600 * PAGE))
    assert p.mm.rss_anon == 0 and p.mm.pgd.nr_ptes == 0
    assert k.core.buddy.nr_free == free - 2  # the PUD and PMD tables stay (leaf tables go)
    assert p.load(addr, 1).cell == "sig:SIGSEGV:SEGV_MAPERR"


def test_mremap_moves_data_and_pages() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, 2, fill=0x3C)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    new = ok(p.mremap(addr, 2 * PAGE, 8 * PAGE, MREMAP_MAYMOVE))
    assert pte_pfn(p.mm.pgd.get(new)) == pfn and p.load(new + PAGE, 1).data == b"\x3c"
    assert p.load(new + 5 * PAGE, 1).data == b"\x00"


def test_dontneed_then_pageout_and_swapin() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, 3, fill=0x42)
    ok(p.madvise(addr, PAGE, MADV_DONTNEED))
    assert p.load(addr, 1).data == b"\x00"
    ok(p.madvise(addr + PAGE, PAGE, MADV_PAGEOUT))
    assert decode(p.mm.pgd.get(addr + PAGE), k.kcfg).kind == "swap"
    assert p.load(addr + PAGE, 2).data == b"\x42\x42"  # swapped back in
    assert pte_present(p.mm.pgd.get(addr + PAGE))


def test_bulk_populate_equals_touching_every_page() -> None:
    k1, k2 = boot(), boot()
    a, b = proc(k1), proc(k2)
    n = 700
    x = ok(a.mmap(0, n * PAGE, RW, ANON | 0x8000))  # MAP_POPULATE: the vectorised path
    y = anon(b, n)
    for i in range(n):
        ok(b.store(y + i * PAGE, b"\0"))
    assert a.mm.rss_anon == b.mm.rss_anon == n
    ptes_a = np.array([a.mm.pgd.get(x + i * PAGE) & 0xFFF for i in range(n)])
    ptes_b = np.array([b.mm.pgd.get(y + i * PAGE) & 0xFFF for i in range(n)])
    assert (ptes_a == ptes_b).all()
    assert k1.core.buddy.nr_free == k2.core.buddy.nr_free


def test_rfc_base_has_no_madv_populate() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p)
    assert p.madvise(addr, PAGE, 23).cell == "err:EINVAL"
