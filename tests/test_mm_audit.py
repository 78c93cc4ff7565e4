"""Fixes from the mm audit (issue 9): each test fails on the model before its fix."""

from __future__ import annotations

import pytest

from helpers import PAGE, RW, SHARED, boot, cached, ok, proc, some
from kvmpoison.arch.x86.pgtable_types import _PAGE_ACCESSED, _PAGE_DIRTY
from kvmpoison.mm.page import Page, PageDirty
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Kind


def test_the_page_walker_sets_accessed_and_dirty() -> None:
    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.load(addr, 1).kind is Kind.OK  # read fault: a writable, clean PTE
    page = k.core.pages[some(cached(p, fd, 0))]
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
    from kvmpoison.mm.pagetable import ADDRESS_BITS, AddressWidthError

    span = 1 << ADDRESS_BITS
    k = boot()
    p = proc(k)
    addr = ok(p.mmap(0, PAGE, RW, SHARED | 0x20))
    assert p.store(addr, b"x").kind is Kind.OK
    seen = [int(a) for c in p.mm.pgd.chunks(0, span) for a in c.addr]
    assert seen.count(addr) == 1 and max(seen) < span
    with pytest.raises(AddressWidthError):  # not an alias of addr through PGD index wrap
        p.mm.pgd.get(addr + span)


def test_fork_shares_a_swap_slot_and_both_sides_swap_it_in() -> None:
    from helpers import anon
    from kvmpoison.mm.madvise import MADV_PAGEOUT

    k = boot()
    p = proc(k)
    addr = anon(p, 1, fill=0x5A)
    assert p.madvise(addr, PAGE, MADV_PAGEOUT).cell == "ret:0"
    child = p.fork()  # copy_nonpresent_pte: swap_duplicate
    assert child.load(addr, 4).data == b"\x5a" * 4
    assert p.load(addr, 4).data == b"\x5a" * 4  # the slot outlived the child's swapin
    assert not k.core.swap_space  # the last reference freed it


def test_fork_copies_a_pinned_page_into_the_child() -> None:
    from helpers import anon
    from kvmpoison.arch.x86.pgtable import pte_pfn
    from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages

    k = boot()
    p = proc(k)
    addr = anon(p, 1, fill=0x11)
    pages: list[Page] = []
    assert pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pages) == 1
    pinned = pages[0].pfn
    child = p.fork()
    assert pte_pfn(child.mm.pgd.get(addr)) != pinned  # copy_present_page
    assert child.load(addr, 1).data == b"\x11"
    assert p.store(addr, b"\x22").kind is Kind.OK  # no COW break in the parent
    assert pte_pfn(p.mm.pgd.get(addr)) == pinned
    assert child.load(addr, 1).data == b"\x11"
    unpin_user_pages(pages)


def test_mlock_over_a_hole_locks_up_to_it_and_munlock_makes_pages_evictable() -> None:
    from helpers import anon
    from kvmpoison.mm.mm_types import VM

    k = boot()
    p = proc(k)
    addr = anon(p, 3, fill=1)
    assert p.munmap(addr + 2 * PAGE, PAGE).cell == "ret:0"
    assert p.mlock(addr, 3 * PAGE).cell == "err:ENOMEM"
    assert p.mm.vmas[0].vm_flags & VM.LOCKED  # apply_vma_lock_flags got that far
    assert p.mlock(addr, 2 * PAGE).cell == "ret:0"
    pfn = p.mm.pgd.get(addr) >> 12 & ((1 << 40) - 1)
    mem = k.core.pages
    assert mem.flags[pfn] & mem.mask(PG.unevictable)
    assert p.munlock(addr, 2 * PAGE).cell == "ret:0"
    assert not mem.flags[pfn] & (mem.mask(PG.unevictable) | mem.mask(PG.mlocked))


def test_hwpoison_unmap_of_a_shmem_page_counts_it_as_shmem() -> None:
    from kvmpoison.mm.page import SetPageHWPoison, lock_page, unlock_page
    from kvmpoison.mm.rmap import TTU, try_to_unmap

    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.store(addr, b"x").kind is Kind.OK
    assert (p.mm.rss_shmem, p.mm.rss_file) == (1, 0)
    page = k.core.pages[some(cached(p, fd, 0))]
    lock_page(page)
    SetPageHWPoison(page)
    assert try_to_unmap(page, TTU.IGNORE_MLOCK)
    unlock_page(page)
    assert (p.mm.rss_shmem, p.mm.rss_file) == (0, 0)  # mm_counter_file: MM_SHMEMPAGES


