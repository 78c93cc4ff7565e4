"""Page faults, zapping and fork-time copying of page tables.

Follows ``mm/memory.c``: ``handle_mm_fault`` -> ``handle_pte_fault`` ->
``do_anonymous_page`` / ``do_fault`` / ``do_swap_page`` / ``do_wp_page``
(v5.12, with the v6.18 differences: PTE markers and ``handle_pte_marker``,
and the poison/guard marker copy rules of ``copy_nonpresent_pte``).
THP and hugetlb faults are not modelled; every page is order-0.

Scalar functions handle one fault as the kernel does. ``zap_page_range``,
``copy_page_range`` and ``faultin_anon_bulk`` are vectorised over PTE chunks.
"""

from __future__ import annotations

from typing import Protocol

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
)
from kvmpoison.kconfig import KernelVersion
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.mm_types import (
    VM,
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
    PageHWPoison,
    PageKsm,
    SetPageDirty,
    get_page,
    lock_page,
    page_count,
    page_mapcount,
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
from kvmpoison.mm.swapops import (
    PteMarker,
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
    """The page a present PTE maps, or None for special mappings (the zero page)."""
    if pte & _PAGE_SPECIAL:
        return None
    return vma.vm_mm.core.pages[pte_pfn(pte)]


def mm_counter_add(mm: MmStruct, page: Page, n: int) -> None:
    if PageAnon(page):
        mm.rss_anon += n
    elif page.mem.flags[page.pfn] & page.mem.mask(PG.swapbacked):
        mm.rss_shmem += n
    else:
        mm.rss_file += n


# -- the fault path -------------------------------------------------------------------


def handle_mm_fault(vma: Vma, address: int, flags: FaultFlag) -> VmFault:
    """Resolve one fault at ``address``; returns the ``vm_fault_t`` bits (0 on success)."""
    address &= ~(PAGE_SIZE - 1)
    vmf = VmFaultInfo(vma=vma, address=address, flags=flags, pgoff=vma.linear_page_index(address))
    return handle_pte_fault(vmf)


def handle_pte_fault(vmf: VmFaultInfo) -> VmFault:
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
    if vmf.flags & FaultFlag.WRITE:
        if not pte & _PAGE_RW:
            return do_wp_page(vmf)
        entry |= _PAGE_DIRTY
    mm.pgd.set(vmf.address, entry)
    return VmFault(0)


def maybe_mkwrite(pte: int, vma: Vma) -> int:
    return pte | _PAGE_RW if vma.vm_flags & VM.WRITE else pte


def _mk_anon_pte(vma: Vma, pfn: int, write: bool) -> int:
    pte = pfn_pte(pfn, vma.vm_page_prot) | _PAGE_ACCESSED
    if write:
        pte = maybe_mkwrite(pte | _PAGE_DIRTY, vma)
    return pte


def do_anonymous_page(vmf: VmFaultInfo) -> VmFault:
    vma, mm = vmf.vma, vmf.vma.vm_mm
    core = mm.core
    if vma.vm_flags & VM.SHARED:
        return VmFault.SIGBUS  # shared anonymous memory is shmem-backed
    write = bool(vmf.flags & FaultFlag.WRITE)
    if vma.vm_flags & VM.UFFD_MISSING and vma.uffd_ctx is not None:
        return VmFault.SIGBUS  # handle_userfault: no monitor thread in the model
    if not write:
        # Map the shared zero page read-only; a later write copies it.
        zero = pfn_pte(core.zero_pfn, vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
        mm.pgd.set(vmf.address, zero)
        return VmFault(0)
    anon_vma_prepare(vma)
    page = core.buddy.alloc_pages(0)
    if page is None:
        return VmFault.OOM
    core.clear_pages(np.array([page.pfn], dtype=np.int64))
    _map_new_anon(vmf, page, True)
    return VmFault(0)


def __do_fault(vmf: VmFaultInfo) -> VmFault:
    ops = vmf.vma.vm_ops
    assert ops is not None
    ret = ops.fault(vmf)
    if ret & (VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.OOM | VmFault.HWPOISON
              | VmFault.NOPAGE | VmFault.RETRY):
        return ret
    assert vmf.page is not None
    page = vmf.vma.vm_mm.core.pages[vmf.page]
    if PageHWPoison(page):
        put_page(page)
        vmf.page = None
        return VmFault.HWPOISON
    return ret


def finish_fault(vmf: VmFaultInfo, write: bool) -> VmFault:
    """Map the page ``->fault`` returned; its reference becomes the mapping's."""
    vma, mm = vmf.vma, vmf.vma.vm_mm
    assert vmf.page is not None
    page = mm.core.pages[vmf.page]
    pte = pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_ACCESSED
    if write:
        pte = maybe_mkwrite(pte | _PAGE_DIRTY, vma)
        SetPageDirty(page)
    page_add_rmap(page)
    mm_counter_add(mm, page, 1)
    mm.pgd.set(vmf.address, pte)
    return VmFault(0)


def do_fault(vmf: VmFaultInfo) -> VmFault:
    vma = vmf.vma
    if vma.vm_ops is None:
        return VmFault.SIGBUS
    write = bool(vmf.flags & FaultFlag.WRITE)
    ret = __do_fault(vmf)
    if ret & (VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.OOM | VmFault.HWPOISON
              | VmFault.NOPAGE | VmFault.RETRY):
        return ret
    if write and not vma.vm_flags & VM.SHARED:
        return do_cow_fault(vmf)
    return finish_fault(vmf, write)


def do_cow_fault(vmf: VmFaultInfo) -> VmFault:
    """Private write to a file page: copy it into a new anonymous page."""
    vma, mm = vmf.vma, vmf.vma.vm_mm
    core = mm.core
    assert vmf.page is not None
    src = core.pages[vmf.page]
    anon_vma_prepare(vma)
    new = core.buddy.alloc_pages(0)
    if new is None:
        put_page(src)
        return VmFault.OOM
    core.copy_page(new.pfn, src.pfn)
    put_page(src)
    _map_new_anon(vmf, new, True)
    return VmFault(0)


def do_wp_page(vmf: VmFaultInfo) -> VmFault:
    """Write to a present read-only PTE: reuse, share-write, or copy (COW)."""
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
    """A NUMA-hinting (PROT_NONE) PTE in an accessible VMA: restore its protection."""
    mm = vmf.vma.vm_mm
    mm.pgd.set(vmf.address, pte_modify(vmf.orig_pte, vmf.vma.vm_page_prot) | _PAGE_ACCESSED)
    return VmFault(0)


def do_swap_page(vmf: VmFaultInfo) -> VmFault:
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
    """RFC patch 11: a hwpoison entry whose page got unpoisoned becomes a present PTE."""
    vma, mm = vmf.vma, vmf.vma.vm_mm
    lock_page(page)
    try:
        if mm.pgd.get(vmf.address) != vmf.orig_pte:
            return VmFault(0)
        if PageHWPoison(page):
            return VmFault.HWPOISON
        mm_counter_add(mm, page, 1)
        page_add_rmap(page)
        if not mm.core.hooks.hwpoison_entry_holds_ref:
            get_page(page)  # the entry held none; the PTE needs one
        mm.pgd.set(vmf.address, pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_ACCESSED)
        return VmFault(0)
    finally:
        unlock_page(page)


def handle_pte_marker(vmf: VmFaultInfo) -> VmFault:
    """v6.18: POISONED beats UFFD_WP; GUARD is always fatal."""
    marker = pte_marker_get(pte_to_swp_entry(vmf.orig_pte, vmf.vma.vm_mm.core.kcfg))
    if not marker:
        return VmFault.SIGBUS
    if marker & PteMarker.POISONED:
        return VmFault.HWPOISON
    if marker & PteMarker.GUARD:
        return VmFault.SIGSEGV
    if marker & PteMarker.UFFD_WP:
        vmf.vma.vm_mm.pgd.set(vmf.address, 0)
        return handle_pte_fault(vmf)
    return VmFault.SIGBUS


def swapin(vmf: VmFaultInfo, offset: int) -> VmFault:
    """Read a page back from the swap device and map it."""
    core = vmf.vma.vm_mm.core
    data = core.swap_space.pop(offset, None)
    if data is None:
        return VmFault.SIGBUS  # SWAPIN_ERROR
    page = core.buddy.alloc_pages(0)
    if page is None:
        return VmFault.OOM
    core.hw.write(page.pfn << PAGE_SHIFT, data, 0)
    _map_new_anon(vmf, page, bool(vmf.flags & FaultFlag.WRITE))
    return VmFault(0)


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
    add_counts(mem._refcount, heads, -1)
    uniq = sorted_unique(heads)
    if (mem._refcount[uniq] < 0).any():
        raise AssertionError("put_page on a free page")
    dead = uniq[mem._refcount[uniq] == 0]
    if len(dead):
        compound = mem.order[dead] != 0  # read before freeing rewrites ``order``
        core.buddy.free_pages_bulk(dead[~compound])
        assert mem.release is not None
        for head in dead[compound]:
            mem.release(mem[int(head)])


def _swp_entry_fields(core: MmCore, ptes: npt.NDArray[np.uint64]) -> tuple[IntArray, IntArray]:
    mask = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP
    if core.kcfg.has_swp_exclusive:
        mask |= _PAGE_SWP_EXCLUSIVE
    clean = ptes & np.uint64(~mask & 0xFFFF_FFFF_FFFF_FFFF)
    return (__swp_type_array(clean).astype(np.int64), __swp_offset_array(clean).astype(np.int64))


def zap_page_range(vma: Vma, start: int, end: int, keep_markers: bool = False,
                   even_cows: bool = True) -> int:
    """``unmap_page_range``/``zap_pte_range`` over [start, end), vectorised.

    Present pages lose their mapping (dirty file pages get PG_dirty); the
    mapping's page references are dropped, freeing pages that reach zero.
    hwpoison entries are cleared (dropping the RFC's page reference when the
    hook says they hold one); PTE markers are cleared unless ``keep_markers``
    (the zap-with-details of truncation). Returns the pages unmapped.

    ``even_cows=False`` is a ``zap_details`` whose ``even_cows`` is false (a
    hole punch, which spares private COW copies): from v6.1 (``zap_pte_range``,
    ``should_zap_cows``, v6.1.192) such a zap also leaves hwpoison entries.
    """
    mm = vma.vm_mm
    core = mm.core
    store = core.ptes.rows
    mem = core.pages
    types = core.swap_types
    unmapped = 0
    for chunk in mm.pgd.chunks(start, end):
        ptes = store[chunk.rows, chunk.cols]
        live = ~pte_none_array(ptes)
        if not live.any():
            continue
        present = pte_present_array(ptes) & live
        normal = present & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
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
        clear = live.copy()
        if swap.any():
            stypes, soffs = _swp_entry_fields(core, ptes[swap])
            if keep_markers and types.pte_marker is not None:
                markers = stypes == types.pte_marker
                idx = np.flatnonzero(swap)[markers]
                clear[idx] = False
            if not even_cows and types.hwpoison is not None and \
                    core.kcfg.version >= KernelVersion.V6_1:
                clear[np.flatnonzero(swap)[stypes == types.hwpoison]] = False
                stypes = np.where(stypes == types.hwpoison, -1, stypes)  # kept: no ref dropped
            if types.hwpoison is not None and core.hooks.hwpoison_entry_holds_ref:
                poisoned = soffs[stypes == types.hwpoison]
                _put_pages_bulk(core, poisoned)
            real = stypes < types.max_swapfiles
            for off in soffs[real & (stypes == 0)]:  # free the swap slots
                core.swap_space.pop(int(off), None)
        store[chunk.rows[clear], chunk.cols[clear]] = 0
        _put_pages_bulk(core, pfns)
    core.flush_tlb_range(mm, start, end)
    return unmapped


# -- fork ------------------------------------------------------------------------------


def vma_needs_copy(dst: Vma, src: Vma) -> bool:
    """Shared file mappings are not copied: the child refaults them."""
    if src.vm_flags & (VM.HUGETLB | VM.PFNMAP | VM.MIXEDMAP):
        return True
    return src.anon_vma is not None


def copy_page_range(dst: Vma, src: Vma) -> None:
    """Copy the parent's PTEs to the child; private anon pages become COW."""
    if not vma_needs_copy(dst, src):
        return
    src_mm, dst_mm = src.vm_mm, dst.vm_mm
    core = src_mm.core
    store = core.ptes.rows
    mem = core.pages
    types = core.swap_types
    cow = not src.vm_flags & VM.SHARED
    for chunk in src_mm.pgd.chunks(src.vm_start, src.vm_end):
        # Build the child's tables first: allocation may grow the PTE store.
        rows = np.empty(len(chunk.addr), dtype=np.int64)
        pmd_no = chunk.addr >> 21
        for i in np.unique(pmd_no):
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
        pfns = pte_pfn_array(ptes[normal])
        if len(pfns):
            anon = (mem.mapping[pfns] & 1) != 0
            add_counts(mem._mapcount, pfns, 1)
            heads = pfns & ~((np.int64(1) << mem.order[pfns].astype(np.int64)) - 1)
            add_counts(mem._refcount, heads, 1)
            dst_mm.rss_anon += int(anon.sum())
            dst_mm.rss_file += int((~anon).sum())
            if cow:
                idx = np.flatnonzero(normal)[anon]
                wp = ptes[idx] & np.uint64(~_PAGE_RW & 0xFFFF_FFFF_FFFF_FFFF)
                new[idx] = wp
                store[chunk.rows[idx], chunk.cols[idx]] = wp  # parent loses write too
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
        store[rows[live], chunk.cols[live]] = new[live]
    if cow:
        core.flush_tlb_range(src_mm, src.vm_start, src.vm_end)

