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
from kvmpoison.arch.x86.pgtable import pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_USER,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from kvmpoison.arch.x86.vmx import (
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_IPAT_BIT,
    EptEntry,
    ept_leaf,
)
from kvmpoison.mm.page import PageFlag, get_page, put_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Outcome
from kvmpoison.virt.kvm.hardened import gfn_is_shared_hardened, hardened_faultin_pfn
from kvmpoison.virt.kvm.kvm_main import (
    KVM_PFN_ERR_HWPOISON,
    Protection,
    Vm,
    is_error_pfn,
    kvm_pfn_to_refcounted_page,
    kvm_send_hwpoison_signal,
)
from kvmpoison.virt.kvm.mem_protected import gfn_is_shared, kvm_protect_pfn

PTE_PREFETCH_NUM = 8
# Software bits of a leaf SPTE (arch/x86/kvm/mmu/spte.h): v5.12 has the writable
# bits at PT_FIRST_AVAIL_BITS_SHIFT (10) and 11; 6.x moved them to 57/58 for EPT
# and uses bit 11 as SPTE_MMU_PRESENT_MASK.
SPTE_HOST_WRITEABLE_V5_12 = 1 << 10
SPTE_MMU_WRITEABLE_V5_12 = 1 << 11
SPTE_MMU_PRESENT_MASK = 1 << 11
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58


def make_spte(vm: Vm, pfn: int, writable: bool, prefetch: bool = False) -> int:
    """A 4K guest-RAM leaf SPTE as ``make_spte`` (arch/x86/kvm/mmu/spte.c) builds it under EPT.

    EPT with A/D bits and without execute-only (``kvm_mmu_set_ept_masks``): R|X, W
    when writable; memtype WB with IPAT (``vmx_get_mt_mask``: RAM, no non-coherent
    DMA); the accessed bit unless prefetched; the dirty bit on a writable SPTE;
    host- and MMU-writable software bits (v5.12: bits 10/11; 6.x: 57/58, plus
    SPTE_MMU_PRESENT_MASK). ``writable`` stands for ``host_writable`` and the
    SPTE's write access alike (TDP maps with ACC_ALL).
    """
    modern = vm.core.kcfg.version.tuple >= (5, 13)  # EPT writable bits 57/58, MMU_PRESENT 11
    spte = ept_leaf(pfn, writable=writable) | VMX_EPT_IPAT_BIT
    if modern:
        spte |= SPTE_MMU_PRESENT_MASK
    if not prefetch:
        spte |= VMX_EPT_ACCESS_BIT
    if writable:
        spte |= VMX_EPT_DIRTY_BIT
        spte |= (EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE) if modern else \
            (SPTE_HOST_WRITEABLE_V5_12 | SPTE_MMU_WRITEABLE_V5_12)
    return spte


def kvm_handle_bad_page(vm: Vm, hva: int, pfn: int) -> Outcome:
    """``kvm_handle_bad_page`` (arch/x86/kvm/mmu/mmu.c, v5.12): KVM_PFN_ERR_HWPOISON signals
    the vCPU thread (RET_PF_RETRY, KVM_RUN -EINTR); KVM_PFN_ERR_RO_FAULT is not modelled;
    anything else is -EFAULT from KVM_RUN."""
    if pfn == KVM_PFN_ERR_HWPOISON:
        return Outcome.signal(kvm_send_hwpoison_signal(vm, hva),
                              detail="kvm_send_hwpoison_signal to the vCPU thread")
    return Outcome.error(errno.EFAULT, "KVM_RUN returns -EFAULT")


def spte_present(vm: Vm, gpa: int, write: bool) -> EptEntry | None:
    """The leaf SPTE of ``gpa`` if it allows the access (``is_shadow_present_pte``, and
    W for a write); None is an EPT violation."""
    raw = vm.ept.get(gpa & ~(PAGE_SIZE - 1))
    if not raw:
        return None
    entry = EptEntry.decode(raw)
    if not entry.present or (write and not entry.flags & 0x2):
        return None
    return entry


def _td_add_page(vm: Vm, gfn: int, pfn: int) -> None:
    """Stand-in for TDH.MEM.PAGE.ADD/AUG (TDX module, not in v5.12): the page's bytes are
    rewritten under the TD's KeyID with MOVDIR64B so its lines become TD-owned."""
    if vm.td_keyid is None or pfn in vm.td_pages:
        return
    if gfn_is_shared_hardened(vm, gfn) if vm.hardened_shared is not None \
            else gfn_is_shared(vm, gfn):
        return
    hw = vm.core.hw
    pa = pfn << PAGE_SHIFT
    content = hw.read(pa, PAGE_SIZE, 0).data
    hw.write(pa, content, vm.td_keyid, WriteHow.MOVDIR64B)
    vm.td_pages.add(pfn)


