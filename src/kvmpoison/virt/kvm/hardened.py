"""The hardened design: the RFC's mechanism with each reviewed weakness fixed.

Not an upstream kernel and not a posted patch: a design (docs/hardened.md)
on the v6.18 kernel, where PTE markers exist. Private pages stay in the
VMM's address space, but

- protection is its own page flag (``PG_guest_private``) and its own PTE
  marker (``PTE_MARKER_GUEST_PRIVATE``, carrying the pfn), so PG_hwpoison,
  memory_failure, unpoison and soft-offline keep their meaning;
- each page is bound to a VM by a binding number that is never reused
  (``Vm.binding``), not by ``kvm->id``; a file's pages are bound to one VM
  (a second VM is refused with -EBUSY at KVM_SET_USER_MEMORY_REGION, an
  aliased memslot with -EEXIST);
- shared ranges are a per-gfn attribute array (no 32-range cap), and
  KVM_HC_MEM_UNSHARE (14, as in the 2020 RFC) takes pages back from every
  mapping;
- private pages are scrubbed (``tdx_clear_page``-style whole-page zero
  stores) before they return to the allocator, and when they leave a TD;
- a private gfn whose page went away (hole-punch, truncate) is a defined
  exit, KVM_EXIT_MEMORY_FAULT, never the old data and never a silent new
  page.
- a THP is split cleanly before one of its pages becomes private (a THP
  that cannot split refuses the fault), a whole converted 2 MiB is 512
  private pages under one 2M SPTE, and a mixed 2 MiB range maps 4K (E23).

The mm side of the design sits behind ``MmHooks.guest_private``; this module
is KVM's side: ``kvm_protect_pfn``'s hardened branch, the fault-in of a
private gfn, share and unshare, KVM's own (audited, owner-checked) access,
and the free-time scrub.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import (
    pmd_pfn,
    pte_none,
    pte_pfn_array,
    pte_present,
    pte_present_array,
)
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.fault import vma_lookup
from kvmpoison.mm.guest_private import guest_private_refault
from kvmpoison.mm.gup import FOLL, GUP_PIN_COUNTING_BIAS, get_user_pages
from kvmpoison.mm.mm_types import VM
from kvmpoison.mm.page import (
    PAGE_MAPPING_KSM,
    Page,
    PageArray,
    PageFlag,
    PageHWPoison,
    PageKsm,
    PageSwapBacked,
    SetPageFlag,
    get_page,
    lock_page,
    put_page,
    unlock_page,
)
from kvmpoison.mm.page_alloc import FreeHook
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.rmap import TTU, try_to_unmap, try_to_unmap_pages_guest_private
from kvmpoison.mm.swapops import (
    guest_private_entry_to_pfn,
    is_guest_private_entry,
    pte_to_swp_entry,
)
from kvmpoison.outcome import Outcome
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.virt.kvm.kvm_main import (
    KVM_PFN_ERR_FAULT,
    KVM_PFN_ERR_HWPOISON,
    Kvm,
    Memslot,
    Vm,
    copy_through_direct_map,
    is_error_pfn,
)
from kvmpoison.virt.kvm.mem_protected import first_mapping_vmas
from kvmpoison.virt.kvm.private_mem import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KvmExit,
)

KVM_HC_MEM_UNSHARE = 14  # the 2020 RFC's number ("[RFC 03/16]"); the 2021 RFCs dropped it
KVM_EINVAL = 22  # include/uapi/linux/kvm_para.h
U64 = (1 << 64) - 1
SHARED = 1  # the attribute value of a shared gfn in Vm.hardened_shared


def _PRIVATE_BITS(mem: PageArray) -> int:
    """PG_guest_private and PG_unevictable: what a private page carries."""
    return mem.mask(PG.guest_private) | mem.mask(PG.unevictable)


def gfn_is_shared_hardened(vm: Vm, gfn: int) -> bool:
    """The hardened ``gfn_is_shared``: one lookup in the attribute array, no mmu_lock scan."""
    assert vm.hardened_shared is not None
    return vm.hardened_shared.get(gfn) == SHARED


def memory_fault_exit(vm: Vm, gpa: int, why: str) -> Outcome:
    """``kvm_prepare_memory_fault_exit`` (arch/x86/kvm/mmu/mmu_internal.h, v6.18), the
    design's one way to refuse a private fault: KVM_RUN returns -EFAULT with
    KVM_EXIT_MEMORY_FAULT (flags PRIVATE), never a SIGBUS that looks like an MCE."""
    ex = KvmExit(KVM_EXIT_MEMORY_FAULT, gpa=gpa & ~(PAGE_SIZE - 1), size=PAGE_SIZE,
                 flags=KVM_MEMORY_EXIT_FLAG_PRIVATE)
    vm.hardened_exits.append(ex)
    return Outcome.error(errno.EFAULT, f"{ex.describe()} ({why}): KVM_RUN returns -EFAULT")


# -- ownership ----------------------------------------------------------------------------


def kvm_hardened_bind_memslot(vm: Vm, slot: Memslot, others: list[Memslot]) -> int:
    """The design's checks in ``__kvm_set_memory_region``, after upstream's own: 0 or -errno.

    Modelled on ``kvm_gmem_bind`` (virt/kvm/guest_memfd.c, v6.18), which
    refuses a file of another VM and overlapping bindings (both -EINVAL
    there). The design's errnos say which: an hva range that another memslot
    of this VM also maps is -EEXIST (an alias would let one page be both
    shared and private, E8), and a shmem file whose pages belong to another
    binding (a live VM that bound it, or private pages left by a dead one)
    is -EBUSY (E7, E37). The file is bound to this VM from then on.
    """
    lo, hi = slot.userspace_addr, slot.userspace_addr + (slot.npages << PAGE_SHIFT)
    for s in others:
        if lo < s.userspace_addr + (s.npages << PAGE_SHIFT) and s.userspace_addr < hi:
            return -errno.EEXIST
    kvm = vm.kvm
    inodes = [v.vm_file.f_inode for v in vm.mm.vmas
              if v.vm_start < hi and lo < v.vm_end and v.vm_file is not None
              and v.vm_file.f_inode.kind == "shmem"]
    for inode in inodes:
        if _file_bound_elsewhere(vm, inode):
            return -errno.EBUSY
    for inode in inodes:
        kvm.hardened_file_owner[inode.ino] = vm.binding
    return 0


def _file_bound_elsewhere(vm: Vm, inode: object) -> bool:
    kvm = vm.kvm
    ino = getattr(inode, "ino")  # noqa: B009 - an mm Inode; kvm_main does not import mm.file
    owner = kvm.hardened_file_owner.get(ino)
    if owner is not None and owner != vm.binding and any(
            v.binding == owner and not v.dead for v in kvm.vms):
        return True
    mapping = getattr(inode, "mapping", None)
    if mapping is None:
        return False
    cached = mapping.pages[mapping.pages >= 0]
    owners = kvm.hardened_owner[cached]
    return bool(((owners != kvm.NO_BINDING) & (owners != vm.binding)).any())


# -- protection ---------------------------------------------------------------------------


def _protect_one(vm: Vm, pfn: int) -> None:
    """Make ``pfn`` private to ``vm``: PG_guest_private, the owner binding, every host
    PTE a guest-private marker (``try_to_unmap(TTU_IGNORE_MLOCK)``), off the LRU."""
    core = vm.core
    page = core.pages[pfn]
    SetPageFlag(page, PG.guest_private)
    SetPageFlag(page, PG.unevictable)  # mapping_unevictable-like: reclaim never picks it
    vm.kvm.hardened_owner[pfn] = vm.binding
    try_to_unmap(page, TTU.IGNORE_MLOCK)


def split_thp_for_private(vm: Vm, pfn: int) -> str | None:
    """Split the THP that ``pfn`` is a subpage of, cleanly, before it becomes private:
    None (``pfn`` is an order-0 page now), or why not (nothing changed).

    The design's answer to the RFC's "THP support is left as a TODO"
    (docs/hardened.md, "THP"): ``split_huge_page`` (mm/huge_memory.c, v6.18
    ``split_folio``) first splits the huge PMD in every mapping (its
    ``unmap_folio`` is ``try_to_unmap(TTU_SPLIT_HUGE_PMD)``), then the compound
    page, so the protected page is an order-0 page with a PTE of its own in
    every mm, and every later free and scrub is per 4 KiB page. The split
    fails with -EBUSY while anything holds a reference beyond the mappings and
    the caller's (a GUP pin, ``can_split_folio``); then the design refuses the
    private fault (KVM_EXIT_MEMORY_FAULT) before any flag, binding or marker
    is set, so no page is ever half-protected. A file or hugetlbfs page is
    refused by the caller's swap-backed test first (E24). Simplified: the
    kernel takes the folio lock around the split; the model is single-threaded.
    """
    core = vm.core
    mem = core.pages
    if not mem.order[pfn]:
        return None
    from kvmpoison.mm.huge_memory import split_huge_page  # mm.huge_memory imports rmap
    if split_huge_page(core, core.pages[pfn]) != 0:
        return "the THP cannot be split (split_huge_page: -EBUSY, a pin or an extra reference)"
    return None


def kvm_protect_pfn_hardened(vm: Vm, gfn: int, pfn: int) -> str | None:
    """The design's ``kvm_protect_pfn``: None (private to this VM now), or why not.

    Refused, each with KVM_EXIT_MEMORY_FAULT rather than the RFC's hwpoison
    SIGBUS: a page that is not swap-backed (file or hugetlbfs memory, E24),
    a page pinned for DMA (``page_maybe_dma_pinned``, E26; guest_memfd's
    in-place conversion refuses such a page too), a KSM page (the write
    fault KVM asks for breaks KSM first, so this is only a guard, E21), a
    page another binding owns (E5, E7, E38), a THP subpage whose THP cannot
    be split (:func:`split_thp_for_private`, E23). A real memory error is
    still a memory error: PageHWPoison gives KVM_PFN_ERR_HWPOISON to the caller.
    """
    core = vm.core
    page = core.pages[pfn]
    kvm = vm.kvm
    if core.pages.order[pfn]:  # a THP subpage (never the huge zero page: faulted in writable)
        if not PageSwapBacked(page):
            return "only anonymous and shmem pages can be private"
        why = split_thp_for_private(vm, pfn)
        if why is not None:
            return why
    lock_page(page)
    try:
        owner = int(kvm.hardened_owner[pfn])
        if owner == vm.binding and PageFlag(page, PG.guest_private):
            return None
        if owner != kvm.NO_BINDING:
            return "the page belongs to another VM"
        if not PageSwapBacked(page):
            return "only anonymous and shmem pages can be private"
        if PageKsm(page):
            return "a KSM page"
        if core.pages._refcount[pfn] >= GUP_PIN_COUNTING_BIAS:
            return "the page is pinned (page_maybe_dma_pinned)"
        _protect_one(vm, pfn)
        return None
    finally:
        unlock_page(page)


def _marker_pfn(vm: Vm, hva: int) -> int | None:
    """The pfn of a guest-private marker in the VMM's PTE at ``hva``, if that is what it holds."""
    pte = vm.mm.pgd.get(hva)
    if pte_none(pte) or pte_present(pte):
        return None
    core = vm.core
    entry = pte_to_swp_entry(pte, core.kcfg)
    if not is_guest_private_entry(entry, core.swap_types):
        return None
    return guest_private_entry_to_pfn(entry)


