"""The hardened design on THP-backed guest RAM (E23, docs/hardened.md "THP"): a private
fault splits the THP cleanly and protects one 4 KiB page; a THP that cannot split is
refused with nothing half-protected; a whole 2 MiB conversion protects all 512 pages and
maps one 2M SPTE; mixed ranges map 4K; the huge zero page is never made private; the
scrub on free covers every subpage."""

from __future__ import annotations

import numpy as np
import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable import pte_present_array
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.mm.guest_private import PageGuestPrivate, guest_private_markers
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    ThpSettings,
    is_huge_zero_pmd,
    thp_pmd_mapping,
)
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import Page, put_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Kind
from kvmpoison.virt.kvm.kvm_main import PG_LEVEL_2M, PG_LEVEL_4K, ept_spte
from kvmpoison.virt.kvm.private_mem import KVM_EXIT_MEMORY_FAULT

BASE = 0x400000  # the second 2 MiB of guest RAM: boot touches only the first
GFN = BASE >> PAGE_SHIFT
SECRET = b"guest secret"


def thp_machine(kernel: KernelConfig | None = None) -> Machine:
    return Machine(Config(design="hardened", kernel=kernel, integrity=IntegrityMode.OFF),
                   vms=[VmSpec(memory=8 << 20, backing="anon", thp=True)])


def vmm_mm(m: Machine) -> MmStruct:
    mm = m.vmm.proc.task.mm
    assert mm is not None
    return mm


def hva(m: Machine, gpa: int = BASE) -> int:
    return m.vmm.gpa_to_hva(gpa)


def level(m: Machine, gpa: int) -> int:
    raw, lvl = ept_spte(m.vm.ept, gpa)
    assert raw, f"no SPTE for {gpa:#x}"
    return lvl


def present_ptes(m: Machine, start: int, end: int) -> int:
    mm = vmm_mm(m)
    rows = m.kernel.core.ptes.rows
    return sum(int(pte_present_array(rows[c.rows, c.cols]).sum())
               for c in mm.pgd.chunks(start, end))


def thp_head(m: Machine) -> int:
    got = thp_pmd_mapping(vmm_mm(m), hva(m))
    assert got is not None, "guest RAM is not PMD-mapped"
    return got[0]


# -- a private fault: split cleanly, protect 4 KiB --------------------------------------------


@pytest.mark.parametrize("offset", [0x5000, 0], ids=["tail", "head"])
def test_a_private_fault_splits_the_thp_and_the_vmm_keeps_the_other_511(offset: int) -> None:
    m = thp_machine()
    assert m.vmm.store(BASE, b"vmm data").kind is Kind.OK
    head = thp_head(m)
    gpa = BASE + offset
    assert m.guest.store(gpa, SECRET).cell == "ok"  # the head case oopses under the RFC
    mem = m.kernel.core.pages
    pfn = m.vm.hardened_private[gpa >> PAGE_SHIFT]
    assert pfn == head + (offset >> PAGE_SHIFT)
    assert thp_pmd_mapping(vmm_mm(m), hva(m)) is None  # the PMD was split ...
    assert not mem.order[head : head + HPAGE_PMD_NR].any()  # ... and so was the THP
    lo = hva(m)
    assert guest_private_markers(vmm_mm(m), lo, lo + HPAGE_SIZE).tolist() == [pfn]
    assert present_ptes(m, lo, lo + HPAGE_SIZE) == HPAGE_PMD_NR - 1
    assert m.vmm.load(gpa).cell == "sig:SIGBUS:BUS_ADRERR"
    other = BASE + 0x7000 if offset == 0 else BASE
    assert m.vmm.store(other + 8, b"mine").cell == "ok"
    assert m.vmm.load(other + 8, 4).data == b"mine"
    assert m.guest.load(gpa, len(SECRET)).data == SECRET
    assert level(m, gpa) == PG_LEVEL_4K  # only the protected gfn is mapped for the guest


HPAGE_SIZE = HPAGE_PMD_SIZE


def test_a_pmd_mapped_shmem_thp_is_split_the_same_way() -> None:
    m = Machine(Config(design="hardened", integrity=IntegrityMode.OFF,
                       thp=ThpSettings(shmem_enabled="force")),
                vms=[VmSpec(memory=8 << 20, backing="memfd")])
    assert m.vmm.store(BASE, b"vmm data").kind is Kind.OK
    head = thp_head(m)  # a shmem THP in the memfd's page cache, PMD-mapped
    assert m.guest.store(BASE, SECRET).cell == "ok"  # its head: no oops
    mem = m.kernel.core.pages
    assert not mem.order[head : head + HPAGE_PMD_NR].any()
    assert m.vm.hardened_private[GFN] == head and PageGuestPrivate(mem[head])
    assert m.vmm.load(BASE).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.vmm.load(BASE + 0x1000).cell == "ok"


