"""The RFC's shmem hook and a huge shmem page (issue 12): what the posted code does when one
4 KiB page of a shmem THP is poisoned/protected (no fixes).

RFC 09 ("shmem: Fail shmem_getpage_gfp() on poisoned pages") tests PageHWPoison on the
page ``find_lock_entry`` returns: the head of a THP. kvm_protect_pfn poisons the 4 KiB
subpage KVM faulted on, and its ``try_to_unmap`` finds no PTE for a PMD-mapped subpage.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import EIO
from signal import SIGBUS

import pytest

from helpers import ANON, PAGE, RW, SHARED, boot, ok, proc
from kvmpoison.designs import design
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.huge_memory import HPAGE_PMD_NR, ThpSettings, thp_pmd_mapping
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.mmap import MAP_FIXED
from kvmpoison.mm.page import TestSetPageHWPoison
from kvmpoison.mm.rmap import TTU, try_to_unmap
from kvmpoison.outcome import Halt, Kind, Outcome
from kvmpoison.uapi.siginfo import BusCode

HPAGE = 2 << 20


def rfc_thp(kcfg: KernelConfig = RFC_BASE,
            rfc: bool = True) -> tuple[Kernel, Process, int, int, int]:
    """A memfd THP mapped by PMD, filled with 0x5a, under rfc-v2's mm hooks (or none):
    (kernel, process, address, fd, head pfn)."""
    k = boot(kcfg)
    if rfc:
        k.core.hooks = design("rfc-v2").hooks()
    k.core.thp = ThpSettings(shmem_enabled="advise")
    p = proc(k)
    base = ok(p.mmap(0, 3 * HPAGE, RW, ANON))
    t = (base + HPAGE - 1) & ~(HPAGE - 1)
    fd = ok(p.memfd_create("guest"))
    ok(p.ftruncate(fd, HPAGE))
    ok(p.mmap(t, HPAGE, RW, SHARED | MAP_FIXED, fd))
    ok(p.madvise(t, HPAGE, MADV_HUGEPAGE))
    ok(p.store(t, bytes([0x5A]) * HPAGE))
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None
    head = mapping.lookup(0)
    assert head is not None and thp_pmd_mapping(p.mm, t) == (head, 9)
    return k, p, t, fd, head


def protect(k: Kernel, pfn: int) -> bool:
    """kvm_protect_pfn's mm steps (RFCv2 13/13): TestSetPageHWPoison, then
    try_to_unmap(TTU_IGNORE_MLOCK); returns try_to_unmap's answer."""
    page = k.core.pages[pfn]
    assert not TestSetPageHWPoison(page)
    return try_to_unmap(page, TTU.IGNORE_MLOCK)


def pread_page(p: Process, fd: int, index: int) -> int:
    """pread of one page: bytes read, or -errno."""
    buf = ok(p.mmap(0, PAGE, RW, ANON))
    out = p.pread(fd, buf, PAGE, index * PAGE)
    assert out.value is not None
    return -out.value if out.kind is Kind.ERR else out.value


def in_child(p: Process, access: Callable[[Process], Outcome]) -> Outcome:
    """A fault that may kill: made by a forked child sharing the memfd mapping."""
    return access(p.fork())


def is_sigbus(out: Outcome, code: BusCode | None = None) -> bool:
    info = out.siginfo
    return out.kind is Kind.SIG and info is not None and info.signo == SIGBUS \
        and (code is None or info.code == code)


def test_protecting_a_tail_leaves_the_pmd_and_passes_the_rfc_check() -> None:
    """The tail case: try_to_unmap finds no PTE (page_vma_mapped_walk's pmd_page != page)
    and the PMD keeps mapping the protected page; RFC 09's check reads the head, so
    read() of the protected page is not -EIO."""
    k, p, t, fd, head = rfc_thp()
    assert not protect(k, head + 5)  # still mapped
    assert thp_pmd_mapping(p.mm, t) == (head, 9)
    assert p.load(t + 5 * PAGE, 4).data == bytes([0x5A]) * 4  # through the PMD
    assert pread_page(p, fd, 5) == PAGE