def hardened_faultin_pfn(vm: Vm, gpa: int, hva: int) -> int | Outcome:
    """``kvm_faultin_pfn`` for a private gfn of a protected VM (design): a pfn with a
    reference the caller drops, or the exit to return.

    KVM itself follows the guest-private marker (an owner-checked lookup, no
    FOLL_ALLOW_POISONED in GUP: no other GUP caller can ever get the page).
    A page not yet private is faulted in writable (so never the shared zero
    page, and KSM and COW are broken first, E21/E22) and protected. A gfn
    whose private page went away (hole-punch, truncate, munmap of the VMM's
    mapping) is a KVM_EXIT_MEMORY_FAULT until the guest converts it again:
    the guest never sees a silent new page where its data was (E36, E43).
    Device memory (a VM_IO/VM_PFNMAP mapping) cannot be private either: it is
    the same exit, before any struct page is looked at (E25).
    """
    gfn = gpa >> PAGE_SHIFT
    kvm = vm.kvm
    core = vm.core
    recorded = vm.hardened_private.get(gfn)
    pfn = _marker_pfn(vm, hva)
    if pfn is None and recorded is not None:
        pfn = guest_private_refault(vm.mm, hva)  # a zapped marker over a page still cached
    if pfn is not None:
        page = core.pages[pfn]
        if int(kvm.hardened_owner[pfn]) != vm.binding:
            return memory_fault_exit(vm, gpa, "the private page belongs to another VM")
        if recorded is not None and recorded != pfn:
            return memory_fault_exit(vm, gpa, "the gfn's private page went away")
        if PageHWPoison(page):
            return KVM_PFN_ERR_HWPOISON  # a real memory error, reported as one
        get_page(page)
        vm.hardened_private[gfn] = pfn
        return pfn
    if recorded is not None:
        return memory_fault_exit(vm, gpa, "the gfn's private page went away")
    vma = vma_lookup(vm.mm, hva)
    if vma is not None and vma.vm_flags & (VM.IO | VM.PFNMAP):
        # E25: device memory has no struct page to flag or bind: never private
        return memory_fault_exit(vm, gpa, "a VM_IO/VM_PFNMAP pfn (no struct page) cannot "
                                 "be private")
    pages: list[Page] = []
    got = get_user_pages(vm.mm, hva, 1, FOLL.HWPOISON | FOLL.WRITE, pages)
    if got != 1:
        return KVM_PFN_ERR_HWPOISON if got == -EHWPOISON else KVM_PFN_ERR_FAULT  # -EHWPOISON
    page = pages[0]
    why = kvm_protect_pfn_hardened(vm, gfn, page.pfn)
    if why is not None:
        put_page(page)
        return memory_fault_exit(vm, gpa, why)
    vm.hardened_private[gfn] = page.pfn
    return page.pfn


