"""The RFC itself: ``virt/kvm/mem_protected.c`` and its callers.

Follows RFCv2 13/13 (2021-04-16, kas/linux ``kvm-unmapped-poison``) and, for
``Protection.RFC_V1``, RFCv1 7/7's differences: protection inline in the
fault path with a ``VM_BUG_ON_PAGE`` for non-swap-backed pages, no owner
map, sharing clears PG_hwpoison directly, nothing is unpoisoned on free.

``kvm_protect_pfn`` poisons a page on its first private EPT fault:
lock_page, re-check ``gfn_is_shared``, ``TestSetPageHWPoison``, then
``try_to_unmap(TTU_IGNORE_MLOCK)`` turns every host PTE into a hwpoison
entry, and v2 records pfn -> kvm->id in ``kvm_pfn_map``.
"""

from __future__ import annotations

import numpy as np

from kvmpoison.arch.x86.pgtable import (
    pfn_pte_array,
    pte_none_array,
    pte_pfn_array,
    pte_present_array,
)
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PAGE_SHIFT,
    PTE_PFN_MASK,
    PTRS_PER_PTE,
)
from kvmpoison.kernel.range import add_range_with_merge, clean_sort_range
from kvmpoison.mm.fault import vma_lookup
from kvmpoison.mm.gup import FOLL, check_vma_flags
from kvmpoison.mm.memory import maybe_mkwrite, pfn_valid
from kvmpoison.mm.mm_types import VM, Vma
from kvmpoison.mm.page import (
    ClearPageHWPoison,
    Page,
    PageFlag,
    PageHWPoison,
    PageSwapBacked,
    TestSetPageHWPoison,
    lock_page,
    page_anon_vma,
    page_mapping,
    put_page,
    unlock_page,
)
from kvmpoison.mm.page_alloc import FreeHook
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.rmap import TTU, try_to_unmap, try_to_unmap_pages_hwpoison
from kvmpoison.mm.shmem import ShmemVmOps
from kvmpoison.outcome import Halt, Outcome
from kvmpoison.virt.kvm.kvm_main import (
    KVM_NR_SHARED_RANGES,
    Kvm,
    Protection,
    Vm,
    is_error_pfn,
)

KVM_HC_ENABLE_MEM_PROTECTED = 12
KVM_HC_MEM_SHARE = 13
KVM_FEATURE_MEM_PROTECTED = 16
U64 = (1 << 64) - 1  # hypercall arguments are unsigned long


def gfn_is_shared(vm: Vm, gfn: int) -> bool:
    """``gfn_is_shared`` (virt/kvm/mem_protected.c, RFCv2 13/13; kvm_main.c in v1 7/7).

    Linear scan of ``shared_ranges`` under ``mmu_lock``; the model counts the lock takings.
    """
    vm.mmu_lock_faults += 1
    return any(lo <= gfn < hi for lo, hi in vm.shared_ranges)


def kvm_protect_memory(vm: Vm) -> int:
    """KVM_HC_ENABLE_MEM_PROTECTED (virt/kvm/kvm_main.c, RFCv2 13/13; same in v1 7/7).

    ``mmap_write_lock_killable`` (-KVM_EINTR on a fatal signal: not modelled,
    the VMM is never killed while it runs a hypercall), ``mem_protected = true``,
    ``kvm_arch_flush_shadow_all`` (every SPTE of every memslot), 0.
    """
    vm.mem_protected = True
    vm.kvm_mmu_zap_all()  # kvm_arch_flush_shadow_all
    return 0