def test_a_store_to_a_shared_file_mapping_reaches_the_disk_at_fsync() -> None:
    from kvmpoison.mm.file import O_RDWR

    k = boot()
    p = proc(k)
    inode = k.create_file("/data", bytes(PAGE))
    fd = ok(p.open("/data", O_RDWR))
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.load(addr, 1).kind is Kind.OK  # read fault: write-notify maps it read-only
    assert p.store(addr, b"hello").kind is Kind.OK  # do_wp_page: wp_page_shared dirties it
    assert p.fsync(fd).cell == "ret:0"
    assert inode.disk[0][:5] == b"hello"


def test_v6_18_refaults_a_clean_poisoned_page_cache_page_from_disk() -> None:
    import dataclasses

    from kvmpoison.kconfig import RFC_BASE, KernelVersion
    from kvmpoison.mm.file import O_RDWR
    from kvmpoison.mm.page import SetPageHWPoison

    for version, cell in ((KernelVersion.V5_12, "sig:SIGBUS:BUS_MCEERR_AR"),
                          (KernelVersion.V6_18, "ok")):
        k = boot(dataclasses.replace(RFC_BASE, version=version))
        p = proc(k)
        k.create_file("/data", b"on disk".ljust(PAGE, b"\0"))
        fd = ok(p.open("/data", O_RDWR))
        buf = ok(p.mmap(0, PAGE, RW, 0x22))  # MAP_PRIVATE | MAP_ANONYMOUS
        assert p.pread(fd, buf, 8, 0).cell == "ret:8"  # the page is now cached, clean
        pfn = some(cached(p, fd, 0))
        SetPageHWPoison(k.core.pages[pfn])
        addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
        out = p.load(addr, 7)
        assert out.cell == cell
        if version is KernelVersion.V6_18:
            assert out.data == b"on disk"  # mapping_evict_folio, then a fresh read
            assert cached(p, fd, 0) != pfn


def test_uffdio_register_refuses_what_vma_can_userfault_refuses() -> None:
    import dataclasses

    from helpers import anon
    from kvmpoison.kconfig import RFC_BASE, KernelVersion
    from kvmpoison.mm.file import O_RDWR

    MISSING, WP, MINOR = 1, 2, 4
    for version in (KernelVersion.V5_12, KernelVersion.V6_18):
        k = boot(dataclasses.replace(RFC_BASE, version=version))
        p = proc(k)
        k.create_file("/data", bytes(PAGE))
        file_map = ok(p.mmap(0, PAGE, RW, SHARED, ok(p.open("/data", O_RDWR))))
        fd = ok(p.memfd_create("m"))
        assert p.ftruncate(fd, PAGE).cell == "ret:0"
        shmem = ok(p.mmap(0, PAGE, RW, SHARED, fd))
        a = anon(p, 1)
        ctx, other = p.userfaultfd(), p.userfaultfd()
        assert p.uffdio_register(ctx, file_map, PAGE, MISSING).cell == "err:EINVAL"
        modern = version is KernelVersion.V6_18
        assert p.uffdio_register(ctx, shmem, PAGE, WP).cell == ("ret:0" if modern else "err:EINVAL")
        assert p.uffdio_register(ctx, a, PAGE, MINOR).cell == "err:EINVAL"
        assert p.uffdio_register(ctx, a, PAGE, MISSING).cell == "ret:0"
        assert p.uffdio_register(other, a, PAGE, MISSING).cell == "err:EBUSY"


def test_uffdio_poison_needs_one_vma_for_the_whole_range() -> None:
    import dataclasses

    from helpers import anon
    from kvmpoison.kconfig import RFC_BASE, KernelVersion

    k = boot(dataclasses.replace(RFC_BASE, version=KernelVersion.V6_18))
    p = proc(k)
    a = anon(p, 2)
    assert p.mprotect(a + PAGE, PAGE, 1).cell == "ret:0"  # two VMAs
    ctx = p.userfaultfd()
    assert p.uffdio_register(ctx, a, 2 * PAGE, 1).cell == "ret:0"
    assert p.uffdio_poison(ctx, a, 2 * PAGE).cell == "err:ENOENT"
    assert p.mm.pgd.get(a) == 0  # nothing poisoned


