"""KSM: merging equal pages, breaking them on write, and the rmap through stable nodes."""

from __future__ import annotations

from helpers import PAGE, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW
from kvmpoison.kconfig import RFC_BASE
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.gup import FOLL, pin_user_pages
from kvmpoison.mm.ksm import ksm_do_scan
from kvmpoison.mm.madvise import MADV_MERGEABLE, MADV_UNMERGEABLE
from kvmpoison.mm.page import (
    PageKsm,
    TestSetPageHWPoison,
    lock_page,
    page_count,
    page_mapcount,
    unlock_page,
)
from kvmpoison.mm.ptdump import decode
from kvmpoison.mm.rmap import TTU, try_to_unmap


def two_mergeable(fill_a: int, fill_b: int) -> tuple[Kernel, Process, Process, int, int]:
    k = boot(RFC_BASE)
    a, b = proc(k, "a"), proc(k, "b")
    addr_a, addr_b = anon(a, 1, fill=fill_a), anon(b, 1, fill=fill_b)
    assert a.madvise(addr_a, PAGE, MADV_MERGEABLE).cell == "ret:0"
    assert b.madvise(addr_b, PAGE, MADV_MERGEABLE).cell == "ret:0"
    return k, a, b, addr_a, addr_b


def test_equal_pages_merge_into_one_write_protected_ksm_page() -> None:
    k, a, b, addr_a, addr_b = two_mergeable(7, 7)
    free_before = k.core.buddy.nr_free
    assert ksm_do_scan(k.core) == 1
    pte_a, pte_b = a.mm.pgd.get(addr_a), b.mm.pgd.get(addr_b)
    assert pte_pfn(pte_a) == pte_pfn(pte_b) and not (pte_a | pte_b) & _PAGE_RW
    kpage = k.core.pages[pte_pfn(pte_a)]
    assert PageKsm(kpage) and page_mapcount(kpage) == 2 and page_count(kpage) == 2
    assert k.core.buddy.nr_free == free_before + 1  # the duplicate went back
    assert ksm_do_scan(k.core) == 0  # nothing new to merge


def test_unequal_or_unmergeable_pages_stay_apart() -> None:
    k, a, b, addr_a, addr_b = two_mergeable(7, 8)
    c = proc(k, "c")
    anon(c, 1, fill=7)  # equal bytes, but never madvised
    assert ksm_do_scan(k.core) == 0
    assert pte_pfn(a.mm.pgd.get(addr_a)) != pte_pfn(b.mm.pgd.get(addr_b))


def test_write_breaks_the_merge_and_the_other_sharer_keeps_its_bytes() -> None:
    k, a, b, addr_a, addr_b = two_mergeable(7, 7)
    ksm_do_scan(k.core)
    kpfn = pte_pfn(a.mm.pgd.get(addr_a))
    ok(a.store(addr_a, b"\x01"))
    assert pte_pfn(a.mm.pgd.get(addr_a)) != kpfn
    assert b.load(addr_b, 2).data == b"\x07\x07" and a.load(addr_a, 2).data == b"\x01\x07"
    # the last sharer still copies: PageKsm is never reused in place
    ok(b.store(addr_b, b"\x02"))
    assert pte_pfn(b.mm.pgd.get(addr_b)) != kpfn


def test_unmergeable_breaks_ksm_pages() -> None:
    k, a, b, addr_a, addr_b = two_mergeable(9, 9)
    ksm_do_scan(k.core)
    kpfn = pte_pfn(a.mm.pgd.get(addr_a))
    assert a.madvise(addr_a, PAGE, MADV_UNMERGEABLE).cell == "ret:0"
    assert pte_pfn(a.mm.pgd.get(addr_a)) != kpfn and a.load(addr_a, 1).data == b"\x09"
    assert pte_pfn(b.mm.pgd.get(addr_b)) == kpfn  # b did not ask; it keeps the KSM page


def test_poisoning_a_ksm_page_unmaps_every_sharer() -> None:
    """E21: the rmap walk through the stable node reaches both processes."""
    k, a, b, addr_a, addr_b = two_mergeable(7, 7)
    ksm_do_scan(k.core)
    kpage = k.core.pages[pte_pfn(a.mm.pgd.get(addr_a))]
    lock_page(kpage)
    TestSetPageHWPoison(kpage)
    assert try_to_unmap(kpage, TTU.IGNORE_MLOCK)
    unlock_page(kpage)
    for p, addr in ((a, addr_a), (b, addr_b)):
        assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "hwpoison"


def test_a_pinned_page_is_not_merged() -> None:
    """write_protect_page refuses a page with references beyond its mappings."""
    k, a, b, addr_a, addr_b = two_mergeable(7, 7)
    assert pin_user_pages(b.mm, addr_b, 1, FOLL.WRITE | FOLL.LONGTERM, []) == 1
    assert ksm_do_scan(k.core) == 0
    assert pte_pfn(a.mm.pgd.get(addr_a)) != pte_pfn(b.mm.pgd.get(addr_b))