def kvm_protect_pfn(vm: Vm, gfn: int, pfn: int) -> bool:
    """Make ``pfn`` private to ``vm``; False means "signal the vCPU".

    ``kvm_protect_pfn`` (virt/kvm/mem_protected.c, RFCv2 13/13): shared gfn or
    the zero pfn: true; !PageSwapBacked: false; then under the page lock,
    re-check shared, ``TestSetPageHWPoison`` + ``try_to_unmap(TTU_IGNORE_MLOCK)``
    + ``xa_store`` (its failure ignored), or for a page already poisoned
    whether ``kvm_pfn_map`` holds this VM's id. RFC v1 does this inline in
    ``direct_page_fault`` (:func:`_kvm_protect_pfn_v1`). Neither checks ``pfn_valid``:
    a VM_PFNMAP pfn (device memory, ``hva_to_pfn_remapped``) has no struct page,
    and the first access to it oopses (:func:`_struct_page_oops`, E25).
    """
    core = vm.core
    if gfn_is_shared(vm, gfn):
        return True
    if not pfn_valid(core, pfn):
        _struct_page_oops(pfn)  # pfn_to_page without pfn_valid (E25)
    page = core.pages[pfn]
    if vm.protection is Protection.RFC_V1:
        return _kvm_protect_pfn_v1(vm, gfn, page)
    if pfn == core.zero_pfn:
        return True
    if not PageSwapBacked(page):
        return False  # only anon and shmem pages can be protected
    lock_page(page)
    try:
        if gfn_is_shared(vm, gfn):
            return True
        if not TestSetPageHWPoison(page):
            try_to_unmap(page, TTU.IGNORE_MLOCK)
            vm.kvm.kvm_pfn_map.store(pfn, vm.ident)  # xa_store; its -ENOMEM is ignored (E39)
            return True
        return vm.kvm.kvm_pfn_map.get(pfn) == vm.ident
    finally:
        unlock_page(page)


# x86-64 SPARSEMEM_VMEMMAP (4-level): struct page array at VMEMMAP_START, 64 bytes each.
VMEMMAP_START = 0xFFFF_EA00_0000_0000
SIZEOF_STRUCT_PAGE = 64


def _struct_page_oops(pfn: int) -> None:
    """What ``PageSwapBacked(pfn_to_page(pfn))`` (v2) or ``lock_page`` (v1) does for a pfn
    without struct page: ``pfn_to_page`` is ``vmemmap + pfn``, and a device pfn's slot
    lies in a vmemmap section nothing backs, so reading ``page->flags`` is a kernel page
    fault: an oops in the vCPU thread (the model halts as for a BUG)."""
    addr = VMEMMAP_START + pfn * SIZEOF_STRUCT_PAGE
    raise Halt(Outcome.panic(f"BUG: unable to handle page fault for address: {addr:#x} "
                             f"(kvm_protect_pfn: pfn_to_page({pfn:#x}) of a pfn without "
                             "struct page, no pfn_valid check)"))


def _kvm_protect_pfn_v1(vm: Vm, gfn: int, page: Page) -> bool:
    """RFCv1 7/7's block in ``direct_page_fault`` (arch/x86/kvm/mmu/mmu.c).

    ``lock_page``, ``VM_BUG_ON_PAGE(!PageSwapBacked && !PageReserved)``,
    re-check shared, ``TestSetPageHWPoison`` + ``try_to_unmap``. v1 has no
    zero-pfn test: the shared zero page (PageReserved) is poisoned like any
    other when a private gfn of anonymous guest RAM was only ever read.
    """
    lock_page(page)
    try:
        if not PageSwapBacked(page) and not PageFlag(page, PG.reserved):
            raise Halt(Outcome.panic(f"kernel BUG: VM_BUG_ON_PAGE(!PageSwapBacked) pfn "
                                     f"{page.pfn:#x} (RFC v1 direct_page_fault)"))
        if gfn_is_shared(vm, gfn):
            return True
        if not TestSetPageHWPoison(page):
            try_to_unmap(page, TTU.IGNORE_MLOCK)
        return True
    finally:
        unlock_page(page)


def __kvm_share_memory(vm: Vm, start: int, end: int) -> None:
    """``__kvm_share_memory`` (virt/kvm/mem_protected.c, RFCv2 13/13; inline in v1's
    ``kvm_share_memory``): WARN_ON_ONCE when all 32 ranges are used, then
    ``add_range_with_merge`` + ``clean_sort_range`` under ``mmu_lock``."""
    if len(vm.shared_ranges) >= KVM_NR_SHARED_RANGES:
        vm.core.warn(f"__kvm_share_memory: all {KVM_NR_SHARED_RANGES} shared ranges in use "
                     f"(gfn {start:#x}..{end:#x})")
    add_range_with_merge(vm.shared_ranges, KVM_NR_SHARED_RANGES, start, end)
    clean_sort_range(vm.shared_ranges)


def kvm_share_pfn(vm: Vm, pfn: int) -> None:
    """``kvm_share_pfn`` (virt/kvm/mem_protected.c, RFCv2 13/13): under the page lock, if
    ``kvm_pfn_map`` holds this VM's id, ``xa_erase`` and ``ClearPageHWPoison``."""
    page = vm.core.pages[pfn]
    lock_page(page)
    if vm.kvm.kvm_pfn_map.get(pfn) == vm.ident:
        vm.kvm.kvm_pfn_map.erase(pfn)
        ClearPageHWPoison(page)
    unlock_page(page)