def direct_page_fault(vm: Vm, gpa: int, write: bool) -> Outcome | None:
    """Resolve an EPT violation at ``gpa``; None when the SPTE is set (retry the access).

    ``direct_page_fault`` (arch/x86/kvm/mmu/mmu.c, v5.12; RFCv2 13/13 adds the
    ``kvm_protect_pfn`` call after ``handle_abnormal_pfn``, and its refusal
    returns before ``kvm_release_pfn_clean``). Simplified: 4K SPTEs only (no
    ``host_pfn_mapping_level``), no ``mmu_notifier_retry`` race, a gfn outside
    every memslot is reported as -EFAULT where KVM takes an MMIO exit
    (KVM_EXIT_MMIO) to the VMM.
    """
    gfn = gpa >> PAGE_SHIFT
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return Outcome.error(errno.EFAULT, f"no memslot for gpa {gpa:#x} (an MMIO exit)")
    hva = slot.gfn_to_hva(gfn)
    protected = vm.mem_protected and vm.protection is not Protection.NONE
    hardened = protected and vm.protection is Protection.HARDENED
    if hardened and not gfn_is_shared_hardened(vm, gfn):
        # the design: KVM follows its own marker, or faults in writable and protects
        got = hardened_faultin_pfn(vm, gpa, hva)
        if isinstance(got, Outcome):
            return got
        pfn = got
    else:
        pfn = vm.hva_to_pfn(hva, write)
    if is_error_pfn(pfn):
        return kvm_handle_bad_page(vm, hva, pfn)
    page = kvm_pfn_to_refcounted_page(vm, pfn)  # None: no struct page (PFNMAP, E25)
    if protected and not hardened and not kvm_protect_pfn(vm, gfn, pfn):
        # RFCv2: "return RET_PF_RETRY;" before kvm_release_pfn_clean(): the GUP reference leaks.
        return Outcome.signal(kvm_send_hwpoison_signal(vm, hva),
                              detail="kvm_protect_pfn refused the page")
    try:
        _td_add_page(vm, gfn, pfn)
        host_pte = vm.mm.pgd.get(hva)
        writable = write or (pte_present(host_pte) and bool(host_pte & _PAGE_RW)) \
            or bool(hardened and page and PageFlag(page, PG.guest_private))  # faulted in rw
        vm.ept.set(gfn << PAGE_SHIFT, make_spte(vm, pfn, writable))
        if not protected:
            direct_pte_prefetch(vm, gfn)
    finally:
        if page is not None:
            put_page(page)  # kvm_release_pfn_clean
    return None


def direct_pte_prefetch(vm: Vm, gfn: int) -> None:
    """Map present neighbours of ``gfn`` without faulting them in.

    ``direct_pte_prefetch`` -> ``__direct_pte_prefetch`` (arch/x86/kvm/mmu/mmu.c,
    v5.12): in the aligned block of PTE_PREFETCH_NUM (8) SPTEs around the
    fault, each run of non-present SPTEs that a present one (or the faulting
    one) ends goes to ``direct_pte_prefetch_many``; v5.12 drops the last run
    (the trailing flush came in late 2021, "Also prefetch the last range"), so
    a fault at the first gfn of a block prefetches nothing. A run inside one
    memslot is pinned with ``gfn_to_page_many_atomic`` (GUP-fast FOLL_WRITE:
    present, writable, not special), stopping at the first page that fails;
    none pinned ends the prefetch. Pinned pages get writable SPTEs and their
    reference is dropped. The RFC skips all this while ``mem_protected``. 6.18
    uses the TDP MMU (default since 5.15), whose faults prefetch nothing.
    """
    if vm.core.kcfg.version.tuple >= (5, 15):  # tdp_mmu on by default: no prefetch
        return
    base = gfn & ~(PTE_PREFETCH_NUM - 1)
    start: int | None = None
    for g in range(base, base + PTE_PREFETCH_NUM):
        if g == gfn or spte_present(vm, g << PAGE_SHIFT, False) is not None:
            if start is None:
                continue
            if direct_pte_prefetch_many(vm, start, g) < 0:
                return
            start = None
        elif start is None:
            start = g


def direct_pte_prefetch_many(vm: Vm, start: int, end: int) -> int:
    """Prefetch gfns [start, end): 0, or -1 when nothing could be pinned."""
    slot = vm.gfn_to_memslot(start)
    if slot is None or not slot.covers(end - 1):
        return -1  # no slot, or gfn_to_hva_many's "entry < nr_pages": 0 pinned
    pinned: list[int] = []
    for g in range(start, end):  # get_user_pages_fast_only(FOLL_WRITE): stops at a failure
        pte = vm.mm.pgd.get(slot.gfn_to_hva(g))
        if not pte & _PAGE_PRESENT or not pte & _PAGE_RW or not pte & _PAGE_USER \
                or pte & _PAGE_SPECIAL:
            break
        pinned.append(pte_pfn(pte))
    if not pinned:
        return -1
    for g, pfn in zip(range(start, end), pinned, strict=False):
        page = vm.core.pages[pfn]
        get_page(page)
        _td_add_page(vm, g, pfn)
        vm.ept.set(g << PAGE_SHIFT, make_spte(vm, pfn, True, prefetch=True))  # mmu_set_spte
        put_page(page)
    return 0
