"""GUP's references: try_grab_page, FOLL_PIN's bias, the RFC's bare get_page, FOLL_TOUCH."""

from __future__ import annotations

import dataclasses

from helpers import PAGE, RW, SHARED, anon, boot, cached, ok, proc, some
from kvmpoison.config import Config
from kvmpoison.kconfig import RFC_BASE, KernelVersion
from kvmpoison.machine import Machine
from kvmpoison.mm.gup import (
    FOLL,
    GUP_PIN_COUNTING_BIAS,
    get_user_pages,
    pin_user_pages,
    put_pages,
    unpin_user_pages,
)
from kvmpoison.mm.page import ClearPageHWPoison, Page, PageDirty, PageHWPoison, page_count
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.ptdump import decode
from kvmpoison.outcome import Kind

GPA = 0x30 * PAGE


def _protected(design: str) -> tuple[Machine, int]:
    m = Machine(Config(design=design))
    assert m.guest.store(GPA, b"private").kind is Kind.OK
    hva = m.vmm.gpa_to_hva(GPA)
    assert decode(m.vmm.proc.mm.pgd.get(hva), m.kernel.kcfg).kind == "hwpoison"
    return m, hva


def test_pin_takes_the_bias_and_unpin_of_the_last_reference_frees() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, 1, fill=7)
    pages: list[Page] = []
    assert pin_user_pages(p.mm, addr, 1, FOLL.WRITE, pages) == 1
    page = pages[0]
    assert page_count(page) == 1 + GUP_PIN_COUNTING_BIAS
    assert p.munmap(addr, PAGE).cell == "ret:0"
    assert page_count(page) == GUP_PIN_COUNTING_BIAS
    free = k.core.buddy.nr_free
    unpin_user_pages(pages)  # put_compound_head: the last reference frees the page
    assert page_count(page) == 0
    assert k.core.buddy.nr_free == free + 1


def test_rfc_v1_pin_of_a_protected_page_is_a_bare_get_page_and_unpin_underflows() -> None:
    m, hva = _protected("rfc-v1")
    mm = m.vmm.proc.mm
    pages: list[Page] = []
    assert pin_user_pages(mm, hva, 1, FOLL(0), pages) == 1  # v1 follows without the flag
    page = pages[0]
    before = page_count(page) - 1
    unpin_user_pages(pages)  # subtracts GUP_PIN_COUNTING_BIAS for a single reference
    assert page_count(page) == before + 1 - GUP_PIN_COUNTING_BIAS < 0