def test_fork_counts_shmem_pages_of_a_private_mapping_as_shmem() -> None:
    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, 2 * PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, 2 * PAGE, RW, 0x02, fd))  # MAP_PRIVATE of a shmem file
    assert p.load(addr, 1).kind is Kind.OK  # the shmem page, read-only
    assert p.store(addr + PAGE, b"x").kind is Kind.OK  # a COW copy: the VMA gets an anon_vma
    child = p.fork()
    assert (child.mm.rss_anon, child.mm.rss_shmem, child.mm.rss_file) == (1, 1, 0)


def test_a_read_fault_maps_the_cached_neighbours_fault_around() -> None:
    from helpers import anon

    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    buf = anon(p, 4, fill=7)
    assert p.write(fd, buf, 4 * PAGE).cell == f"ret:{4 * PAGE}"  # four cached pages
    addr = ok(p.mmap(0, 8 * PAGE, RW, SHARED, fd))
    page2 = k.core.pages[some(cached(p, fd, 2))]
    before = int(k.core.pages._refcount[page2.pfn])
    assert p.load(addr, 1).kind is Kind.OK
    assert all(p.mm.pgd.get(addr + i * PAGE) for i in range(4))  # filemap_map_pages
    assert p.mm.pgd.get(addr + 4 * PAGE) == 0  # beyond EOF: not mapped
    assert p.mm.rss_shmem == 4
    assert int(k.core.pages._refcount[page2.pfn]) == before + 1


def test_fault_around_is_off_only_for_v6_18_uffd_wp() -> None:
    import dataclasses

    from helpers import anon
    from kvmpoison.kconfig import RFC_BASE, KernelVersion

    for version, mode, around in ((KernelVersion.V6_18, 2, False),  # MODE_WP
                                  (KernelVersion.V5_12, 1, True)):  # MODE_MISSING
        k = boot(dataclasses.replace(RFC_BASE, version=version))
        p = proc(k)
        fd = ok(p.memfd_create("m"))
        buf = anon(p, 4, fill=7)
        assert p.write(fd, buf, 4 * PAGE).cell == f"ret:{4 * PAGE}"
        addr = ok(p.mmap(0, 4 * PAGE, RW, SHARED, fd))
        assert p.uffdio_register(p.userfaultfd(), addr, 4 * PAGE, mode).cell == "ret:0"
        assert p.load(addr, 1).kind is Kind.OK
        assert bool(p.mm.pgd.get(addr + PAGE)) is around  # uffd_disable_fault_around


def test_fork_gives_the_child_old_ptes() -> None:
    from helpers import anon

    k = boot()
    p = proc(k)
    addr = anon(p, 1, fill=3)
    assert p.mm.pgd.get(addr) & _PAGE_ACCESSED
    child = p.fork()
    pte = child.mm.pgd.get(addr)
    assert pte and not pte & _PAGE_ACCESSED  # pte_mkold
    assert pte & _PAGE_DIRTY  # a private mapping keeps Dirty
    assert child.load(addr, 1).data == b"\x03"
    assert child.mm.pgd.get(addr) & _PAGE_ACCESSED  # the walk sets it again


def test_cow_fault_allocates_its_copy_before_reading_the_file() -> None:
    from kvmpoison.mm.file import O_RDWR

    k = boot()
    p = proc(k)
    k.create_file("/data", b"file".ljust(PAGE, b"\0"))
    fd = ok(p.open("/data", O_RDWR))
    addr = ok(p.mmap(0, PAGE, RW, 0x02, fd))  # MAP_PRIVATE
    assert p.mm.pgd.get(addr) == 0
    p.mm.pgd.set(addr, 0)  # build the page table while memory is left
    held = k.core.buddy.alloc_pages_bulk(k.core.buddy.nr_free - 1)  # one page left
    out = p.store(addr, b"x")
    assert out.cell == "sig:SIGKILL:0"  # VM_FAULT_OOM
    assert cached(p, fd, 0) is None  # the copy took it: ->fault failed
    assert k.core.buddy.nr_free == 1  # and the copy went back
    assert len(held)