def is_hardened_error(pfn: int | Outcome) -> bool:
    return isinstance(pfn, Outcome) or is_error_pfn(pfn)


# -- share and unshare ---------------------------------------------------------------------


def _range(gfn: int, npages: int) -> tuple[int, int] | None:
    gfn &= U64
    npages &= U64
    end = gfn + npages
    if end > U64:
        return None
    return gfn, end


def _still_backs(vm: Vm, gfn: int, pfn: int) -> bool:
    """Is ``pfn`` still the private page KVM recorded for ``gfn``: bound to this VM, and
    at the gfn's place in the VMM's RAM (the page's index: its file offset, or the anon
    page's linear index)? A page punched out and freed may since back another gfn of the
    same VM, under the same binding: its old record is stale."""
    if int(vm.kvm.hardened_owner[pfn]) != vm.binding:
        return False
    hva = vm.gfn_to_hva(gfn)
    if hva is None or vm.mm is None or (vma := vma_lookup(vm.mm, hva)) is None:
        return True  # nothing maps the gfn to compare with: the binding decides
    return int(vm.core.pages.index[pfn]) == vma.vm_pgoff + ((hva - vma.vm_start) >> PAGE_SHIFT)


def _release_private(vm: Vm, gfns: list[int]) -> None:
    """Private gfns going shared: each page KVM protected for them stops being private
    (PG_guest_private and the binding go; a TD's page is scrubbed as it leaves the TD),
    and their SPTEs go. The VMM's markers become present PTEs at its next fault."""
    if not gfns:
        return
    core = vm.core
    kvm = vm.kvm
    mem = core.pages
    recorded = [(g, vm.hardened_private.pop(g)) for g in gfns]
    for g in gfns:
        vm.zap_gfn_range(g, g + 1)
    # a page gone since (freed, perhaps backing another gfn now) is not the gfn's to release
    ours = np.array([p for g, p in recorded if _still_backs(vm, g, p)], dtype=np.int64)
    kvm.hardened_owner[ours] = kvm.NO_BINDING
    mem.flags[ours] &= np.uint32(~_PRIVATE_BITS(mem) & 0xFFFF_FFFF)
    leaving = [p for p in ours.tolist() if p in vm.td_pages]
    if leaving:
        # TDH.MEM.PAGE.REMOVE + tdx_clear_page: zeros under KeyID 0, no TD data left
        core.hw.clear_frames(np.array(leaving, dtype=np.int64))
        vm.td_pages.difference_update(leaving)


