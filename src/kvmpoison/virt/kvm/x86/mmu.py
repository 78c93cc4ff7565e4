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
    _PAGE_PSE,
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
from kvmpoison.virt.kvm.hardened import (
    SHARED,
    gfn_is_shared_hardened,
    hardened_faultin_pfn,
    hardened_private_2m,
)
from kvmpoison.virt.kvm.kvm_main import (
    KVM_PFN_ERR_HWPOISON,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    Memslot,
    Protection,
    Vm,
    ept_spte,
    ept_spte_4k,
    is_error_pfn,
    kvm_pfn_to_refcounted_page,
    kvm_send_hwpoison_signal,
)
from kvmpoison.virt.kvm.mem_protected import gfn_is_shared, kvm_protect_pfn
from kvmpoison.virt.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE

PTE_PREFETCH_NUM = 8
# Software bits of a leaf SPTE (arch/x86/kvm/mmu/spte.h): v5.12 has the writable
# bits at PT_FIRST_AVAIL_BITS_SHIFT (10) and 11; 6.x moved them to 57/58 for EPT
# and uses bit 11 as SPTE_MMU_PRESENT_MASK.
SPTE_HOST_WRITEABLE_V5_12 = 1 << 10
SPTE_MMU_WRITEABLE_V5_12 = 1 << 11
SPTE_MMU_PRESENT_MASK = 1 << 11
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58