def test_a_thp_that_cannot_split_is_refused_and_nothing_is_half_protected() -> None:
    m = thp_machine()
    assert m.vmm.store(BASE, b"vmm data").kind is Kind.OK
    head = thp_head(m)
    pages: list[Page] = []
    assert pin_user_pages(vmm_mm(m), hva(m, BASE + 0x10000), 1,
                          FOLL.WRITE | FOLL.LONGTERM, pages) == 1  # a DMA pin on the THP
    out = m.guest.store(BASE + 0x5000, SECRET)
    assert out.cell == "err:EFAULT" and "split_huge_page" in out.detail
    ex = m.vm.hardened_exits[-1]
    assert ex.exit_reason == KVM_EXIT_MEMORY_FAULT and ex.gpa == BASE + 0x5000
    mem = m.kernel.core.pages
    span = slice(head, head + HPAGE_PMD_NR)
    still = thp_pmd_mapping(vmm_mm(m), hva(m))
    assert still is not None and still[0] == head  # still one PMD-mapped THP
    assert int(mem.order[head]) == HPAGE_PMD_ORDER
    assert not (mem.flags[span] & np.uint32(mem.mask(PG.guest_private))).any()
    assert (m.kvm.hardened_owner[span] == m.kvm.NO_BINDING).all()
    assert not len(guest_private_markers(vmm_mm(m), hva(m), hva(m) + HPAGE_SIZE))
    assert GFN + 5 not in m.vm.hardened_private
    assert m.vmm.load(BASE, 8).data == b"vmm data"  # the VMM keeps every page
    assert m.vmm.load(BASE + 0x5000).cell == "ok"
    unpin_user_pages(pages)
    assert m.guest.store(BASE + 0x5000, SECRET).cell == "ok"  # unpinned: the split works
    assert m.vmm.load(BASE + 0x5000).cell == "sig:SIGBUS:BUS_ADRERR"


# -- whole 2 MiB conversion, and mixed ranges -----------------------------------------------


def test_converting_a_whole_2m_protects_all_512_pages_and_maps_one_2m_spte() -> None:
    m = thp_machine()
    assert m.guest.share(GFN, HPAGE_PMD_NR) == 0
    assert m.vmm.store(BASE + 0x3000, b"io buffer").kind is Kind.OK  # one THP
    head = thp_head(m)
    assert m.guest.load(BASE + 0x3000, 9).data == b"io buffer"
    assert level(m, BASE + 0x3000) == PG_LEVEL_2M  # all shared: 2M is fine
    assert m.guest.unshare(GFN, HPAGE_PMD_NR) == 0
    lo = hva(m)
    markers = guest_private_markers(vmm_mm(m), lo, lo + HPAGE_SIZE)
    assert sorted(markers.tolist()) == list(range(head, head + HPAGE_PMD_NR))
    assert present_ptes(m, lo, lo + HPAGE_SIZE) == 0
    mem = m.kernel.core.pages
    span = slice(head, head + HPAGE_PMD_NR)
    assert (m.kvm.hardened_owner[span] == m.vm.binding).all()
    assert not mem.order[span].any()
    for off in (0, 0x3000, HPAGE_SIZE - PAGE_SIZE):
        assert m.vmm.load(BASE + off).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.guest.load(BASE + 0x3000, 9).data == b"io buffer"  # the guest keeps its data
    assert level(m, BASE + 0x3000) == PG_LEVEL_2M  # all private, contiguous: 2M again
    assert m.guest.share(GFN + 3, 1) == 0  # one gfn goes shared: the range is mixed
    assert m.guest.load(BASE + 0x7000).cell == "ok"
    assert level(m, BASE + 0x7000) == PG_LEVEL_4K


def test_converting_part_of_a_thp_splits_it_and_protects_only_the_covered_pages() -> None:
    m = thp_machine()
    half = HPAGE_PMD_NR // 2
    assert m.guest.share(GFN, HPAGE_PMD_NR) == 0
    assert m.vmm.store(BASE, b"x").kind is Kind.OK
    head = thp_head(m)
    assert m.guest.unshare(GFN, half) == 0
    lo = hva(m)
    markers = guest_private_markers(vmm_mm(m), lo, lo + HPAGE_SIZE)
    assert sorted(markers.tolist()) == list(range(head, head + half))
    assert present_ptes(m, lo, lo + HPAGE_SIZE) == half
    assert m.vmm.load(BASE).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.vmm.load(BASE + half * PAGE_SIZE).cell == "ok"
    assert m.guest.load(BASE).cell == "ok"
    assert level(m, BASE) == PG_LEVEL_4K  # half shared, half private: mixed