def kvm_share_memory_hardened(vm: Vm, gfn: int, npages: int) -> int:
    """KVM_HC_MEM_SHARE(gfn, npages) in the design: 0, or -KVM_EINVAL for a range that wraps.

    The range is stored in a per-gfn attribute array (as KVM_SET_MEMORY_ATTRIBUTES
    stores into ``mem_attr_array``), so any number of ranges fit (E9); the
    private pages KVM recorded in it are released (:func:`_release_private`).
    """
    rng = _range(gfn, npages)
    if rng is None:
        return -KVM_EINVAL
    start, end = rng
    if start == end:
        return 0
    assert vm.hardened_shared is not None
    vm.hardened_shared.store(start, end, SHARED)
    gone = sorted(g for g in vm.hardened_private if start <= g < end)
    _release_private(vm, gone)
    return 0


def kvm_unshare_memory_hardened(vm: Vm, gfn: int, npages: int) -> int:
    """KVM_HC_MEM_UNSHARE(gfn, npages) (14, as the 2020 RFC numbered it): 0 or -KVM_EINVAL.

    The range becomes private again (E10); a private gfn whose page went away
    (hole-punch, truncate) is accepted afresh; its SPTEs are zapped, and every
    page the VMM maps there now is protected at once: PG_guest_private,
    this VM's binding, and an rmap walk that turns every present PTE in
    every mm into a guest-private marker (vectorised over one VMA's pages;
    a page pinned, KSM-merged, not swap-backed or owned elsewhere is left
    for the next fault to refuse). A THP the range touches is split first
    (:func:`_split_thps`): a whole aligned 2 MiB becomes 512 private order-0
    pages under 512 markers, which KVM maps with one 2M SPTE
    (:func:`hardened_private_2m`).
    """
    rng = _range(gfn, npages)
    if rng is None:
        return -KVM_EINVAL
    start, end = rng
    if start == end:
        return 0
    assert vm.hardened_shared is not None
    vm.hardened_shared.store(start, end, 0)
    vm.zap_gfn_range(start, end)
    kvm = vm.kvm
    # A private gfn whose page went away is accepted afresh: its next fault takes a new page.
    for g in [g for g, p in vm.hardened_private.items()
              if start <= g < end and not _still_backs(vm, g, p)]:
        del vm.hardened_private[g]
    core = vm.core
    mem = core.pages
    for slot in vm.memslots:
        lo, hi = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
        if lo >= hi:
            continue
        hva_lo, hva_hi = slot.gfn_to_hva(lo), slot.gfn_to_hva(hi)
        _split_thps(vm, hva_lo, hva_hi)
        for vma in [v for v in vm.mm.vmas if v.vm_start < hva_hi and hva_lo < v.vm_end]:
            a, b = max(hva_lo, vma.vm_start), min(hva_hi, vma.vm_end)
            pfns, gfns = _present_pfns(vm, slot, a, b)
            if not len(pfns):
                continue
            ok = (mem.flags[pfns] & np.uint32(mem.mask(PG.swapbacked))) != 0
            ok &= (mem.mapping[pfns] & PAGE_MAPPING_KSM) != PAGE_MAPPING_KSM
            ok &= mem._refcount[pfns] < GUP_PIN_COUNTING_BIAS
            ok &= kvm.hardened_owner[pfns] == kvm.NO_BINDING
            ok &= (mem.flags[pfns] & np.uint32(mem.mask(PG.hwpoison))) == 0
            pfns, gfns = pfns[ok], gfns[ok]
            if not len(pfns):
                continue
            mem.flags[pfns] |= np.uint32(_PRIVATE_BITS(mem))
            kvm.hardened_owner[pfns] = vm.binding
            try_to_unmap_pages_guest_private(mem, pfns, first_mapping_vmas(mem[int(pfns[0])]))
            vm.hardened_private.update(zip(gfns.tolist(), pfns.tolist(), strict=True))
    return 0