def make_spte(vm: Vm, pfn: int, writable: bool, prefetch: bool = False,
              level: int = PG_LEVEL_4K) -> int:
    """A guest-RAM leaf SPTE as ``make_spte`` (arch/x86/kvm/mmu/spte.c) builds it under EPT.

    ``level`` PG_LEVEL_2M adds PT_PAGE_SIZE_MASK (bit 7: "if (level > PG_LEVEL_4K)
    spte |= PT_PAGE_SIZE_MASK"); ``pfn`` is then the 2 MiB-aligned first pfn.

    EPT with A/D bits and without execute-only (``kvm_mmu_set_ept_masks``): R|X, W
    when writable; memtype WB with IPAT (``vmx_get_mt_mask``: RAM, no non-coherent
    DMA); the accessed bit unless prefetched; the dirty bit on a writable SPTE;
    host- and MMU-writable software bits (v5.12: bits 10/11; 6.x: 57/58, plus
    SPTE_MMU_PRESENT_MASK). ``writable`` stands for ``host_writable`` and the
    SPTE's write access alike (TDP maps with ACC_ALL).
    """
    modern = vm.core.kcfg.version.tuple >= (5, 13)  # EPT writable bits 57/58, MMU_PRESENT 11
    spte = ept_leaf(pfn, writable=writable, large=level > PG_LEVEL_4K) | VMX_EPT_IPAT_BIT
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
    W for a write); None is an EPT violation. Under a 2M SPTE the entry names the
    4 KiB subpage the hardware reaches (the leaf's pfn plus the gfn's index)."""
    raw = ept_spte_4k(vm.ept, gpa) if vm.ept.nr_pmd_leaves else vm.ept.get(gpa & ~(PAGE_SIZE - 1))
    if not raw:
        return None
    entry = EptEntry.decode(raw)
    if not entry.present or (write and not entry.flags & 0x2):
        return None
    return entry


KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    """arch/x86/include/asm/kvm_host.h: 4K pages per page of ``level`` (1, 512, 262144)."""
    return 1 << ((level - PG_LEVEL_4K) * 9)


def lpage_disallowed(vm: Vm, slot: Memslot, gfn: int, level: int) -> bool:
    """``lpage_info_slot(gfn, slot, level)->disallow_lpage`` != 0.

    Set by ``kvm_alloc_memslot_metadata`` (arch/x86/kvm/x86.c, v5.12; 6.18 the
    same): the first huge page of a slot whose ``base_gfn`` is not aligned to it,
    the last one when the slot's end is not, and every one when ``base_gfn`` and
    ``userspace_addr`` are not aligned alike. 6.8+ adds KVM_LPAGE_MIXED_FLAG
    (``kvm_arch_post_set_memory_attributes``) for a range whose gfns do not all
    have the same memory attributes (a VM with private memory); the hardened
    design does the same with its shared/private attribute array. Not modelled:
    write tracking (shadow paging only) and dirty logging (no slot flags).
    """
    n = KVM_PAGES_PER_HPAGE(level)
    if (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) & (n - 1):
        return True
    base = gfn & ~(n - 1)
    if base < slot.base_gfn or base + n > slot.base_gfn + slot.npages:
        return True  # linfo[0] or linfo[lpages - 1] of a slot that ends mid-page
    gmem = vm.gmem
    if gmem is not None:
        attrs = gmem.mem_attr_array
        private = KVM_MEMORY_ATTRIBUTE_PRIVATE
        if not (attrs.range_has(base, base + n, private, 0)
                or attrs.range_has(base, base + n, private, private)):
            return True  # KVM_LPAGE_MIXED_FLAG
    shared = vm.hardened_shared
    # the hardened design's KVM_LPAGE_MIXED_FLAG (docs/hardened.md, "THP")
    return shared is not None and vm.mem_protected and vm.protection is Protection.HARDENED \
        and not (shared.range_has(base, base + n, SHARED, 0)
                 or shared.range_has(base, base + n, SHARED, SHARED))


def host_pfn_mapping_level(vm: Vm, gfn: int, pfn: int, slot: Memslot) -> int:
    """The level the VMM's page tables map ``gfn``'s hva with.

    v5.12 ``host_pfn_mapping_level`` (arch/x86/kvm/mmu/mmu.c): a page that is not
    PageCompound is PG_LEVEL_4K without a walk; else ``lookup_address_in_mm``:
    PG_LEVEL_2M for a huge PMD, PG_LEVEL_4K for a PTE (a THP the host split is
    mapped by PTEs: 4K). 6.1 and 6.18 walk the host tables under
    ``local_irq_save`` without the PageCompound test (present huge PMD: 2M).
    The model's host maps no PUD leaves (no 1G).
    """
    if vm.core.kcfg.version.tuple < (5, 19) and not vm.core.pages.order[pfn]:
        return PG_LEVEL_4K  # !PageCompound(pfn_to_page(pfn))
    pmd = vm.mm.pgd.pmd_leaf(slot.gfn_to_hva(gfn))
    return PG_LEVEL_2M if pmd & _PAGE_PSE and pmd & _PAGE_PRESENT else PG_LEVEL_4K


def kvm_mmu_hugepage_adjust(vm: Vm, gfn: int, max_level: int, pfn: int) -> tuple[int, int]:
    """(level, pfn) of the SPTE a TDP fault at ``gfn`` installs.

    arch/x86/kvm/mmu/mmu.c v5.12 ``kvm_mmu_hugepage_adjust(vcpu, gfn, max_level, &pfn,
    huge_page_disallowed, &req_level)`` (which replaced 5.5's
    ``transparent_hugepage_adjust`` in 5.6, "Walk host page tables to find THP
    mappings"): 4K for an error or reserved pfn (the zero page) or a gfn outside
    a slot; ``max_level`` capped at ``max_huge_page_level`` and lowered while
    ``lpage_info`` disallows it (:func:`lpage_disallowed`); then
    ``min(host_pfn_mapping_level, max_level)``, and the pfn rounded down to that
    level (``VM_BUG_ON((gfn & mask) != (pfn & mask))``: a slot whose gfn and hva
    are aligned alike maps a THP's subpages in order). 6.18's
    ``kvm_mmu_hugepage_adjust(vcpu, fault)`` (``__kvm_mmu_max_mapping_level``:
    the same lpage loop, then ``host_pfn_mapping_level``) decides the same for a
    shared fault; a private fault skips the host walk and takes its level from
    the guest_memfd folio's order (order 0 in the model: 4K). Not modelled: the iTLB-multihit
    workaround (``huge_page_disallowed`` for exec faults: the model's guest
    fetches no instructions) and dirty logging.
    """
    if max_level == PG_LEVEL_4K or is_error_pfn(pfn) or not vm.mm.pgd.nr_pmd_leaves:
        return PG_LEVEL_4K, pfn  # no huge PMD in the VMM: host_pfn_mapping_level is 4K
    if vm.core.kcfg.version.tuple < (5, 19) and PageFlag(vm.core.pages[pfn], PG.reserved):
        return PG_LEVEL_4K, pfn  # kvm_is_reserved_pfn (gone from 6.x's check)
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return PG_LEVEL_4K, pfn
    max_level = min(max_level, KVM_MAX_HUGEPAGE_LEVEL)
    while max_level > PG_LEVEL_4K and lpage_disallowed(vm, slot, gfn, max_level):
        max_level -= 1
    if max_level == PG_LEVEL_4K:
        return PG_LEVEL_4K, pfn
    level = min(host_pfn_mapping_level(vm, gfn, pfn, slot), max_level)
    if level == PG_LEVEL_4K:
        return level, pfn
    mask = KVM_PAGES_PER_HPAGE(level) - 1
    assert (gfn & mask) == (pfn & mask), "VM_BUG_ON((gfn & mask) != (pfn & mask))"
    return level, pfn & ~mask


def install_spte(vm: Vm, gfn: int, level: int, spte: int) -> None:
    """``mmu_set_spte`` at ``level`` (arch/x86/kvm/mmu/mmu.c, v5.12 ``__direct_map``).

    A 2M SPTE replaces whatever the EPT PDE held: a 4K table's SPTEs are dropped
    ("If we overwrite a PTE page pointer with a 2MB PMD, unlink the parent of the
    now unreachable PTE"; the model keeps the table page allocated, as it keeps
    every EPT table page). A 4K SPTE under a 2M one first drops the large SPTE
    (``drop_large_spte``). Simplified: the nx_huge_pages ``disallowed_hugepage_adjust``
    (a present table keeps the fault at 4K on an affected CPU) is not modelled.
    """
    ept = vm.ept
    gpa = gfn << PAGE_SHIFT
    if level == PG_LEVEL_2M:
        base = gpa & ~((1 << (PAGE_SHIFT + 9)) - 1)
        if ept.pte_slot(base) is not None:
            ept.pmd_install_leaf_over_table(base)
        ept.set_pmd(base, spte)
        return
    if ept.nr_pmd_leaves and ept_spte(ept, gpa)[1] == PG_LEVEL_2M:
        ept.set_pmd(gpa, 0)  # drop_large_spte
    ept.set(gpa, spte)


def _td_add_range(vm: Vm, gfn: int, pfn: int, n: int) -> None:
    """:func:`_td_add_page` for each page of a huge SPTE (TDH.MEM.PAGE.AUG at 2M): one
    read and one MOVDIR64B write of the whole range when none of it is shared or
    already the TD's, else page by page."""
    if vm.td_keyid is None:
        return
    pfns = range(pfn, pfn + n)
    if vm.td_pages.isdisjoint(pfns) and \
            not any(lo < gfn + n and gfn < hi for lo, hi in vm.shared_ranges):
        hw = vm.core.hw
        content = hw.read(pfn << PAGE_SHIFT, n << PAGE_SHIFT, 0).data
        hw.write(pfn << PAGE_SHIFT, content, vm.td_keyid, WriteHow.MOVDIR64B)
        vm.td_pages.update(pfns)
        return
    for i in range(n):
        _td_add_page(vm, gfn + i, pfn + i)


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
    returns before ``kvm_release_pfn_clean``). ``__direct_map`` maps at the level
    :func:`kvm_mmu_hugepage_adjust` gives: 2M over a PMD-mapped THP (the pfn GUP
    returned, and the one ``kvm_protect_pfn`` saw, is the faulting 4 KiB subpage;
    the SPTE maps the whole THP). Simplified: no ``mmu_notifier_retry`` race (the
    RFC's own ``try_to_unmap`` bumps ``mmu_notifier_seq``, so a real first private
    fault returns RET_PF_RETRY and the retry maps; the end state is the same), a
    gfn outside every memslot is reported as -EFAULT where KVM takes an MMIO exit
    (KVM_EXIT_MMIO) to the VMM.
    """
    gfn = gpa >> PAGE_SHIFT
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return Outcome.error(errno.EFAULT, f"no memslot for gpa {gpa:#x} (an MMIO exit)")
    hva = slot.gfn_to_hva(gfn)
    protected = vm.mem_protected and vm.protection is not Protection.NONE
    hardened = protected and vm.protection is Protection.HARDENED
    private = hardened and not gfn_is_shared_hardened(vm, gfn)  # the design's private fault
    if private:
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
        level, map_pfn = kvm_mmu_hugepage_adjust(vm, gfn, KVM_MAX_HUGEPAGE_LEVEL, pfn)
        if private and level == PG_LEVEL_4K and not lpage_disallowed(vm, slot, gfn, PG_LEVEL_2M) \
                and hardened_private_2m(vm, gfn, pfn):  # a whole 2 MiB made private at once
            level, map_pfn = PG_LEVEL_2M, pfn & ~(KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) - 1)
        if level == PG_LEVEL_4K:
            _td_add_page(vm, gfn, pfn)
            host_pte = vm.mm.pgd.get(hva)
        else:  # a 2M SPTE over the THP: every subpage, not only the faulting one
            n = KVM_PAGES_PER_HPAGE(level)
            _td_add_range(vm, gfn & ~(n - 1), map_pfn, n)
            host_pte = vm.mm.pgd.pmd_leaf(hva)
        writable = write or (pte_present(host_pte) and bool(host_pte & _PAGE_RW)) \
            or bool(hardened and page and PageFlag(page, PG.guest_private))  # faulted in rw
        install_spte(vm, gfn, level, make_spte(vm, map_pfn, writable, level=level))
        if not protected and level == PG_LEVEL_4K:
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