def _mapped_hvas(vm: Vm, start: int, end: int) -> list[int]:
    """The hvas of gfns [start, end), in gfn order, that lie inside one of the VMM's VMAs."""
    out: list[int] = []
    for slot in sorted(vm.memslots, key=lambda s: s.base_gfn):
        lo, hi = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
        for vma in sorted(vm.mm.vmas, key=lambda v: v.vm_start):
            first = slot.base_gfn + ((vma.vm_start - slot.userspace_addr) >> PAGE_SHIFT)
            last = slot.base_gfn + ((vma.vm_end - slot.userspace_addr) >> PAGE_SHIFT)
            out.extend(slot.gfn_to_hva(g) for g in range(max(lo, first), min(hi, last)))
    return out


def kvm_share_memory(vm: Vm, gfn: int, npages: int, bulk: bool = True) -> int:
    """KVM_HC_MEM_SHARE(gfn, npages): ``kvm_share_memory`` (virt/kvm/kvm_main.c).

    RFCv2 13/13 and v1 7/7: 0 for ``npages == 0``; the range [gfn, gfn +
    npages) (unsigned long arithmetic: a range that wraps adds nothing and
    shares nothing) joins ``shared_ranges``; then each gfn's page,
    ``gfn_to_page`` (a write fault: it allocates and breaks CoW), is shared
    (v2: ``kvm_share_pfn``; v1: ``ClearPageHWPoison`` under the page lock)
    and put. Always 0. The model walks only gfns of memslots whose hva lies
    in a VMA of the VMM (``_mapped_hvas``): for the others ``gfn_to_page`` gives
    KVM_ERR_PTR_BAD_PAGE and the kernel skips them (a guest's huge
    ``npages`` is a long loop there, none here). ``bulk`` takes the vectorised
    path (:func:`_share_shmem_holes`) where it gives the same state; False
    walks every page (tests compare the two).
    """
    gfn &= U64
    npages &= U64
    if not npages:
        return 0
    end = (gfn + npages) & U64
    __kvm_share_memory(vm, gfn, end)
    hvas = _mapped_hvas(vm, gfn, end)
    i = 0
    while i < len(hvas):
        done = (_share_mapped_run(vm, hvas, i) or _share_shmem_holes(vm, hvas, i)) if bulk else 0
        if done:
            i += done
            continue
        _share_one(vm, hvas[i])
        i += 1
    return 0


def _share_one(vm: Vm, hva: int) -> None:
    """One iteration of ``kvm_share_memory``'s loop: ``gfn_to_page``, share, ``put_page``."""
    pfn = vm.hva_to_pfn(hva, write=True)  # gfn_to_page
    if is_error_pfn(pfn) or not pfn_valid(vm.core, pfn):
        return  # kvm_pfn_to_page: KVM_ERR_PTR_BAD_PAGE (a reserved pfn WARNs)
    page = vm.core.pages[pfn]
    if vm.protection is Protection.RFC_V2:
        kvm_share_pfn(vm, pfn)
    else:
        lock_page(page)
        ClearPageHWPoison(page)  # v1: no owner to check
        unlock_page(page)
    put_page(page)