def _split_thps(vm: Vm, hva_lo: int, hva_hi: int) -> None:
    """Split every THP that a huge PMD of the VMM maps in [hva_lo, hva_hi), so each of
    its subpages can get a PTE marker of its own (the design's whole-2 MiB
    protection: 512 PTE markers, not a PMD marker, docs/hardened.md "THP").
    The huge zero page is left alone (it is never private). A THP that cannot
    split (a pin: -EBUSY) stays PMD-mapped and unprotected: its next private
    fault is refused (KVM_EXIT_MEMORY_FAULT), as for a pinned 4 KiB page."""
    mm = vm.mm
    if not mm.pgd.nr_pmd_leaves:
        return
    from kvmpoison.mm.huge_memory import is_huge_zero_pmd, pmd_trans_huge, split_huge_page
    core = vm.core
    for _haddr, pmd in mm.pgd.pmd_leaves(hva_lo, hva_hi):  # at most one per 2 MiB
        if not pmd_trans_huge(pmd) or is_huge_zero_pmd(core, pmd):
            continue
        page = core.pages[pmd_pfn(pmd)]
        get_page(page)  # split_huge_page's caller holds a reference
        split_huge_page(core, page)
        put_page(page)


def hardened_private_2m(vm: Vm, gfn: int, pfn: int) -> bool:
    """May the private fault at ``gfn`` (``pfn``, this VM's private page) map a 2M SPTE?

    The design's counterpart of 6.18's private fault taking its level from the
    guest_memfd folio (``kvm_gmem_max_mapping_level``): yes when every gfn of
    the aligned 2 MiB is private and KVM recorded it with ``pfn``'s neighbours
    in order (gfn ``base + i`` -> pfn ``base_pfn + i``, ``base_pfn`` 2 MiB-aligned,
    each PG_guest_private and bound to this VM, none PG_hwpoison), as a whole
    2 MiB conversion of a THP leaves them. The host's page tables hold 512 PTE
    markers there, so ``host_pfn_mapping_level`` would say 4K: the design's
    protection, not the VMM's mapping, is what the SPTE stands for here.
    """
    n = 512
    base, base_pfn = gfn & ~(n - 1), pfn - (gfn & (n - 1))
    if base_pfn & (n - 1):
        return False
    recorded = vm.hardened_private
    if recorded.get(base) != base_pfn or recorded.get(base + n - 1) != base_pfn + n - 1:
        return False  # the common case, without a walk over 512 gfns
    got = [recorded.get(g, -1) for g in range(base, base + n)]
    pfns = np.arange(base_pfn, base_pfn + n, dtype=np.int64)
    if got != pfns.tolist():
        return False
    mem = vm.core.pages
    flags = mem.flags[pfns]
    return bool((vm.kvm.hardened_owner[pfns] == vm.binding).all()
                and (flags & np.uint32(mem.mask(PG.guest_private))).all()
                and not (flags & np.uint32(mem.mask(PG.hwpoison))).any())


