"""Shadow paging (``ept=0``/``npt=0``): ``FNAME(page_fault)`` -> ``FNAME(fetch)``.

Follows ``arch/x86/kvm/mmu/paging_tmpl.h`` (v5.12) as instantiated for a
64-bit guest with paging on (``paging64_page_fault``), the MMU KVM uses when
the module parameter ``ept`` (``tdp_enabled``) is off. The RFC (v1 7/7, v2
13/13) changes only ``FNAME(walk_addr_generic)`` here (guest PTEs are read
with ``copy_from_guest``); ``FNAME(page_fault)`` never calls
``kvm_protect_pfn``, so a protected VM's pages are mapped into the shadow
page table without being poisoned or unmapped from the VMM (E27).

Simplified: the guest's page tables are not modelled. The guest maps its
RAM one to one (guest-virtual == guest-physical, every page present,
writable, user, executable), so ``FNAME(walk_addr)`` always succeeds with
the gfn of the address, and the shadow page table is indexed by that
address; the model keeps it in ``vm.ept`` (the table the vCPU walks), in
the x86 PTE format a shadow page uses. No ``FNAME(prefetch)``/``pte_prefetch``,
no large pages, no write-protection of guest page tables (``mmu_need_write_protect``),
no async page faults.

The hardened design runs on 6.18, where ``kvm_faultin_pfn`` (arch/x86/kvm/mmu/mmu.c)
is shared by ``direct_page_fault`` and ``FNAME(page_fault)``; its protection sits
there (``hardened_faultin_pfn``), so both MMUs make a page private.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable import pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.page import PageFlag, put_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Outcome
from kvmpoison.virt.kvm.hardened import gfn_is_shared_hardened, hardened_faultin_pfn
from kvmpoison.virt.kvm.kvm_main import (
    Protection,
    Vm,
    is_error_pfn,
    kvm_pfn_to_refcounted_page,
)
from kvmpoison.virt.kvm.x86.mmu import (
    SPTE_HOST_WRITEABLE_V5_12,
    SPTE_MMU_WRITEABLE_V5_12,
    kvm_handle_bad_page,
)

# A shadow SPTE is an x86 PTE (arch/x86/kvm/mmu/spte.c, kvm_mmu_set_mmio_spte_mask and
# kvm_mmu_reset_all_pte_masks, v5.12): PT_PRESENT_MASK, PT_WRITABLE_MASK, PT_USER_MASK,
# shadow_accessed_mask (bit 5), shadow_dirty_mask (bit 6).
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
SHADOW_ACCESSED_MASK = 1 << 5
SHADOW_DIRTY_MASK = 1 << 6
PT64_BASE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)


def make_shadow_spte(pfn: int, writable: bool) -> int:
    """``make_spte`` (arch/x86/kvm/mmu/spte.c, v5.12) for a shadow page: present, user
    (the guest PTE's U/S, always set here), accessed; writable SPTEs are dirty and carry
    SPTE_HOST_WRITEABLE/SPTE_MMU_WRITEABLE (bits 10/11). No memtype bits: those are
    EPT's (``if (tdp_enabled) spte |= get_mt_mask``); no NX: the guest's PTE allows
    execution."""
    spte = PT_PRESENT_MASK | PT_USER_MASK | SHADOW_ACCESSED_MASK \
        | ((pfn << PAGE_SHIFT) & PT64_BASE_ADDR_MASK)
    if writable:
        spte |= PT_WRITABLE_MASK | SHADOW_DIRTY_MASK | SPTE_HOST_WRITEABLE_V5_12 \
            | SPTE_MMU_WRITEABLE_V5_12
    return spte


def shadow_spte_pfn(vm: Vm, gva: int, write: bool) -> int | None:
    """The pfn the shadow SPTE of ``gva`` maps if it allows the access (present, and
    writable for a write); None is a shadow page fault."""
    spte = vm.ept.get(gva & ~(PAGE_SIZE - 1))
    if not spte & PT_PRESENT_MASK or (write and not spte & PT_WRITABLE_MASK):
        return None
    return (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT


def paging64_page_fault(vm: Vm, gva: int, write: bool) -> Outcome | None:
    """``FNAME(page_fault)`` (arch/x86/kvm/mmu/paging_tmpl.h, v5.12 + RFC): None when the
    shadow SPTE is set (retry the access), else the outcome.

    ``FNAME(walk_addr)`` (one to one here, see the module), ``try_async_pf`` ->
    ``__gfn_to_pfn_memslot`` -> ``hva_to_pfn`` (with the RFC v2's
    FOLL_ALLOW_POISONED while ``mem_protected``), ``handle_abnormal_pfn``,
    ``FNAME(fetch)`` -> ``mmu_set_spte``, ``kvm_release_pfn_clean``. No
    ``kvm_protect_pfn``: the RFC's protection is in ``direct_page_fault`` only.
    A gfn outside every memslot is reported as -EFAULT where KVM emulates MMIO.
    """
    gfn = gva >> PAGE_SHIFT  # FNAME(walk_addr): the guest maps gva to the same gpa
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return Outcome.error(errno.EFAULT, f"no memslot for gpa {gva:#x} (an MMIO exit)")
    hva = slot.gfn_to_hva(gfn)
    hardened = vm.mem_protected and vm.protection is Protection.HARDENED \
        and not gfn_is_shared_hardened(vm, gfn)
    if hardened:  # 6.18: kvm_faultin_pfn, shared with direct_page_fault
        got = hardened_faultin_pfn(vm, gva, hva)
        if isinstance(got, Outcome):
            return got
        pfn = got
    else:
        pfn = vm.hva_to_pfn(hva, write)  # try_async_pf
    if is_error_pfn(pfn):
        return kvm_handle_bad_page(vm, hva, pfn)  # handle_abnormal_pfn
    page = kvm_pfn_to_refcounted_page(vm, pfn)
    try:
        host_pte = vm.mm.pgd.get(hva)
        writable = write or (pte_present(host_pte) and bool(host_pte & _PAGE_RW)) \
            or bool(hardened and page and PageFlag(page, PG.guest_private))
        vm.ept.set(gfn << PAGE_SHIFT, make_shadow_spte(pfn, writable))  # FNAME(fetch)
    finally:
        if page is not None:
            put_page(page)  # kvm_release_pfn_clean
    return None
