"""Page faults, zapping and fork-time copying of page tables.

Follows ``mm/memory.c``: ``handle_mm_fault`` -> ``handle_pte_fault`` ->
``do_anonymous_page`` / ``do_fault`` / ``do_swap_page`` / ``do_wp_page``
(v5.12, with the v6.18 differences: PTE markers and ``handle_pte_marker``,
the poison/guard marker copy rules of ``copy_nonpresent_pte``, and the
per-type ``zap_details`` rules of ``zap_nonpresent_ptes`` that replaced
v5.12's "a zap with details keeps every swap-type entry" in v5.18), and
the RFC's patches 10 and 11. Anonymous THP faults and zaps at the PMD
level go to :mod:`kvmpoison.mm.huge_memory`; hugetlb is not modelled.
Each function names what it simplifies.

Scalar functions handle one fault as the kernel does. ``zap_page_range``,
``copy_page_range`` and ``faultin_anon_bulk`` are vectorised over PTE chunks.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import (
    pfn_pte,
    pfn_pte_array,
    pte_modify,
    pte_none,
    pte_none_array,
    pte_pfn,
    pte_pfn_array,
    pte_present,
    pte_present_array,
    pte_protnone,
)
from kvmpoison.arch.x86.pgtable_64 import __swp_offset_array, __swp_type_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    PAGE_SHIFT,
    PAGE_SIZE,
    max_physmem_bits,
)
from kvmpoison.kconfig import KernelVersion
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.guest_private import guest_private_markers
from kvmpoison.mm.huge_memory import (
    __split_huge_pmd,
    __transparent_hugepage_enabled,
    copy_huge_pmd_range,
    deferred_split_ptes_unmapped,
    do_huge_pmd_anonymous_page,
    do_huge_pmd_wp_page,
    huge_pmd_set_accessed,
    pmd_trans_huge,
    prune_deferred_split_queue,
    zap_huge_pmd_range,
)
from kvmpoison.mm.mm_types import (
    FAULT_FLAG_WRITE_I,
    VM,
    VM_FAULT_0,
    VM_SHARED_I,
    VM_UFFD_MISSING_I,
    VM_WRITE_I,
    FaultFlag,
    MmStruct,
    Vma,
    VmFault,
    VmFaultInfo,
    vma_is_accessible,
    vma_is_anonymous,
)
from kvmpoison.mm.page import (
    Page,
    PageAnon,
    PageDirty,
    PageFlag,
    PageHWPoison,
    PageKsm,
    SetPageDirty,
    get_page,
    lock_page,
    page_count,
    page_mapcount,
    page_mapped,
    page_mapping,
    put_page,
    unlock_page,
)
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.rmap import (
    anon_vma_prepare,
    page_add_new_anon_rmap,
    page_add_rmap,
    page_remove_rmap,
)
from kvmpoison.mm.shmem_huge import do_set_pmd, filemap_map_pmd_window, thp_head_skipped
from kvmpoison.mm.swapops import (
    PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT,
    PteMarker,
    guest_private_entry_to_pfn,
    hwpoison_entry_to_pfn,
    is_hwpoison_entry,
    is_migration_entry,
    is_pte_marker_entry,
    make_pte_marker_entry,
    non_swap_entry,
    pte_marker_get,
    pte_to_swp_entry,
    swp_entry_to_pte,
    swp_offset,
)
from kvmpoison.mm.userfaultfd_k import UffdCtx, handle_userfault

if TYPE_CHECKING:
    from kvmpoison.mm.file import AddressSpace

IntArray = npt.NDArray[np.int64]


class BulkFault(Protocol):
    """Optional vectorised ``->fault`` for many page offsets of a file mapping."""

    def fault_bulk(self, vma: Vma, pgoffs: IntArray) -> tuple[IntArray, VmFault]: ...


def _anon_flags(core: MmCore, dirty: bool) -> np.uint32:
    flags = (PG.swapbacked, PG.uptodate, PG.lru) + ((PG.dirty,) if dirty else ())
    return np.uint32(core.pages.bits.mask(*flags))


def _map_new_anon(vmf: VmFaultInfo, page: Page, write: bool) -> None:
    """Map a freshly allocated anonymous page at the fault address (rmap, flags, rss, PTE)."""
    vma = vmf.vma
    core = vma.vm_mm.core
    page_add_new_anon_rmap(page, vma, vmf.address)
    core.pages.flags[page.pfn] |= _anon_flags(core, True)
    vma.vm_mm.rss_anon += 1
    vma.vm_mm.pgd.set(vmf.address, _mk_anon_pte(vma, page.pfn, write))


def vm_normal_page(vma: Vma, pte: int) -> Page | None:
    """mm/memory.c ``vm_normal_page`` (v5.12, x86's CONFIG_ARCH_HAS_PTE_SPECIAL): the page
    a present PTE maps, or None for a special mapping: the shared zero page, and every
    PTE ``remap_pfn_range`` wrote into a VM_PFNMAP/VM_IO VMA (``pte_special``). A pfn
    above ``highest_memmap_pfn`` has no struct page: ``print_bad_pte`` and None.
    """
    if pte & _PAGE_SPECIAL:
        return None
    pfn = pte_pfn(pte)
    if not pfn_valid(vma.vm_mm.core, pfn):
        return None  # print_bad_pte
    return vma.vm_mm.core.pages[pfn]


def pfn_valid(core: MmCore, pfn: int) -> bool:
    """``pfn_valid`` (include/linux/mmzone.h, SPARSEMEM, v5.12): a struct page exists for
    ``pfn``. The model's memmap covers DRAM and nothing else, and device memory
    (drivers/char/mem.py) sits in a 128 MiB section of its own above it."""
    return 0 <= pfn < core.pages.nr_pages


def remap_pfn_range(vma: Vma, addr: int, pfn: int, size: int, prot: int) -> int:
    """mm/memory.c ``remap_pfn_range`` (v5.12; 6.18 the same here): 0 or -errno.

    Maps ``[pfn, pfn + size)`` at ``addr`` with special PTEs (``pte_mkspecial``, so
    ``vm_normal_page`` finds no page and GUP refuses the VMA) and marks the VMA
    VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP. A COW mapping must be mapped whole
    and gets ``vm_pgoff = pfn``. No struct page is touched: no reference, no mapcount,
    no rss. Not modelled: ``track_pfn_remap`` (PAT memtype reservation).
    """
    if addr & (PAGE_SIZE - 1):
        return -errno.EINVAL
    size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    end = addr + size
    if (vma.vm_flags & (VM.SHARED | VM.MAYWRITE)) == VM.MAYWRITE:  # is_cow_mapping
        if addr != vma.vm_start or end != vma.vm_end:
            return -errno.EINVAL
        vma.vm_pgoff = pfn
    vma.vm_flags |= VM.IO | VM.PFNMAP | VM.DONTEXPAND | VM.DONTDUMP
    pgd = vma.vm_mm.pgd
    for i in range(size >> PAGE_SHIFT):  # remap_pte_range: BUG_ON(!pte_none(*pte))
        pgd.set(addr + (i << PAGE_SHIFT), pfn_pte(pfn + i, prot) | _PAGE_SPECIAL)
    return 0


def mm_counter_add(mm: MmStruct, page: Page, n: int) -> None:
    """``add_mm_counter(mm, mm_counter(page), n)`` (include/linux/mm.h, v5.12)."""
    if PageAnon(page):
        mm.rss_anon += n
    elif page.mem.flags[page.pfn] & page.mem.mask(PG.swapbacked):
        mm.rss_shmem += n
    else:
        mm.rss_file += n


# -- the fault path -------------------------------------------------------------------


def handle_mm_fault(vma: Vma, address: int, flags: FaultFlag) -> VmFault:
    """mm/memory.c ``handle_mm_fault`` -> ``__handle_mm_fault`` (v5.12; 6.18 the same).

    Resolves one fault at ``address``; returns the ``vm_fault_t`` bits (0 on
    success). The PMD level runs only when THP can be involved (a PMD leaf
    exists in this mm, or the VMA may get one); the PUD level and hugetlb are
    not modelled.
    """
    address &= ~(PAGE_SIZE - 1)
    vmf = VmFaultInfo(vma=vma, address=address, flags=flags, pgoff=vma.linear_page_index(address))
    if vma.vm_mm.pgd.nr_pmd_leaves or int(vma.vm_flags) & _VM_HUGEPAGE \
            or vma.vm_mm.core.thp.pmd_mode == "always":
        ret = __handle_mm_fault_pmd(vmf)
        if ret is not None:
            return ret
    return handle_pte_fault(vmf)


_VM_HUGEPAGE = int(VM.HUGEPAGE)


def __handle_mm_fault_pmd(vmf: VmFaultInfo) -> VmFault | None:
    """The PMD half of mm/memory.c ``__handle_mm_fault`` (v5.12; 6.18
    ``thp_vma_allowable_order`` for the check): a none PMD of an eligible anon VMA
    takes ``create_huge_pmd``; a huge PMD takes ``wp_huge_pmd`` on a write to a
    read-only PMD, else ``huge_pmd_set_accessed``. None means "go on at the PTE
    level" (VM_FAULT_FALLBACK, or no huge PMD). Not modelled: NUMA hinting on a
    PMD (``do_huge_pmd_numa_page``), file/DAX ``huge_fault``.
    """
    vma = vmf.vma
    pgd = vma.vm_mm.pgd
    if pgd.pmd_none(vmf.address):
        if vma_is_anonymous(vma) and not int(vma.vm_flags) & VM_SHARED_I \
                and __transparent_hugepage_enabled(vma):
            ret = do_huge_pmd_anonymous_page(vmf)
            if not ret & VmFault.FALLBACK:
                return ret
        return None
    pmd = pgd.pmd_leaf(vmf.address)
    if not pmd_trans_huge(pmd):
        return None
    if int(vmf.flags) & FAULT_FLAG_WRITE_I and not pmd & _PAGE_RW:
        if not vma_is_anonymous(vma):  # wp_huge_pmd: a file PMD is split, COW on the PTEs
            __split_huge_pmd(vma, vmf.address)
            return None
        ret = do_huge_pmd_wp_page(vmf, pmd)  # wp_huge_pmd
        return None if ret & VmFault.FALLBACK else ret
    return huge_pmd_set_accessed(vmf, pmd)


def handle_pte_fault(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``handle_pte_fault`` (v5.12): dispatch on the PTE's state."""
    mm = vmf.vma.vm_mm
    pte = mm.pgd.get(vmf.address)
    vmf.orig_pte = pte
    if pte_none(pte):
        return do_anonymous_page(vmf) if vma_is_anonymous(vmf.vma) else do_fault(vmf)
    if not pte_present(pte):
        return do_swap_page(vmf)
    if pte_protnone(pte) and vma_is_accessible(vmf.vma):
        return do_numa_page(vmf)
    entry = pte | _PAGE_ACCESSED
    if int(vmf.flags) & FAULT_FLAG_WRITE_I:
        if not pte & _PAGE_RW:
            return do_wp_page(vmf)
        entry |= _PAGE_DIRTY
    mm.pgd.set(vmf.address, entry)
    return VM_FAULT_0


def maybe_mkwrite(pte: int, vma: Vma) -> int:
    """include/linux/mm.h ``maybe_mkwrite`` (v5.12)."""
    return pte | _PAGE_RW if int(vma.vm_flags) & VM_WRITE_I else pte


def _mk_anon_pte(vma: Vma, pfn: int, write: bool) -> int:
    pte = pfn_pte(pfn, vma.vm_page_prot) | _PAGE_ACCESSED
    if write:
        pte = maybe_mkwrite(pte | _PAGE_DIRTY, vma)
    return pte


def do_anonymous_page(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_anonymous_page`` (v5.12; 6.18 the same here).

    A read maps the shared zero page, a write a new zeroed page. In a
    userfaultfd MISSING range the fault goes to ``handle_userfault`` first.
    """
    vma, mm = vmf.vma, vmf.vma.vm_mm
    core = mm.core
    vm_flags = int(vma.vm_flags)
    if vm_flags & VM_SHARED_I:
        return VmFault.SIGBUS  # shared anonymous memory is shmem-backed
    write = bool(int(vmf.flags) & FAULT_FLAG_WRITE_I)
    if vm_flags & VM_UFFD_MISSING_I and isinstance(vma.uffd_ctx, UffdCtx):
        return handle_userfault(vmf, vma.uffd_ctx)  # queues UFFD_EVENT_PAGEFAULT, sleeps
    if not write:
        # Map the shared zero page read-only; a later write copies it.
        zero = pfn_pte(core.zero_pfn, vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
        mm.pgd.set(vmf.address, zero)
        return VM_FAULT_0
    anon_vma_prepare(vma)
    page = core.buddy.alloc_pages(0)
    if page is None:
        return VmFault.OOM
    core.clear_pages(np.array([page.pfn], dtype=np.int64))
    _map_new_anon(vmf, page, True)
    return VM_FAULT_0


# What ends a fault without a page to map (a plain int: IntFlag arithmetic is slow here).
_VM_FAULT_NO_MAP = int(VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.OOM | VmFault.HWPOISON
                       | VmFault.NOPAGE | VmFault.RETRY)


def __do_fault(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``__do_fault`` (v5.12; v5.18+ for the eviction): call ``->fault``.

    A PageHWPoison page is dropped and the fault is VM_FAULT_HWPOISON. From
    v5.18 ("mm: invalidate hwpoison page cache page in fault path", so 6.18)
    the page is first unmapped everywhere and, if ``mapping_evict_folio``
    (6.1: ``invalidate_inode_page``)
    can drop it from the page cache (clean, no extra references), the fault
    is VM_FAULT_NOPAGE: the retry reads a fresh page.
    """
    ops = vmf.vma.vm_ops
    assert ops is not None
    ret = ops.fault(vmf)
    if int(ret) & _VM_FAULT_NO_MAP:
        return ret
    assert vmf.page is not None
    core = vmf.vma.vm_mm.core
    page = core.pages[vmf.page]
    if PageHWPoison(page):
        poisonret = VmFault.HWPOISON
        mapping = page_mapping(page)
        if core.kcfg.version.tuple >= (5, 18) and mapping is not None:  # 6.1 too
            index = int(core.pages.index[page.pfn])
            if page_mapped(page):
                _unmap_mapping_page(mapping, index)
            if mapping_evict_folio(mapping, page, index):
                poisonret = VmFault.NOPAGE
        put_page(page)
        vmf.page = None
        return poisonret
    return ret


def _unmap_mapping_page(mapping: AddressSpace, index: int) -> None:
    """``unmap_mapping_pages(mapping, index, 1, false)`` (mm/memory.c, v5.18+)."""
    for vma in list(mapping.i_mmap):
        if vma.vm_pgoff <= index < vma.vm_pgoff + vma.npages:
            addr = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
            zap_page_range(vma, addr, addr + PAGE_SIZE, ZapDetails(even_cows=False))


def mapping_evict_folio(mapping: AddressSpace, page: Page, index: int) -> bool:
    """mm/truncate.c ``mapping_evict_folio`` (6.x): drop a clean, otherwise unused page
    from the page cache; the caller keeps its own reference."""
    if PageDirty(page) or page_count(page) > 2:  # the cache's and the caller's
        return False
    if mapping.lookup(index) != page.pfn:
        return False
    mapping.delete_from_page_cache(index)
    put_page(page)  # the page cache's reference
    return True


def finish_fault(vmf: VmFaultInfo, write: bool) -> VmFault:
    """mm/memory.c ``finish_fault``/``do_set_pte`` (v5.12): map the page ``->fault``
    returned; its reference becomes the mapping's. A write marks it dirty
    (``fault_dirty_shared_page``).
    """
    vma, mm = vmf.vma, vmf.vma.vm_mm
    assert vmf.page is not None
    page = mm.core.pages[vmf.page]
    # a page-cache THP under a none PMD: do_set_pmd (v5.12 finish_fault)
    if page.mem.order[page.pfn] and mm.pgd.pmd_none(vmf.address) \
            and not do_set_pmd(vmf, page.pfn):
        if write:
            SetPageDirty(page)  # fault_dirty_shared_page
        return VM_FAULT_0
    pte = pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_ACCESSED
    if write:
        pte = maybe_mkwrite(pte | _PAGE_DIRTY, vma)
        SetPageDirty(page)
    page_add_rmap(page)
    mm_counter_add(mm, page, 1)
    mm.pgd.set(vmf.address, pte)
    return VM_FAULT_0


_FAULT_STOP = (VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.OOM | VmFault.HWPOISON
               | VmFault.NOPAGE | VmFault.RETRY)


def do_fault(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_fault`` (v5.12): read (with fault-around), COW or shared fault
    of a file VMA.
    """
    vma = vmf.vma
    if vma.vm_ops is None:
        return VmFault.SIGBUS
    write = bool(int(vmf.flags) & FAULT_FLAG_WRITE_I)
    if not write and do_fault_around(vmf):
        return VmFault.NOPAGE
    if write and not int(vma.vm_flags) & VM_SHARED_I:
        return do_cow_fault(vmf)
    ret = __do_fault(vmf)
    if int(ret) & _VM_FAULT_NO_MAP:
        return ret
    return finish_fault(vmf, write)


FAULT_AROUND_PAGES = 16  # fault_around_bytes = 64 KiB


def do_fault_around(vmf: VmFaultInfo) -> bool:
    """mm/memory.c ``do_fault_around`` + mm/filemap.c ``filemap_map_pages`` (v5.12).

    On a read fault of a shmem or regular-file VMA (the ``->map_pages``
    users), map the cached pages of the 64 KiB-aligned window around the
    address, within the VMA, the PTE table and EOF: each gets a reference, a
    mapcount and a PTE from ``vm_page_prot``. Pages that are not uptodate,
    locked or PageHWPoison (or, hardened, PG_guest_private), and PTEs that are
    not none, are skipped. True
    when the faulting address itself got mapped (VM_FAULT_NOPAGE).
    """
    vma = vmf.vma
    file = vma.vm_file
    if file is None or file.f_inode.kind not in ("shmem", "file"):
        return False
    if vma.vm_flags & VM.UFFD_WP and vma.vm_mm.core.kcfg.version.tuple >= (5, 19):
        return False  # uffd_disable_fault_around (v5.12: only for MINOR, not modelled)
    mapping = file.f_mapping
    if mapping is None:
        return False
    mm = vma.vm_mm
    mem = mm.core.pages
    nr = FAULT_AROUND_PAGES
    start = max(vmf.address & ~(nr * PAGE_SIZE - 1), vma.vm_start)
    end = min(start + nr * PAGE_SIZE, vma.vm_end,
              ((vmf.address >> 21) + 1) << 21)  # within one PTE table
    first = vma.linear_page_index(start)
    count = min((end - start) >> PAGE_SHIFT, file.f_inode.nr_pages - first)
    if count <= 0:
        return False
    pfns = mapping.lookup_range(first, count)
    skip = np.uint32(mem.mask(PG.locked) | mem.mask(PG.hwpoison)
                     | (mem.mask(PG.guest_private) if mm.core.hooks.guest_private else 0))
    need = np.uint32(mem.mask(PG.uptodate))
    cand = np.flatnonzero(pfns >= 0)
    if mm.pgd.nr_pmd_leaves or mem.order[pfns[cand]].any():  # filemap_map_pmd
        huge = filemap_map_pmd_window(vmf, pfns)
        if huge is not None:
            return huge
        cand = cand[~thp_head_skipped(mm.core, pfns[cand])]
    mapped_self = False
    for i in cand:
        pfn = int(pfns[i])
        addr = start + (int(i) << PAGE_SHIFT)
        flags = mem.flags[pfn]
        if flags & skip or not flags & need or not pte_none(mm.pgd.get(addr)):
            continue
        page = mem[pfn]
        get_page(page)
        page_add_rmap(page)
        mm_counter_add(mm, page, 1)
        mm.pgd.set(addr, pfn_pte(pfn, vma.vm_page_prot))
        mapped_self |= addr == vmf.address
    return mapped_self


def do_cow_fault(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_cow_fault`` (v5.12): a private write to a file page copies it
    into a new anonymous page, allocated before ``->fault`` runs.
    """
    vma, mm = vmf.vma, vmf.vma.vm_mm
    core = mm.core
    anon_vma_prepare(vma)
    new = core.buddy.alloc_pages(0)
    if new is None:
        return VmFault.OOM
    ret = __do_fault(vmf)
    if ret & _FAULT_STOP:
        put_page(new)
        return ret
    assert vmf.page is not None
    src = core.pages[vmf.page]
    core.copy_page(new.pfn, src.pfn)
    put_page(src)
    _map_new_anon(vmf, new, True)
    return VM_FAULT_0


def do_wp_page(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_wp_page`` (v5.12): reuse (``wp_page_reuse``), share-write
    (``wp_page_shared``) or copy (``wp_page_copy``) on a write to a present
    read-only PTE. v6.18's PageAnonExclusive reuse rule is not modelled.
    """
    vma, mm = vmf.vma, vmf.vma.vm_mm
    core = mm.core
    pte = vmf.orig_pte
    page = vm_normal_page(vma, pte)
    if vma.vm_flags & VM.SHARED and page is not None:
        mm.pgd.set(vmf.address, maybe_mkwrite(pte | _PAGE_DIRTY | _PAGE_ACCESSED, vma))
        SetPageDirty(page)
        return VmFault.WRITE
    if page is not None and PageAnon(page) and not PageKsm(page) and page_mapcount(page) == 1 \
            and page_count(page) == 1:
        # wp_page_reuse: the page is ours alone.
        mm.pgd.set(vmf.address, maybe_mkwrite(pte | _PAGE_DIRTY | _PAGE_ACCESSED, vma))
        return VmFault.WRITE
    anon_vma_prepare(vma)
    new = core.buddy.alloc_pages(0)
    if new is None:
        return VmFault.OOM
    if page is None:
        core.clear_pages(np.array([new.pfn], dtype=np.int64))
    else:
        core.copy_page(new.pfn, page.pfn)
    _map_new_anon(vmf, new, True)
    core.flush_tlb_range(mm, vmf.address, vmf.address + PAGE_SIZE)
    if page is not None:
        mm_counter_add(mm, page, -1)
        page_remove_rmap(page)
        put_page(page)
    return VmFault.WRITE


def do_numa_page(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_numa_page`` (v5.12): restore the protection of a NUMA-hinting
    (PROT_NONE) PTE in an accessible VMA. No NUMA migration is modelled.
    """
    mm = vmf.vma.vm_mm
    mm.pgd.set(vmf.address, pte_modify(vmf.orig_pte, vmf.vma.vm_page_prot) | _PAGE_ACCESSED)
    return VM_FAULT_0


def do_swap_page(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``do_swap_page`` (v5.12, with the RFC's hwpoison branch).

    Migration entries retry, hwpoison entries are VM_FAULT_HWPOISON (or, with
    RFCv1 7/7 / RFCv2 11/13, become a present PTE again once unpoisoned),
    v6.x PTE markers go to ``handle_pte_marker``, real swap entries to
    :func:`swapin`; anything else is ``print_bad_pte`` and SIGBUS.
    """
    mm = vmf.vma.vm_mm
    core = mm.core
    entry = pte_to_swp_entry(vmf.orig_pte, core.kcfg)
    types = core.swap_types
    if non_swap_entry(entry, types):
        if is_migration_entry(entry, types):
            return VmFault.RETRY  # migration_entry_wait; migration is not modelled
        if is_hwpoison_entry(entry, types):
            if core.hooks.do_swap_page_restores_unpoisoned:
                return _restore_unpoisoned(vmf, core.pages[hwpoison_entry_to_pfn(entry)])
            return VmFault.HWPOISON
        if is_pte_marker_entry(entry, types):
            return handle_pte_marker(vmf)
        return VmFault.SIGBUS  # print_bad_pte
    return swapin(vmf, swp_offset(entry))


def _restore_unpoisoned(vmf: VmFaultInfo, page: Page) -> VmFault:
    """RFCv2 11/13 (and RFCv1 7/7) in ``do_swap_page``: a hwpoison entry whose page
    got unpoisoned becomes a present PTE; the entry's page reference becomes
    the PTE's (no ``get_page``).
    """
    vma, mm = vmf.vma, vmf.vma.vm_mm
    lock_page(page)
    try:
        if mm.pgd.get(vmf.address) != vmf.orig_pte:
            return VM_FAULT_0
        if PageHWPoison(page):
            return VmFault.HWPOISON
        mm_counter_add(mm, page, 1)
        page_add_rmap(page)
        if not mm.core.hooks.hwpoison_entry_holds_ref:
            get_page(page)  # the entry held none; the PTE needs one
        mm.pgd.set(vmf.address, pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_ACCESSED)
        return VM_FAULT_0
    finally:
        unlock_page(page)


def handle_pte_marker(vmf: VmFaultInfo) -> VmFault:
    """mm/memory.c ``handle_pte_marker`` (v6.18): POISONED beats UFFD_WP; GUARD is
    always fatal (SIGSEGV). A uffd-wp marker is handled as a missing PTE.
    """
    entry = pte_to_swp_entry(vmf.orig_pte, vmf.vma.vm_mm.core.kcfg)
    marker = pte_marker_get(entry)
    if not marker:
        return VmFault.SIGBUS
    if marker & PteMarker.GUEST_PRIVATE:
        return handle_guest_private_marker(vmf, guest_private_entry_to_pfn(entry))
    if marker & PteMarker.POISONED:
        return VmFault.HWPOISON
    if marker & PteMarker.GUARD:
        return VmFault.SIGSEGV
    if marker & PteMarker.UFFD_WP:
        vmf.vma.vm_mm.pgd.set(vmf.address, 0)
        return handle_pte_fault(vmf)
    return VmFault.SIGBUS


def handle_guest_private_marker(vmf: VmFaultInfo, pfn: int) -> VmFault:
    """The hardened design's branch of ``handle_pte_marker`` (mm/memory.c, v6.18 + design).

    A host access to a guest-private page is VM_FAULT_SIGBUS: SIGBUS with
    BUS_ADRERR for userspace, -EFAULT for GUP; never VM_FAULT_HWPOISON, so no
    VMM takes it for a memory error, unless the page really has one
    (PG_hwpoison, set by memory_failure only), which is reported as such.
    Once the guest shared the page again (PG_guest_private clear), the marker
    becomes a present PTE, its page reference becoming the PTE's (RFCv2
    11/13's restore, for the marker).
    """
    mm = vmf.vma.vm_mm
    core = mm.core
    if not core.hooks.guest_private:
        return VmFault.SIGBUS
    page = core.pages[pfn]
    lock_page(page)
    try:
        if mm.pgd.get(vmf.address) != vmf.orig_pte:
            return VM_FAULT_0
        if PageHWPoison(page):
            return VmFault.HWPOISON  # a real memory error on the page: reported as one
        if PageFlag(page, PG.guest_private):
            return VmFault.SIGBUS
        mm_counter_add(mm, page, 1)
        page_add_rmap(page)
        mm.pgd.set(vmf.address, pfn_pte(page.pfn, vmf.vma.vm_page_prot) | _PAGE_ACCESSED)
        return VM_FAULT_0
    finally:
        unlock_page(page)


def swapin(vmf: VmFaultInfo, offset: int) -> VmFault:
    """The swap-entry half of ``do_swap_page`` (v5.12): read the slot into a new
    page, map it (writable and dirty on a write fault) and ``swap_free`` the
    slot. Simplified: no swap cache, so a slot shared by fork is read into a
    separate page per process; a slot with no data is a read error (SIGBUS).
    """
    core = vmf.vma.vm_mm.core
    data = core.swap_space.get(offset)
    if data is None:
        return VmFault.SIGBUS  # SWAPIN_ERROR
    page = core.buddy.alloc_pages(0)
    if page is None:
        return VmFault.OOM
    core.hw.write(page.pfn << PAGE_SHIFT, data, 0)
    core.swap_free(offset)  # a fork's other entries keep the slot
    _map_new_anon(vmf, page, bool(vmf.flags & FaultFlag.WRITE))
    return VM_FAULT_0


# -- bulk fault-in ---------------------------------------------------------------------


def faultin_anon_bulk(vma: Vma, start: int, end: int, write: bool) -> int:
    """Vectorised ``do_anonymous_page`` for the none PTEs of an anon VMA's range.

    Stops at the first PTE that is neither none nor already usable and returns
    its address (``end`` when the whole range is done); the caller takes the
    scalar fault path from there.
    """
    mm = vma.vm_mm
    core = mm.core
    anon_vma = anon_vma_prepare(vma)
    mapping = core.pages.registry.encode(anon_vma, True)
    for chunk in mm.pgd.chunks(start, end, alloc=True):
        store = core.ptes.rows  # building tables may have grown the store
        ptes = store[chunk.rows, chunk.cols]
        none = pte_none_array(ptes)
        usable = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_RW)) != 0 if write else True)
        bad = ~(none | usable)
        stop = int(np.argmax(bad)) if bad.any() else len(ptes)
        todo = np.flatnonzero(none[:stop])
        if len(todo):
            if not write:
                zero = pfn_pte(core.zero_pfn, vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
                store[chunk.rows[todo], chunk.cols[todo]] = np.uint64(zero)
            else:
                pfns = core.buddy.alloc_pages_bulk(len(todo))
                if len(pfns) < len(todo):
                    core.buddy.free_pages_bulk(_drop_refs(core, pfns))
                    return int(chunk.addr[todo[0]])
                core.clear_pages(pfns)
                pages = core.pages
                pages.mapping[pfns] = mapping
                pages.index[pfns] = ((chunk.addr[todo] - vma.vm_start) >> PAGE_SHIFT) + vma.vm_pgoff
                pages._mapcount[pfns] = 0
                pages.flags[pfns] |= _anon_flags(core, True)
                prot = maybe_mkwrite(vma.vm_page_prot | _PAGE_ACCESSED | _PAGE_DIRTY, vma)
                store[chunk.rows[todo], chunk.cols[todo]] = pfn_pte_array(pfns, prot)
                mm.rss_anon += len(pfns)
        if stop < len(ptes):
            return int(chunk.addr[stop])
    return end


def _drop_refs(core: MmCore, pfns: IntArray) -> IntArray:
    core.pages._refcount[pfns] = 0
    return pfns


# -- zap --------------------------------------------------------------------------------


def add_counts(counts: npt.NDArray[np.int32], idx: IntArray, delta: int) -> None:
    """``counts[idx] += delta`` where ``idx`` may repeat (fast path when it does not)."""
    s = np.sort(idx)
    if len(s) < 2 or (s[1:] != s[:-1]).all():
        counts[idx] += delta
    else:
        np.add.at(counts, idx, delta)


def _put_pages_bulk(core: MmCore, pfns: IntArray) -> None:
    """``put_page`` on many pages (pfns may repeat); frees those reaching zero."""
    if not len(pfns):
        return
    mem = core.pages
    heads = pfns & ~((np.int64(1) << mem.order[pfns].astype(np.int64)) - 1)
    uniq = sorted_unique(heads)
    if (mem._refcount[uniq] == 0).any():
        raise AssertionError("put_page on a free page")
    add_counts(mem._refcount, heads, -1)
    dead = uniq[mem._refcount[uniq] == 0]
    if len(dead):
        compound = mem.order[dead] != 0  # read before freeing rewrites ``order``
        core.buddy.free_pages_bulk(dead[~compound])
        if compound.any():
            core.buddy.free_compound_bulk(dead[compound])


def _swp_entry_fields(core: MmCore, ptes: npt.NDArray[np.uint64]) -> tuple[IntArray, IntArray]:
    mask = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP
    if core.kcfg.has_swp_exclusive:
        mask |= _PAGE_SWP_EXCLUSIVE
    clean = ptes & np.uint64(~mask & 0xFFFF_FFFF_FFFF_FFFF)
    return (__swp_type_array(clean).astype(np.int64), __swp_offset_array(clean).astype(np.int64))


@dataclass(frozen=True, slots=True)
class ZapDetails:
    """``struct zap_details``: what a zap with details leaves behind.

    ``even_cows`` is v5.12's ``check_mapping == NULL`` and v5.18+'s ``even_cows``
    (``unmap_mapping_pages(..., even_cows)``); ``drop_markers`` is
    ``zap_flags & ZAP_FLAG_DROP_MARKER`` (v5.19+, set only by ``unmap_vmas``).
    A zap without details (``None``: MADV_DONTNEED, v5.12's munmap/exit) is
    the kernel's ``details == NULL``.
    """

    even_cows: bool = False
    drop_markers: bool = False


def should_zap_cows(details: ZapDetails | None) -> bool:
    """mm/memory.c ``should_zap_cows`` (v5.18+): zap private COW pages and swap entries?"""
    return details is None or details.even_cows


def zap_drop_markers(details: ZapDetails | None) -> bool:
    """mm/memory.c ``zap_drop_markers`` (v6.x; ``zap_drop_file_uffd_wp`` in v5.19-6.1)."""
    return details is not None and details.drop_markers


def unmap_vmas(vma: Vma, start: int, end: int) -> int:
    """mm/memory.c ``unmap_vmas`` for one VMA (munmap, exit): zap everything.

    v5.12 passes no details; 6.1 and 6.18 pass ``ZAP_FLAG_DROP_MARKER`` and
    ``even_cows``, which also removes guard and uffd-wp markers.
    """
    details = None
    if vma.vm_mm.core.kcfg.version >= KernelVersion.V6_1:  # 5.19: ZAP_FLAG_DROP_MARKER
        details = ZapDetails(even_cows=True, drop_markers=True)
    return zap_page_range(vma, start, end, details)


def _nonpresent_kept(core: MmCore, vma: Vma, stypes: IntArray, soffs: IntArray,
                     details: ZapDetails | None) -> npt.NDArray[np.bool_]:
    """Which non-present entries ``zap_pte_range`` leaves in place.

    v5.12 (mm/memory.c ``zap_pte_range``): with any details every swap-type
    entry is skipped (``if (unlikely(details)) continue;``): swap, migration
    and hwpoison entries survive truncate and hole-punch alike. v5.18
    (Peter Xu, "mm: don't skip swap entry even if zap_details specified")
    decides per type; v6.18 ``zap_nonpresent_ptes``: swap, hwpoison and
    poison-marker entries go only when ``should_zap_cows`` (so a hole-punch,
    ``even_cows == false``, still keeps them); uffd-wp markers stay in file
    VMAs and guard markers everywhere unless ``zap_drop_markers``.
    """
    if details is None:
        keep = np.zeros(len(stypes), dtype=bool)
    elif core.kcfg.version < KernelVersion.V6_1:  # before 5.18
        return np.ones(len(stypes), dtype=bool)
    else:
        keep = np.zeros(len(stypes), dtype=bool)
    types = core.swap_types
    cows = should_zap_cows(details)
    if not cows:
        keep |= stypes < types.max_swapfiles
        if types.hwpoison is not None:
            keep |= stypes == types.hwpoison
        mem = core.pages
        for kind in (types.migration_read, types.migration_read_exclusive,
                     types.migration_write, types.device_write, types.device_read,
                     types.device_exclusive):
            if kind is None:
                continue
            sel = np.flatnonzero(stypes == kind)
            if len(sel):  # should_zap_folio: only anon folios stay
                pfns = soffs[sel] & ((1 << (max_physmem_bits(core.kcfg.x86_5level)
                                           - PAGE_SHIFT)) - 1)
                pfns = np.clip(pfns, 0, mem.nr_pages - 1)
                keep[sel] = (mem.mapping[pfns] & 1) != 0
    if types.pte_marker is not None:
        sel = np.flatnonzero(stypes == types.pte_marker)
        if len(sel):
            marker = soffs[sel]
            uffd = (marker & int(PteMarker.UFFD_WP)) != 0
            guard = ~uffd & ((marker & int(PteMarker.GUARD)) != 0)
            poison = ~uffd & ~guard & ((marker & int(PteMarker.POISONED)) != 0)
            drop = zap_drop_markers(details)
            keep[sel] = ((uffd & (not vma_is_anonymous(vma)) & (not drop))
                         | (guard & (not drop)) | (poison & (not cows)))
    return keep


def zap_page_range(vma: Vma, start: int, end: int, details: ZapDetails | None = None) -> int:
    """mm/memory.c ``unmap_page_range`` -> ``zap_pte_range`` over [start, end), vectorised.

    v5.12, with RFC patch 10 (``put_page`` of a zapped hwpoison entry's page
    when the design's entries hold a reference), and v6.18's
    ``zap_present_ptes``/``zap_nonpresent_ptes`` rules. Present pages lose
    their mapping (dirty file pages get PG_dirty) and the mapping's reference,
    freeing pages that reach zero; with details that do not ``even_cows``
    (v5.12: ``check_mapping`` set) anonymous COW pages stay mapped.
    Non-present entries follow :func:`_nonpresent_kept`. The mmu notifier
    covers the whole range either way. Not modelled: the uffd-wp marker that
    v6.x installs over a zapped file PTE of a uffd-wp VMA, swap-cache pages,
    ``MM_SWAPENTS``. Returns the pages unmapped.
    """
    mm = vma.vm_mm
    core = mm.core
    store = core.ptes.rows
    mem = core.pages
    types = core.swap_types
    cows = should_zap_cows(details)
    unmapped = 0
    if mm.pgd.nr_pmd_leaves:  # zap_pmd_range: whole huge PMDs go, partial ones split
        unmapped += zap_huge_pmd_range(vma, start, end)
    for chunk in mm.pgd.chunks(start, end):
        ptes = store[chunk.rows, chunk.cols]
        live = ~pte_none_array(ptes)
        if not live.any():
            continue
        present = pte_present_array(ptes) & live
        normal = present & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        clear = live.copy()
        if not cows and normal.any():  # should_zap_page: private COW copies stay
            idx = np.flatnonzero(normal)
            anon_cow = (mem.mapping[pte_pfn_array(ptes[idx])] & 1) != 0
            normal[idx[anon_cow]] = False
            clear[idx[anon_cow]] = False
        pfns = pte_pfn_array(ptes[normal])
        if len(pfns):
            dirty = (ptes[normal] & np.uint64(_PAGE_DIRTY)) != 0
            mem.flags[pfns[dirty]] |= np.uint32(mem.mask(PG.dirty))
            add_counts(mem._mapcount, pfns, -1)
            anon = (mem.mapping[pfns] & 1) != 0
            shmem = ~anon & ((mem.flags[pfns] & np.uint32(mem.mask(PG.swapbacked))) != 0)
            mm.rss_anon -= int(anon.sum())
            mm.rss_shmem -= int(shmem.sum())
            mm.rss_file -= int((~anon & ~shmem).sum())
            unmapped += len(pfns)
        swap = live & ~present
        if swap.any():
            idx = np.flatnonzero(swap)
            stypes, soffs = _swp_entry_fields(core, ptes[idx])
            kept = _nonpresent_kept(core, vma, stypes, soffs, details)
            clear[idx[kept]] = False
            gone_t, gone_o = stypes[~kept], soffs[~kept]
            if types.hwpoison is not None and core.hooks.hwpoison_entry_holds_ref:
                _put_pages_bulk(core, gone_o[gone_t == types.hwpoison])
            if types.pte_marker is not None and core.hooks.guest_private:
                # hardened: a guest-private marker holds its page like a present PTE;
                # any zap (munmap, exit, truncate, hole-punch) drops it and the reference
                gp = (gone_t == types.pte_marker) & ((gone_o & int(PteMarker.GUEST_PRIVATE)) != 0)
                _put_pages_bulk(core, gone_o[gp] >> PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT)
            for off in gone_o[gone_t < types.max_swapfiles]:  # free_swap_and_cache
                core.swap_free(int(off))
        store[chunk.rows[clear], chunk.cols[clear]] = 0
        if len(pfns) and mem.order[pfns].any():  # PTE-mapped THP subpages
            deferred_split_ptes_unmapped(core, pfns)
            _put_pages_bulk(core, pfns)
            prune_deferred_split_queue(core)
        else:
            _put_pages_bulk(core, pfns)
    core.flush_tlb_range(mm, start, end)
    return unmapped


# -- fork ------------------------------------------------------------------------------


def vma_needs_copy(dst: Vma, src: Vma) -> bool:
    """Shared file mappings are not copied: the child refaults them."""
    if src.vm_flags & (VM.HUGETLB | VM.PFNMAP | VM.MIXEDMAP):
        return True
    return src.anon_vma is not None


def _maybe_dma_pinned(core: MmCore, pfns: IntArray) -> npt.NDArray[np.bool_]:
    """``page_maybe_dma_pinned`` (refcount >= GUP_PIN_COUNTING_BIAS); v6.x anon folios only."""
    mem = core.pages
    heads = pfns & ~((np.int64(1) << mem.order[pfns].astype(np.int64)) - 1)
    pinned = mem._refcount[heads] >= 1024  # GUP_PIN_COUNTING_BIAS
    large = np.flatnonzero(mem.order[heads] > 1)  # compound_pincount (hpage_pincount)
    if len(large):
        pins = mem.compound_pincount
        pinned[large] = np.isin(heads[large], np.fromiter((h for h, n in pins.items() if n > 0),
                                                          dtype=np.int64, count=-1))
    if core.kcfg.version.tuple >= (5, 19):  # 6.1: page_try_dup_anon_rmap, anon only
        pinned &= (mem.mapping[heads] & 1) != 0  # folio_try_dup_anon_rmap_ptes
    return np.asarray(pinned, dtype=np.bool_)


def _copy_present_page(dst: Vma, addr: int, pfn: int) -> bool:
    """mm/memory.c ``copy_present_page`` (v5.9+): a page the parent may have pinned for
    DMA is copied into the child at fork, so the parent keeps the pinned page mapped
    writable (no COW that would move the parent off it). False when no page is free
    (the kernel fails fork with -ENOMEM; the model falls back to sharing).
    """
    core = dst.vm_mm.core
    new = core.buddy.alloc_pages(0)
    if new is None:
        return False
    core.copy_page(new.pfn, pfn)
    page_add_new_anon_rmap(new, dst, addr)
    core.pages.flags[new.pfn] |= _anon_flags(core, True)
    dst.vm_mm.rss_anon += 1
    dst.vm_mm.pgd.set(addr, _mk_anon_pte(dst, new.pfn, True))
    return True


def copy_page_range(dst: Vma, src: Vma) -> int:
    """mm/memory.c ``copy_page_range`` (v5.12, with RFC patch 10; v6.18 marker rules).

    Copy the parent's PTEs to the child; private pages become COW (both sides
    write-protected) except a pinned page, which the child gets a copy of
    (``copy_present_page``). hwpoison entries are copied (taking the RFC's
    reference when the design's entries hold one), swap entries share their
    slot (``swap_duplicate``), and v6.18 keeps only poison and guard markers
    (``copy_pte_marker``; uffd-wp markers need a uffd-wp child VMA, not
    modelled). The child's PTEs are old, and clean in a shared mapping.
    Simplified: ``mm->has_pinned`` is not consulted.

    Returns 0, or (the hardened design) -EPERM before anything is copied when
    the VMA holds a guest-private marker: ``copy_nonpresent_pte`` refuses to
    copy a guest's private page into a child, and ``dup_mmap`` fails the fork.
    """
    if not vma_needs_copy(dst, src):
        return 0
    src_mm, dst_mm = src.vm_mm, dst.vm_mm
    core = src_mm.core
    if core.hooks.guest_private and _holds_guest_private(src):
        return -errno.EPERM
    if src_mm.pgd.nr_pmd_leaves:  # copy_pmd_range: huge PMDs are shared (or split if pinned)
        copy_huge_pmd_range(dst, src)
    store = core.ptes.rows
    mem = core.pages
    types = core.swap_types
    cow = not src.vm_flags & VM.SHARED
    for chunk in src_mm.pgd.chunks(src.vm_start, src.vm_end):
        # Build the child's tables first: allocation may grow the PTE store.
        rows = np.empty(len(chunk.addr), dtype=np.int64)
        pmd_no = chunk.addr >> 21
        for i in sorted_unique(pmd_no):  # np.unique would import numpy.ma (13 ms) on first use
            slot = dst_mm.pgd.pte_slot(int(i) << 21, alloc=True)
            assert slot is not None
            rows[pmd_no == i] = slot[0]
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        live = ~pte_none_array(ptes)
        if not live.any():
            continue
        new = ptes.copy()
        present = pte_present_array(ptes) & live
        normal = present & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        if cow and normal.any():
            idx = np.flatnonzero(normal)
            pinned = idx[_maybe_dma_pinned(core, pte_pfn_array(ptes[idx]))]
            for i in pinned:
                if _copy_present_page(dst, int(chunk.addr[i]), int(pte_pfn(int(ptes[i])))):
                    normal[i] = False
                    live[i] = False  # the child's PTE is already set
        pfns = pte_pfn_array(ptes[normal])
        if len(pfns):
            anon = (mem.mapping[pfns] & 1) != 0
            add_counts(mem._mapcount, pfns, 1)
            heads = pfns & ~((np.int64(1) << mem.order[pfns].astype(np.int64)) - 1)
            add_counts(mem._refcount, heads, 1)
            shmem = ~anon & ((mem.flags[pfns] & np.uint32(mem.mask(PG.swapbacked))) != 0)
            dst_mm.rss_anon += int(anon.sum())  # rss[mm_counter(page)]++
            dst_mm.rss_shmem += int(shmem.sum())
            dst_mm.rss_file += int((~anon & ~shmem).sum())
            if cow:
                idx = np.flatnonzero(normal)[anon]
                wp = ptes[idx] & np.uint64(~_PAGE_RW & 0xFFFF_FFFF_FFFF_FFFF)
                new[idx] = wp
                store[chunk.rows[idx], chunk.cols[idx]] = wp  # parent loses write too
        # copy_present_pte: the child's PTE is old, and clean in a shared mapping
        young = np.uint64(_PAGE_ACCESSED | (0 if cow else _PAGE_DIRTY))
        new[present] &= ~young
        swap = live & ~present
        if swap.any():
            idx = np.flatnonzero(swap)
            stypes, soffs = _swp_entry_fields(core, ptes[idx])
            if types.pte_marker is not None:
                is_marker = stypes == types.pte_marker
                # copy_pte_marker: poison and guard markers always survive fork
                kept = soffs[is_marker] & int(PteMarker.POISONED | PteMarker.GUARD)
                marker_pte = np.array(
                    [swp_entry_to_pte(make_pte_marker_entry(PteMarker(int(m)), types)) if m else 0
                     for m in kept], dtype=np.uint64)
                new[idx[is_marker]] = marker_pte
            if types.hwpoison is not None and core.hooks.hwpoison_entry_holds_ref:
                poisoned = soffs[stypes == types.hwpoison]
                np.add.at(mem._refcount, poisoned, 1)
            for off in soffs[stypes < types.max_swapfiles]:  # swap_duplicate
                core.swap_duplicate(int(off))
        store[rows[live], chunk.cols[live]] = new[live]
    if cow:
        core.flush_tlb_range(src_mm, src.vm_start, src.vm_end)
    return 0


def _holds_guest_private(vma: Vma) -> bool:
    """Does any PTE of ``vma`` hold a PTE_MARKER_GUEST_PRIVATE entry (hardened)?"""
    return bool(len(guest_private_markers(vma.vm_mm, vma.vm_start, vma.vm_end)))

