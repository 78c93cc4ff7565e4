"""Gates of mm/memory.py, mm/userfaultfd.py and mm/gup.py, read against 6.1 (6.1.192).

Each behaviour on v5.12, 6.1 and 6.18; the 6.1 expectation is what Debian's
linux-source-6.1 does (file and line per test).
"""

from __future__ import annotations

import pytest

from helpers import PAGE, RW, SHARED, anon, boot, cached, ok, proc, some
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages
from kvmpoison.mm.page import Page, SetPageHWPoison
from kvmpoison.outcome import Kind

V5_12 = KernelConfig(version=KernelVersion.V5_12)
V6_1 = KernelConfig(version=KernelVersion.V6_1)
V6_18 = KernelConfig(version=KernelVersion.V6_18)


def per_version(v5_12: object, v6_1: object, v6_18: object) -> list[tuple[KernelConfig, object]]:
    return [(V5_12, v5_12), (V6_1, v6_1), (V6_18, v6_18)]


@pytest.mark.parametrize(("kcfg", "cell"), per_version("sig:SIGBUS:BUS_MCEERR_AR", "ok", "ok"))
def test_do_fault_evicts_a_clean_poisoned_cache_page(kcfg: KernelConfig, cell: str) -> None:
    """mm/memory.c:__do_fault, 6.1 lines 4284-4293: unmap_mapping_pages, then
    invalidate_inode_page: a clean page leaves the cache, VM_FAULT_NOPAGE, fresh read."""
    k = boot(kcfg)
    p = proc(k)
    k.create_file("/data", b"on disk".ljust(PAGE, b"\0"))
    fd = ok(p.open("/data", O_RDWR))
    buf = ok(p.mmap(0, PAGE, RW, 0x22))
    assert p.pread(fd, buf, 8, 0).cell == "ret:8"
    SetPageHWPoison(k.core.pages[some(cached(p, fd, 0))])
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.load(addr, 7).cell == cell


@pytest.mark.parametrize(("kcfg", "around"), per_version(True, False, False))
def test_no_fault_around_in_a_uffd_wp_vma(kcfg: KernelConfig, around: bool) -> None:
    """include/linux/userfaultfd_k.h:uffd_disable_fault_around, 6.1 line 109:
    VM_UFFD_WP | VM_UFFD_MINOR. (v5.12 refuses WP on shmem: MISSING there.)"""
    k = boot(kcfg)
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    buf = anon(p, 4, fill=7)
    assert p.write(fd, buf, 4 * PAGE).cell == f"ret:{4 * PAGE}"
    addr = ok(p.mmap(0, 4 * PAGE, RW, SHARED, fd))
    mode = 2 if kcfg.version is not KernelVersion.V5_12 else 1
    assert p.uffdio_register(p.userfaultfd(), addr, 4 * PAGE, mode).cell == "ret:0"
    assert p.load(addr, 1).kind is Kind.OK
    assert bool(p.mm.pgd.get(addr + PAGE)) is around


@pytest.mark.parametrize(("kcfg", "cells"), per_version(("err:EINVAL", "err:EINVAL"),
                                                        ("ret:0", "ret:0"), ("ret:0", "ret:0")))
def test_uffd_wp_and_minor_on_shmem(kcfg: KernelConfig, cells: tuple[str, str]) -> None:
    """include/linux/userfaultfd_k.h:vma_can_userfault, 6.1 lines 146-163: MINOR on shmem;
    WP on shmem with CONFIG_PTE_MARKER_UFFD_WP (Debian: y)."""
    k = boot(kcfg)
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, 2 * PAGE))
    shmem = ok(p.mmap(0, 2 * PAGE, RW, SHARED, fd))
    got = (p.uffdio_register(p.userfaultfd(), shmem, PAGE, 2).cell,
           p.uffdio_register(p.userfaultfd(), shmem + PAGE, PAGE, 4).cell)
    assert got == cells


@pytest.mark.parametrize(("kcfg", "copied"), per_version(True, False, False))
def test_fork_copies_only_pinned_anon_pages(kcfg: KernelConfig, copied: bool) -> None:
    """mm/memory.c:copy_present_pte, 6.1 line 966: page_try_dup_anon_rmap decides for anon
    pages only; a pinned page-cache page in a private mapping is shared with the child
    (v5.12: page_maybe_dma_pinned on any page, copy_present_page)."""
    k = boot(kcfg)
    p = proc(k)
    k.create_file("/data", bytes(2 * PAGE))
    fd = ok(p.open("/data", O_RDWR))
    addr = ok(p.mmap(0, 2 * PAGE, RW, 0x02, fd))  # MAP_PRIVATE
    ok(p.store(addr, b"x"))  # a COW copy: the VMA gets an anon_vma, so fork copies it
    assert p.load(addr + PAGE, 1).kind is Kind.OK  # the page-cache page, mapped
    pages: list[Page] = []
    assert pin_user_pages(p.mm, addr + PAGE, 1, FOLL(0), pages) == 1
    child = p.fork()
    assert (pte_pfn(child.mm.pgd.get(addr + PAGE)) != pages[0].pfn) is copied
    unpin_user_pages(pages)


@pytest.mark.parametrize(("kcfg", "pinned"), per_version(True, False, False))
def test_foll_pin_takes_no_pin_on_the_zero_page(kcfg: KernelConfig, pinned: bool) -> None:
    """mm/gup.c:try_grab_folio, 6.1.192 line 136: "Don't take a pin on the zero page"
    (upstream 6.5; in 6.1.y as a stable backport)."""
    k = boot(kcfg)
    p = proc(k)
    addr = anon(p, 1)
    assert p.load(addr, 1).kind is Kind.OK  # maps the shared zero page
    zero = pte_pfn(p.mm.pgd.get(addr))
    before = int(k.core.pages._refcount[zero])
    pages: list[Page] = []
    assert pin_user_pages(p.mm, addr, 1, FOLL(0), pages) == 1
    assert (int(k.core.pages._refcount[zero]) > before) is pinned
    unpin_user_pages(pages)