def test_rfc_v2_follows_only_with_the_flag_and_takes_one_reference_even_to_pin() -> None:
    m, hva = _protected("rfc-v2")
    mm = m.vmm.proc.mm
    assert pin_user_pages(mm, hva, 1, FOLL(0), []) == -14
    pfn = some(cached(m.vmm.proc, m.vmm.ram_fd, GPA // PAGE))
    start = page_count(m.kernel.core.pages[pfn])
    pages: list[Page] = []
    assert pin_user_pages(mm, hva, 1, FOLL.ALLOW_POISONED, pages) == 1
    page = pages[0]
    before = page_count(page)
    assert before == start + 1  # get_page, not GUP_PIN_COUNTING_BIAS
    got: list[Page] = []
    assert get_user_pages(mm, hva, 1, FOLL.ALLOW_POISONED | FOLL.WRITE, got) == 1
    assert page_count(page) == before + 1
    assert decode(mm.pgd.get(hva), m.kernel.kcfg).kind == "hwpoison"  # goto out: no fault
    put_pages(got)
    assert page_count(page) == before


def test_rfc_v1_unpoisoned_page_faults_and_do_swap_page_restores_the_pte() -> None:
    m, hva = _protected("rfc-v1")
    mm = m.vmm.proc.mm
    pfn = some(cached(m.vmm.proc, m.vmm.ram_fd, GPA // PAGE))
    page = m.kernel.core.pages[pfn]
    ClearPageHWPoison(page)  # as v1's kvm_share_memory does
    pages: list[Page] = []
    assert get_user_pages(mm, hva, 1, FOLL(0), pages) == 1  # PageHWPoison false: no_page
    assert decode(mm.pgd.get(hva), m.kernel.kcfg).kind == "present"
    assert not PageHWPoison(pages[0])
    put_pages(pages)


def test_v6_18_does_not_pin_the_zero_page_v5_12_does() -> None:
    for kcfg, delta in ((RFC_BASE, GUP_PIN_COUNTING_BIAS),
                        (dataclasses.replace(RFC_BASE, version=KernelVersion.V6_18), 0)):
        k = boot(kcfg)
        p = proc(k)
        addr = anon(p, 1)
        assert p.load(addr, 1).kind is Kind.OK  # maps the shared zero page
        zero = k.core.pages[k.core.zero_pfn]
        before = page_count(zero)
        pages: list[Page] = []
        assert pin_user_pages(p.mm, addr, 1, FOLL(0), pages) == 1
        assert page_count(zero) == before + delta
        unpin_user_pages(pages)
        assert page_count(zero) == before


def test_foll_touch_dirties_the_page_not_the_pte() -> None:
    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.load(addr, 1).kind is Kind.OK  # a clean PTE
    pte = p.mm.pgd.get(addr)
    page = k.core.pages[some(cached(p, fd, 0))]
    k.core.pages.flags[page.pfn] &= ~k.core.pages.mask(PG.dirty) & 0xFFFF_FFFF
    pages: list[Page] = []
    assert get_user_pages(p.mm, addr, 1, FOLL.WRITE, pages) == 1
    assert PageDirty(page)  # set_page_dirty
    assert p.mm.pgd.get(addr) == pte  # mark_page_accessed, not pte_mkyoung/mkdirty
    put_pages(pages)


def test_process_vm_writev_marks_the_remote_page_dirty() -> None:
    k = boot()
    p, q = proc(k, "p"), proc(k, "q")
    fd = ok(q.memfd_create("m"))
    assert q.ftruncate(fd, PAGE).cell == "ret:0"
    remote = ok(q.mmap(0, PAGE, RW, SHARED, fd))
    assert q.load(remote, 1).kind is Kind.OK
    page = k.core.pages[some(cached(q, fd, 0))]
    k.core.pages.flags[page.pfn] &= ~k.core.pages.mask(PG.dirty) & 0xFFFF_FFFF
    local = anon(p, 1, fill=1)
    assert p.process_vm_writev(q, local, remote, 8).cell == "ret:8"
    assert PageDirty(page)  # unpin_user_pages_dirty_lock(..., vm_write)


def test_check_pte_matches_present_ptes_of_the_page_only() -> None:
    from kvmpoison.mm.rmap import page_vma_mapped

    m, hva = _protected("rfc-v1")  # v1's check_pte change sits in the PVMW_MIGRATION branch
    vma = m.vmm.proc.mm.vmas[0]
    pfn = some(cached(m.vmm.proc, m.vmm.ram_fd, GPA // PAGE))
    assert not page_vma_mapped(m.kernel.core.pages[pfn], vma, hva)  # a hwpoison entry
    other = m.vmm.gpa_to_hva(0x10 * PAGE)  # a shared page, present in the VMM
    assert m.vmm.load(0x10 * PAGE, 1).kind is Kind.OK
    shared = some(cached(m.vmm.proc, m.vmm.ram_fd, 0x10))
    assert page_vma_mapped(m.kernel.core.pages[shared], vma, other)
    assert not page_vma_mapped(m.kernel.core.pages[pfn], vma, other)


def test_core_dump_does_not_fault_in_anonymous_holes() -> None:
    from kvmpoison.mm.gup import get_dump_page

    k = boot()
    p = proc(k)
    addr = anon(p, 1)
    assert get_dump_page(p.mm, addr) is None  # no_page_table: -EFAULT under FOLL_DUMP
    assert p.mm.pgd.get(addr) == 0  # nothing was mapped by the dump


def test_access_remote_vm_write_dirties_the_page() -> None:
    from kvmpoison.mm.gup import access_remote_vm

    k = boot()
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, SHARED, fd))
    assert p.store(addr, b"x").kind is Kind.OK  # a dirty PTE: FOLL_TOUCH leaves the page
    page = k.core.pages[some(cached(p, fd, 0))]
    k.core.pages.flags[page.pfn] &= ~k.core.pages.mask(PG.dirty) & 0xFFFF_FFFF
    assert access_remote_vm(p.mm, addr, b"poke", FOLL.FORCE) == 4
    assert PageDirty(page)