def test_protected_tail_read_fault_maps_the_whole_thp_on_5_12() -> None:
    """After the PMD is gone (MADV_DONTNEED), a read fault even on the protected page maps
    the THP by PMD again: fault-around's next_uptodate_page tests the head, and v5.12's
    do_set_pmd has no has_hwpoisoned check."""
    k, p, t, _fd, head = rfc_thp()
    protect(k, head + 5)
    ok(p.madvise(t, HPAGE, MADV_DONTNEED))
    assert p.load(t + 5 * PAGE, 4).data == bytes([0x5A]) * 4
    assert thp_pmd_mapping(p.mm, t) == (head, 9)


def test_protected_tail_write_fault_sigbus_but_a_neighbour_maps_it() -> None:
    """A write fault takes __do_fault, whose PageHWPoison test is on the subpage: the
    protected page itself is VM_FAULT_HWPOISON (SIGBUS BUS_MCEERR_AR), but a write to
    any other page of the THP maps all 2 MiB by PMD, the protected page included."""
    k, p, t, _fd, head = rfc_thp()
    protect(k, head + 5)
    ok(p.madvise(t, HPAGE, MADV_DONTNEED))
    assert is_sigbus(in_child(p, lambda c: c.store(t + 5 * PAGE, b"x")), BusCode.BUS_MCEERR_AR)
    ok(p.store(t + 6 * PAGE, b"x"))
    assert thp_pmd_mapping(p.mm, t) == (head, 9)
    assert p.load(t + 5 * PAGE, 1).data == b"\x5a"


def test_protected_head_fails_the_whole_2mib() -> None:
    """The head case: RFC 09's check fires for every index of the THP, so every page of it
    is -EIO to read() and SIGBUS (vmf_error(-EIO)) to a fault, not only the protected one.
    While the head is PMD-mapped, try_to_unmap_one hits VM_BUG_ON_PAGE(!pvmw.pte): the
    kernel's page_vma_mapped_walk returns the PMD with no PTE (docs/thp_kvm.md), so the
    head is protected here after the VMM's mapping is gone."""
    k, p, t, fd, head = rfc_thp()
    with pytest.raises(Halt, match="VM_BUG_ON_PAGE"):
        protect(k, head)
    k, p, t, fd, head = rfc_thp()
    ok(p.madvise(t, HPAGE, MADV_DONTNEED))
    assert protect(k, head)
    for index in (0, 1, 300, HPAGE_PMD_NR - 1):
        assert pread_page(p, fd, index) == -EIO
        addr = t + index * PAGE
        assert is_sigbus(p.fork().load(addr, 1), BusCode.BUS_ADRERR)
        assert is_sigbus(p.fork().store(addr, b"x"), BusCode.BUS_ADRERR)
    assert thp_pmd_mapping(p.mm, t) is None


def test_without_the_rfc_6_18_maps_a_poisoned_thp_with_ptes() -> None:
    """6.18, where only memory_failure poisons: do_set_pmd backs off (has_hwpoisoned), the
    other pages are mapped by PTEs and the poisoned one is SIGBUS BUS_MCEERR_AR."""
    k, p, t, _fd, head = rfc_thp(KernelConfig(version=KernelVersion.V6_18), rfc=False)
    assert not TestSetPageHWPoison(k.core.pages[head + 5])
    ok(p.madvise(t, HPAGE, MADV_DONTNEED))
    assert p.load(t + 6 * PAGE, 1).data == b"\x5a"
    assert thp_pmd_mapping(p.mm, t) is None and p.mm.pgd.get(t + 6 * PAGE) != 0
    assert is_sigbus(p.load(t + 5 * PAGE, 1), BusCode.BUS_MCEERR_AR)


@pytest.mark.parametrize("rfc", [False, True], ids=["baseline", "rfc-v2"])
def test_an_order0_page_is_caught_by_the_rfc_check(rfc: bool) -> None:
    """The contrast: without THP the same protected page is -EIO to read() under the RFC."""
    k = boot(RFC_BASE)
    if rfc:
        k.core.hooks = design("rfc-v2").hooks()
    p = proc(k)
    fd = ok(p.memfd_create("small"))
    ok(p.ftruncate(fd, HPAGE))
    t = ok(p.mmap(0, HPAGE, RW, SHARED, fd))
    ok(p.store(t, bytes([0x5A]) * PAGE * 8))
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None
    pfn = mapping.lookup(5)
    assert pfn is not None and not k.core.pages.order[pfn]
    protect(k, pfn)
    assert pread_page(p, fd, 5) == (-EIO if rfc else PAGE)
