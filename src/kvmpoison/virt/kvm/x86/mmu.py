"""The TDP (EPT) MMU: ``direct_page_fault`` and the RFC's hook in it.

Follows ``arch/x86/kvm/mmu/mmu.c`` (v5.12) with RFCv2 13/13: after the pfn
is known, a protected VM calls ``kvm_protect_pfn``; a refusal becomes
``kvm_send_hwpoison_signal`` and RET_PF_RETRY; prefetch is skipped while
memory is protected. Error pfns go through ``kvm_handle_bad_page``: a
hwpoisoned page signals the vCPU thread, any other failure makes KVM_RUN
return -EFAULT. EPT entries use the VMX format; KVM drops its page
reference once the SPTE is set.

For a TD (a VM with a private KeyID), the first mapping of a private gfn
stands for TDH.MEM.PAGE.ADD: the page's host-visible bytes are rewritten
under the TD's KeyID with MOVDIR64B, so its lines become TD-owned.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.integrity import WriteHow
from kvmpoison.arch.x86.pgtable import pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.vmx import EptEntry, ept_leaf
from kvmpoison.mm.page import get_page, put_page
from kvmpoison.outcome import Outcome
from kvmpoison.virt.kvm.kvm_main import (
    KVM_PFN_ERR_HWPOISON,
    Protection,
    Vm,
    is_error_pfn,
    kvm_send_hwpoison_signal,
)
from kvmpoison.virt.kvm.mem_protected import gfn_is_shared, kvm_protect_pfn

PTE_PREFETCH_NUM = 8


def kvm_handle_bad_page(vm: Vm, hva: int, pfn: int) -> Outcome:
    if pfn == KVM_PFN_ERR_HWPOISON:
        return Outcome.signal(kvm_send_hwpoison_signal(vm, hva),
                              detail="kvm_send_hwpoison_signal to the vCPU thread")
    return Outcome.error(errno.EFAULT, "KVM_RUN returns -EFAULT")


def spte_present(vm: Vm, gpa: int, write: bool) -> EptEntry | None:
    raw = vm.ept.get(gpa & ~(PAGE_SIZE - 1))
    if not raw:
        return None
    entry = EptEntry.decode(raw)
    if not entry.present or (write and not entry.flags & 0x2):
        return None
    return entry


def _td_add_page(vm: Vm, gfn: int, pfn: int) -> None:
    if vm.td_keyid is None or gfn_is_shared(vm, gfn) or pfn in vm.td_pages:
        return
    hw = vm.core.hw
    pa = pfn << PAGE_SHIFT
    content = hw.read(pa, PAGE_SIZE, 0).data
    hw.write(pa, content, vm.td_keyid, WriteHow.MOVDIR64B)
    vm.td_pages.add(pfn)


def direct_page_fault(vm: Vm, gpa: int, write: bool) -> Outcome | None:
    """Resolve an EPT violation at ``gpa``; None when the SPTE is set (retry the access)."""
    gfn = gpa >> PAGE_SHIFT
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return Outcome.error(errno.EFAULT, f"no memslot for gpa {gpa:#x} (an MMIO exit)")
    hva = slot.gfn_to_hva(gfn)
    pfn = vm.hva_to_pfn(hva, write)
    if is_error_pfn(pfn):
        return kvm_handle_bad_page(vm, hva, pfn)
    page = vm.core.pages[pfn]
    try:
        protected = vm.mem_protected and vm.protection is not Protection.NONE
        if protected and not kvm_protect_pfn(vm, gfn, pfn):
            return Outcome.signal(kvm_send_hwpoison_signal(vm, hva),
                                  detail="kvm_protect_pfn refused the page")
        _td_add_page(vm, gfn, pfn)
        host_pte = vm.mm.pgd.get(hva)
        writable = write or (pte_present(host_pte) and bool(host_pte & _PAGE_RW))
        vm.ept.set(gfn << PAGE_SHIFT, ept_leaf(pfn, writable=writable))
        if not protected:
            direct_pte_prefetch(vm, gfn)
    finally:
        put_page(page)  # kvm_release_pfn_clean
    return None


def direct_pte_prefetch(vm: Vm, gfn: int) -> None:
    """Map the present neighbours of ``gfn`` (GUP-fast only: no faults)."""
    base = gfn & ~(PTE_PREFETCH_NUM - 1)
    for g in range(base, base + PTE_PREFETCH_NUM):
        if g == gfn or vm.ept.get(g << PAGE_SHIFT):
            continue
        hva = vm.gfn_to_hva(g)
        if hva is None:
            continue
        pte = vm.mm.pgd.get(hva)
        if not pte_present(pte) or not pte & 0x4:  # present and user-accessible
            continue
        pfn = (pte >> PAGE_SHIFT) & ((1 << 40) - 1)
        page = vm.core.pages[pfn]
        get_page(page)
        _td_add_page(vm, g, pfn)
        vm.ept.set(g << PAGE_SHIFT, ept_leaf(pfn, writable=bool(pte & _PAGE_RW)))
        put_page(page)