def test_a_mixed_2m_range_never_gets_a_2m_spte() -> None:
    m = thp_machine()
    assert m.guest.share(GFN, HPAGE_PMD_NR // 2) == 0  # half shared, half private
    assert m.vmm.store(BASE, b"io").kind is Kind.OK
    assert thp_pmd_mapping(vmm_mm(m), hva(m)) is not None
    assert m.guest.load(BASE, 2).data == b"io"  # a shared fault over a huge PMD
    assert level(m, BASE) == PG_LEVEL_4K  # the design's KVM_LPAGE_MIXED_FLAG
    assert spte_absent(m, BASE + HPAGE_SIZE - PAGE_SIZE)  # the private half is not mapped


def spte_absent(m: Machine, gpa: int) -> bool:
    return not ept_spte(m.vm.ept, gpa)[0]


# -- the huge zero page -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [None, KernelConfig(version=KernelVersion.V6_1)],
                         ids=["6.18", "6.1"])
def test_a_private_fault_over_the_huge_zero_page_takes_a_real_page(
        kernel: KernelConfig | None) -> None:
    m = thp_machine(kernel)
    assert m.vmm.load(BASE + 0x2000).data == bytes(8)  # a read maps the huge zero page
    core = m.kernel.core
    assert is_huge_zero_pmd(core, vmm_mm(m).pgd.pmd_leaf(hva(m)))
    zero = core.huge_zero_pfn
    assert m.guest.load(BASE + 0x2000).data == bytes(8)  # private read: faulted in writable
    pfn = m.vm.hardened_private[GFN + 2]
    assert not zero <= pfn < zero + HPAGE_PMD_NR and pfn != core.zero_pfn
    mem = core.pages
    span = slice(zero, zero + HPAGE_PMD_NR)
    assert not (mem.flags[span] & np.uint32(mem.mask(PG.guest_private))).any()
    assert (m.kvm.hardened_owner[span] == m.kvm.NO_BINDING).all()
    assert PageGuestPrivate(mem[pfn])
    assert m.vmm.load(BASE + 0x2000).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.guest.store(BASE + 0x2000, SECRET).cell == "ok"
    assert m.kernel.core.hw.read(zero << PAGE_SHIFT, HPAGE_SIZE, 0).data == bytes(HPAGE_SIZE)
    other = m.vmm.load(BASE + 0x9000)  # a neighbour the guest never touched
    assert other.cell == "ok" and other.data == bytes(8)


# -- scrub on free -----------------------------------------------------------------------------


def test_freeing_a_converted_2m_scrubs_every_one_of_its_512_pages() -> None:
    m = thp_machine()
    assert m.guest.share(GFN, HPAGE_PMD_NR) == 0
    assert m.vmm.store(BASE, b"x").kind is Kind.OK
    head = thp_head(m)
    assert m.guest.unshare(GFN, HPAGE_PMD_NR) == 0
    for i in (0, 1, 255, 511):
        assert m.guest.store(BASE + i * PAGE_SIZE, SECRET).cell == "ok"
    assert level(m, BASE) == PG_LEVEL_2M
    before = m.kvm.hardened_scrubbed
    assert m.vmm.proc.munmap(hva(m), HPAGE_SIZE).value == 0
    assert spte_absent(m, BASE) and spte_absent(m, BASE + HPAGE_SIZE - PAGE_SIZE)
    assert m.kvm.hardened_scrubbed - before == HPAGE_PMD_NR
    mem = m.kernel.core.pages
    span = slice(head, head + HPAGE_PMD_NR)
    assert not (mem.flags[span] & np.uint32(mem.mask(PG.guest_private))).any()
    assert (m.kvm.hardened_owner[span] == m.kvm.NO_BINDING).all()
    assert m.kernel.core.hw.read(head << PAGE_SHIFT, HPAGE_SIZE, 0).data == bytes(HPAGE_SIZE)


def test_the_free_hook_scrubs_a_private_tail_of_a_freed_compound_page() -> None:
    """v2's kvm_unpoison_page saw the head only; the design's hook sees every subpage."""
    m = thp_machine()
    core = m.kernel.core
    page = core.buddy.alloc_pages(HPAGE_PMD_ORDER, compound=True)
    assert page is not None
    tail = page.pfn + 7
    core.hw.write(tail << PAGE_SHIFT, SECRET, 0)
    mem = core.pages
    mem.flags[tail] |= np.uint32(mem.mask(PG.guest_private))
    m.kvm.hardened_owner[tail] = m.vm.binding
    before = m.kvm.hardened_scrubbed
    put_page(page)  # the last reference: __free_pages of the order-9 block
    assert m.kvm.hardened_scrubbed - before == 1
    assert core.hw.read(tail << PAGE_SHIFT, len(SECRET), 0).data == bytes(len(SECRET))
    assert not PageGuestPrivate(mem[tail])
    assert int(m.kvm.hardened_owner[tail]) == m.kvm.NO_BINDING