def _share_shmem_holes(vm: Vm, hvas: list[int], i: int) -> int:
    """:func:`_share_one` over a run of ``hvas`` from ``i``, vectorised; returns its length
    (0: take the per-page path for ``hvas[i]``).

    The run is the common case of a guest's first share: consecutive pages of a
    shared writable shmem/memfd VMA whose PTE table exists, with none PTEs and
    holes in the page cache. There each ``gfn_to_page`` is a write fault that
    allocates a page (``shmem_getpage_gfp``), caches and maps it dirty
    (``finish_fault``), then GUP takes and ``put_page`` drops a reference, and
    the share clears PG_hwpoison (v1) or the owner entry it finds (v2). The
    run stays inside one PTE table; a missing table is built right after the
    run's first page is allocated, as that page's ``set_pte_at`` would. Pages
    are taken from the buddy allocator one at a time, in the order the faults
    would take them, so every pfn is the same.
    """
    mm = vm.mm
    core = vm.core
    vma = vma_lookup(mm, hvas[i])
    if vma is None or not isinstance(vma.vm_ops, ShmemVmOps):
        return 0
    flags = int(vma.vm_flags)
    if flags & _BULK_NEEDS != _BULK_NEEDS or flags & _BULK_REFUSES:
        return 0
    if check_vma_flags(vma, FOLL.WRITE):
        return 0
    slot = mm.pgd.pte_slot(hvas[i])
    col = (hvas[i] >> PAGE_SHIFT) & (PTRS_PER_PTE - 1)
    inode = vma.vm_ops.inode
    mapping = inode.mapping
    assert mapping is not None
    # The run: consecutive hvas, in this PTE table, inside the VMA and the file.
    first_index = vma.linear_page_index(hvas[i])
    limit = min(PTRS_PER_PTE - col, len(hvas) - i, (vma.vm_end - hvas[i]) >> PAGE_SHIFT,
                inode.nr_pages - first_index)
    n = 0
    while n < limit and hvas[i + n] == hvas[i] + (n << PAGE_SHIFT):
        n += 1
    if n == 0:
        return 0
    if slot is not None:  # no table: every PTE is none
        none = pte_none_array(core.ptes.rows[slot[0], col : col + n])
        n = len(none) if none.all() else int(np.argmin(none))
    cached = mapping.pages[first_index : first_index + n]
    if (cached >= 0).any():
        n = int(np.argmax(cached >= 0))
    if n == 0:
        return 0
    buddy = core.buddy
    if slot is None and buddy.nr_free < n + 4:
        return 0  # building the tables might fail: the per-page path meets that
    got: list[int] = []
    for _ in range(n):  # the faults' allocations, in their order (pfns must match)
        page = buddy.alloc_pages(0)
        if page is None:
            break  # out of memory: the per-page path takes over at this page
        got.append(page.pfn)
        if slot is None:
            # The first fault's set_pte_at builds the missing tables, after its page.
            slot = mm.pgd.pte_slot(hvas[i], alloc=True)
            assert slot is not None
    n = len(got)
    if n == 0 or slot is None:
        return 0
    row = slot[0]
    pfns = np.array(got, dtype=np.int64)
    mem = core.pages
    core.clear_pages(pfns)
    mem.flags[pfns] |= vma.vm_ops.shmem._page_flags()
    # add_to_page_cache grows the cache index by index: the same final length.
    length = len(mapping.pages)
    k = first_index
    while k < first_index + n:
        if k + 1 > length:
            length = max(k + 1, 2 * length)
        k = max(k + 1, length)
    mapping._grow(length)
    mapping.add_bulk(pfns, np.arange(first_index, first_index + n, dtype=np.int64))
    mem._refcount[pfns] += 1  # shmem_fault's get_page, which the PTE keeps
    mem.flags[pfns] |= np.uint32(mem.mask(PG.dirty))  # finish_fault: SetPageDirty
    mem._mapcount[pfns] += 1  # page_add_rmap
    mm.rss_shmem += n  # mm_counter_add
    prot = maybe_mkwrite(vma.vm_page_prot | _PAGE_ACCESSED | _PAGE_DIRTY, vma)
    store = core.ptes.rows
    store[row, col : col + n] = pfn_pte_array(pfns, prot)
    # GUP's reference is dropped by put_page; the page is fresh, so not locked or poisoned.
    if vm.protection is Protection.RFC_V2:
        pfn_map = vm.kvm.kvm_pfn_map
        owned = pfns[pfn_map.owner[pfns] == vm.ident]
        pfn_map.owner[owned] = pfn_map.NONE  # kvm_share_pfn: xa_erase
        mem.flags[owned] &= np.uint32(~mem.mask(PG.hwpoison) & 0xFFFF_FFFF)
    else:
        mem.flags[pfns] &= np.uint32(~mem.mask(PG.hwpoison) & 0xFFFF_FFFF)
    return n