def _present_pfns(vm: Vm, slot: Memslot, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(pfns, gfns) of the present, normal PTEs of the VMM in [a, b)."""
    core = vm.core
    pfns: list[np.ndarray] = []
    gfns: list[np.ndarray] = []
    for chunk in vm.mm.pgd.chunks(a, b):
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        present = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        if not present.any():
            continue
        pfns.append(pte_pfn_array(ptes[present]).astype(np.int64))
        gfns.append(slot.base_gfn + ((chunk.addr[present] - slot.userspace_addr) >> PAGE_SHIFT))
    if not pfns:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(pfns), np.concatenate(gfns).astype(np.int64)


# -- KVM's own access ---------------------------------------------------------------------


def copy_guest_page_hardened(vm: Vm, gpa: int, hva: int, n: int,
                             data: bytes | None) -> bytes | int:
    """``copy_from_guest``/``copy_to_guest`` for a private gfn (design): bytes, b"" or -errno.

    Owner-checked (the page's binding must be this VM's) and audited (each
    access is logged in ``vm.hardened_audit``). A TD's private page is never
    touched by KVM (-EFAULT: the host has no key to it, as Sean asked, E30);
    a plain-KVM guest's private page is copied through the direct map, as
    the RFC's prototype needs for emulation.
    """
    got = hardened_faultin_pfn(vm, gpa, hva & ~(PAGE_SIZE - 1))
    op = "read" if data is None else "write"
    if isinstance(got, Outcome) or is_error_pfn(got):
        vm.hardened_audit.append((op, gpa, "refused: no private page of this VM"))
        return -errno.EFAULT
    pfn = got
    page = vm.core.pages[pfn]
    try:
        if vm.td_keyid is not None:
            vm.hardened_audit.append((op, gpa, "refused: a TD's private memory"))
            return -errno.EFAULT
        vm.hardened_audit.append((op, gpa, "allowed"))
        return copy_through_direct_map(vm, pfn, hva, n, data)
    finally:
        put_page(page)


# -- the scrub on free --------------------------------------------------------------------


class _HardenedFreeHook:
    """The design's line in ``free_pages_prepare`` (mm/page_alloc.c): a PG_guest_private
    page is scrubbed (whole-page zero stores under KeyID 0, as ``tdx_clear_page`` does
    with MOVDIR64B, so no TD line and no guest data is left), loses its flag and its
    binding, and leaves every TD's page set. It sees every page of a freed block
    (``free_pages_prepare(page, order)`` would walk all ``1 << order``), not only
    the head as RFC v2's ``kvm_unpoison_page`` did. A page with a real memory error is not
    scrubbed (the allocator withholds it anyway, and a MOVDIR64B would hide the
    error)."""

    __slots__ = ("kvm",)

    def __init__(self, kvm: Kvm):
        self.kvm = kvm

    def __call__(self, pfns: np.ndarray) -> None:
        kvm = self.kvm
        mem = kvm.core.pages
        private = pfns[(mem.flags[pfns] & np.uint32(mem.mask(PG.guest_private))) != 0]
        if not len(private):
            return
        healthy = private[(mem.flags[private] & np.uint32(mem.mask(PG.hwpoison))) == 0]
        if len(healthy):
            kvm.core.hw.clear_frames(np.asarray(healthy, dtype=np.int64))
            kvm.hardened_scrubbed += len(healthy)
        mem.flags[private] &= np.uint32(~_PRIVATE_BITS(mem)
                                        & 0xFFFF_FFFF)
        kvm.hardened_owner[private] = kvm.NO_BINDING
        gone = set(private.tolist())
        for vm in kvm.vms:
            vm.td_pages.difference_update(gone)


def kvm_hardened_free_hook(kvm: Kvm) -> FreeHook:
    return _HardenedFreeHook(kvm)