def _share_mapped_run(vm: Vm, hvas: list[int], i: int) -> int:
    """:func:`_share_one` over a run of ``hvas`` from ``i`` whose pages are mapped already,
    vectorised; returns its length (0: take the per-page path for ``hvas[i]``).

    The run is a guest's later share (a reboot's) of what an earlier share faulted in:
    consecutive pages of a shared writable VMA inside one PTE table, every PTE present
    (not PROT_NONE), writable and not special, mapping an order-0 page with a reference,
    not locked and (v2) allowed to this VM. There ``gfn_to_page`` follows the PTE
    (``follow_page_pte``): GUP's reference, which ``put_page`` drops again (never the last
    one), and FOLL_TOUCH's ``SetPageDirty`` where the PTE is clean; then the share clears
    PG_hwpoison (v1) or the owner entry it finds (v2). The lock taken and dropped
    around it leaves nothing. A page outside these bounds ends the run there.
    """
    mm = vm.mm
    core = vm.core
    hva = hvas[i]
    vma = vma_lookup(mm, hva)
    if vma is None or mm.pgd.nr_pmd_leaves:
        return 0
    flags = int(vma.vm_flags)
    if flags & _BULK_NEEDS != _BULK_NEEDS or flags & _BULK_REFUSES:
        return 0
    v2_protected = vm.protection is Protection.RFC_V2 and vm.mem_protected
    if check_vma_flags(vma, _SHARE_FOLL[v2_protected]):
        return 0
    slot = mm.pgd.pte_slot(hva)
    col = (hva >> PAGE_SHIFT) & (PTRS_PER_PTE - 1)
    if slot is None or int(core.ptes.rows[slot[0], col]) & _MAPPED_RW != _MAPPED_RW:
        return 0  # not mapped (a hole for _share_shmem_holes, or a fault per page)
    limit = min(PTRS_PER_PTE - col, len(hvas) - i, (vma.vm_end - hva) >> PAGE_SHIFT)
    n = 0
    while n < limit and hvas[i + n] == hva + (n << PAGE_SHIFT):
        n += 1
    ptes = core.ptes.rows[slot[0], col : col + n]
    ok = (ptes & np.uint64(_MAPPED_RW | _PAGE_SPECIAL)) == np.uint64(_MAPPED_RW)
    mem = core.pages
    pfns = ((ptes & np.uint64(PTE_PFN_MASK)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    ok &= pfns < mem.nr_pages
    pfns = np.where(ok, pfns, 0)
    ok &= (mem.order[pfns] == 0) & (mem._refcount[pfns] > 0) \
        & ((mem.flags[pfns] & np.uint32(mem.m_locked)) == 0)
    owner = vm.kvm.kvm_pfn_map.owner
    if v2_protected:  # kvm_page_allowed
        ok &= ((mem.flags[pfns] & np.uint32(mem.m_hwpoison)) == 0) | (owner[pfns] == vm.ident)
    n = len(ok) if ok.all() else int(np.argmin(ok))
    if n == 0:
        return 0
    pfns, ptes = pfns[:n], ptes[:n]
    clean = pfns[(ptes & np.uint64(_PAGE_DIRTY)) == 0]
    mem.flags[clean] |= np.uint32(mem.mask(PG.dirty))  # FOLL_TOUCH on a write
    if vm.protection is Protection.RFC_V2:  # kvm_share_pfn
        pfns = pfns[owner[pfns] == vm.ident]
        owner[pfns] = vm.kvm.kvm_pfn_map.NONE
    mem.flags[pfns] &= np.uint32(~mem.m_hwpoison & 0xFFFF_FFFF)
    return n


_MAPPED_RW = _PAGE_PRESENT | _PAGE_RW  # present (so not PROT_NONE: the pfn is not inverted)
# get_user_pages' flags in hva_to_pfn(write=True), by v2_protected
_SHARE_FOLL = {p: FOLL.HWPOISON | FOLL.WRITE | FOLL.GET | FOLL.TOUCH
               | (FOLL.ALLOW_POISONED if p else FOLL(0)) for p in (False, True)}
_BULK_NEEDS = int(VM.SHARED | VM.WRITE)  # do_fault's shared fault, mapped writable
_BULK_REFUSES = int(VM.UFFD_MISSING | VM.UFFD_WP | VM.IO | VM.PFNMAP)


class _KvmUnpoisonPage:
    """``kvm_unpoison_page`` bound to one Kvm (an object, not a closure, so a copied
    machine's hook reaches the copy's Kvm)."""

    __slots__ = ("kvm",)

    def __init__(self, kvm: Kvm):
        self.kvm = kvm

    def __call__(self, pfns: np.ndarray) -> None:
        kvm = self.kvm
        mem = kvm.core.pages
        poisoned = pfns[(mem.flags[pfns] & np.uint32(mem.mask(PG.hwpoison))) != 0]
        order = mem.order[poisoned].astype(np.int64)
        if order.any():
            # free_pages_prepare(page, order) tests the block's first page only: a
            # compound page's tails keep PG_hwpoison and their kvm_pfn_map entry.
            poisoned = poisoned[(poisoned & ((np.int64(1) << order) - 1)) == 0]
        owned = poisoned[kvm.kvm_pfn_map.owner[poisoned] != kvm.kvm_pfn_map.NONE]
        kvm.kvm_pfn_map.owner[owned] = kvm.kvm_pfn_map.NONE  # xa_erase found an entry
        mem.flags[owned] &= np.uint32(~mem.mask(PG.hwpoison) & 0xFFFF_FFFF)


def kvm_unpoison_page_hook(kvm: Kvm) -> FreeHook:
    """The RFC v2 line in ``free_pages_prepare``: unpoison a freed protected page.

    RFCv2 13/13 calls ``kvm_unpoison_page(page)`` on the ``page`` that
    ``free_pages_prepare(page, order)`` frees: for a THP that is the head only.
    A protected tail page keeps PG_hwpoison and its ``kvm_pfn_map`` entry after
    its THP is freed (the RFC's THP TODO)."""
    return _KvmUnpoisonPage(kvm)


__all__ = ["KVM_FEATURE_MEM_PROTECTED", "KVM_HC_ENABLE_MEM_PROTECTED", "KVM_HC_MEM_SHARE",
           "PageHWPoison", "gfn_is_shared", "kvm_protect_memory", "kvm_protect_pfn",
           "kvm_share_memory", "kvm_unpoison_page_hook"]


def kvm_protect_range(vm: Vm, first_gfn: int, npages: int) -> int:
    """Bulk ``kvm_protect_pfn`` over the populated, private gfns of one memslot range.

    The model's vectorised path for protecting a whole range at once; the RFC
    itself protects page by page on each first EPT fault (``kvm_protect_pfn``).
    Same effect per page: PG_hwpoison set, every host PTE replaced with a
    hwpoison entry (holding a page reference), pfn -> kvm->id recorded.
    Returns the number of pages newly protected. It differs from the per-page
    path where that one would not run quietly: it skips the zero page and
    pages that are not swap-backed (v2 signals the vCPU for those; v1 poisons
    the zero page and hits VM_BUG_ON_PAGE for the others), and it counts no
    ``mmu_lock`` takings.
    """
    slot = vm.gfn_to_memslot(first_gfn)
    if slot is None or not slot.covers(first_gfn + npages - 1):
        raise ValueError(f"gfns {first_gfn:#x}+{npages} are not inside one memslot")
    core = vm.core
    mem = core.pages
    gfns = np.arange(first_gfn, first_gfn + npages, dtype=np.int64)
    private = np.ones(npages, dtype=bool)
    for lo, hi in vm.shared_ranges:
        private &= ~((gfns >= lo) & (gfns < hi))
    start = slot.gfn_to_hva(first_gfn)
    pfns = np.full(npages, -1, dtype=np.int64)
    for chunk in vm.mm.pgd.chunks(start, start + (npages << PAGE_SHIFT)):
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        present = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        idx = (chunk.addr[present] - start) >> PAGE_SHIFT
        pfns[idx] = pte_pfn_array(ptes[present])
    take = private & (pfns >= 0)
    pfns = pfns[take]
    swap_backed = (mem.flags[pfns] & np.uint32(mem.mask(PG.swapbacked))) != 0
    pfns = pfns[swap_backed]
    poisoned = (mem.flags[pfns] & np.uint32(mem.mask(PG.hwpoison))) != 0
    new = pfns[~poisoned]
    if not len(new):
        return 0
    mem.flags[new] |= np.uint32(mem.mask(PG.hwpoison))  # TestSetPageHWPoison
    first = mem[int(new[0])]
    vmas = list(first_mapping_vmas(first))
    try_to_unmap_pages_hwpoison(mem, new, vmas, core.hooks.hwpoison_entry_holds_ref)
    if vm.protection is Protection.RFC_V2:
        vm.kvm.kvm_pfn_map.store(new, vm.ident)
    return len(new)


def first_mapping_vmas(page: Page) -> list[Vma]:
    """The VMAs an rmap walk of ``page`` visits (its file's i_mmap or its anon_vma)."""
    av = page_anon_vma(page)
    if av is not None:
        return list(av.vmas)
    mapping = page_mapping(page)
    return list(getattr(mapping, "i_mmap", []))
