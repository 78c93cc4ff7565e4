"""Splitting a page-cache THP, and hole-punch/truncate of part of a huge shmem page.

Follows ``mm/huge_memory.c`` (``can_split_huge_page``, ``unmap_page``,
``split_huge_page_to_list``/``__split_huge_page`` for a file THP), ``mm/shmem.c``
(``shmem_undo_range``, v5.12's ``shmem_punch_compound``) and ``mm/truncate.c``
(``truncate_inode_partial_folio``, 6.1 and 6.18), gated by version.

What a partial punch or truncate does to a huge shmem page:

* v5.12: the whole pages of [start, end) that lie in a THP go through
  ``shmem_punch_compound``: a THP wholly inside is truncated, otherwise
  ``split_huge_page`` is tried; when it fails ("Wipe the page and don't get
  stuck") each of those 4 KiB pages is zeroed (``clear_highpage``) and the THP
  stays, dirty. A punch that covers no whole page of the THP does not split it
  (only the partial bytes are zeroed).
* 6.1 and 6.18: ``shmem_get_partial_folio`` finds the large folio at each edge,
  marks it dirty and calls ``truncate_inode_partial_folio``: zero the byte range
  inside the folio, then split (6.18: ``try_folio_split``, non-uniform); a failed
  split of the (dirty) folio keeps it, zeroed. So even a few bytes punched inside
  a THP try to split it.

The split fails with -EBUSY whenever something besides the page cache and the
mappings holds a reference (a GUP pin, KVM's page reference, an RFC hwpoison
entry's reference): ``can_split_huge_page`` compares ``total_mapcount`` with
``page_count - 512 - 1``. A file THP's mappings are simply removed first
(``unmap_page``; they refault), and pages past i_size leave the cache as the
split creates them. Simplified: 6.18's non-uniform split leaves the pages that
remain in folios of several orders; the model splits to order 0 (the cache
holds the same indices either way, and none of them is PMD-sized any more).
6.x's ``shmem_fallocend`` (pages fallocated past i_size survive a split) is not
modelled.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from kvmpoison.arch.x86.pgtable import pmd_pfn, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_DIRTY, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.filemap import truncate_inode_pages_range, unmap_mapping_range
from kvmpoison.mm.huge_memory import HPAGE_PMD_NR, pmd_trans_huge
from kvmpoison.mm.memory import _put_pages_bulk
from kvmpoison.mm.page import get_page, page_count, page_mapping, put_page, total_mapcount
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.shmem_huge import __split_huge_pmd_locked_file, thp_head

if TYPE_CHECKING:
    from kvmpoison.mm.core import MmCore
    from kvmpoison.mm.file import AddressSpace, Inode


def can_split_huge_page_file(core: MmCore, head: int) -> bool:
    """mm/huge_memory.c ``can_split_huge_page`` (v5.12; 6.x ``can_split_folio``) for a
    page-cache THP (``extra_pins`` = 512, the cache's), whose caller holds one
    reference: every other reference must be a mapping."""
    page = core.pages[head]
    return total_mapcount(page) == page_count(page) - HPAGE_PMD_NR - 1


def unmap_page_file(core: MmCore, mapping: AddressSpace, head: int) -> None:
    """mm/huge_memory.c ``unmap_page`` -> ``try_to_unmap(TTU_SPLIT_HUGE_PMD)`` of a file
    THP (v5.12; 6.x ``unmap_folio``): every PMD mapping it is zapped (a file PMD
    split) and every PTE mapping one of its subpages cleared, in every VMA of the
    file; nothing is remapped after the split (file pages refault). Vectorised
    over PTE chunks."""
    mem = core.pages
    hindex = int(mem.index[head])
    for vma in list(mapping.i_mmap):
        lo = max(hindex, vma.vm_pgoff)
        hi = min(hindex + HPAGE_PMD_NR, vma.vm_pgoff + vma.npages)
        if lo >= hi:
            continue
        start = vma.vm_start + ((lo - vma.vm_pgoff) << PAGE_SHIFT)
        end = vma.vm_start + ((hi - vma.vm_pgoff) << PAGE_SHIFT)
        mm = vma.vm_mm
        for haddr, pmd in mm.pgd.pmd_leaves(start, end):
            if pmd_trans_huge(pmd) and pmd_pfn(pmd) == head:
                __split_huge_pmd_locked_file(vma, haddr)
        store = core.ptes.rows
        for chunk in mm.pgd.chunks(start, end):
            ptes = store[chunk.rows, chunk.cols]
            pfns = pte_pfn_array(ptes)
            hit = pte_present_array(ptes) & (pfns >= head) & (pfns < head + HPAGE_PMD_NR)
            if not hit.any():
                continue
            if (ptes[hit] & np.uint64(_PAGE_DIRTY)).any():
                mem.flags[head] |= np.uint32(mem.mask(PG.dirty))
            store[chunk.rows[hit], chunk.cols[hit]] = 0
            np.subtract.at(mem._mapcount, pfns[hit], 1)
            n = int(hit.sum())
            mem._refcount[head] -= n
            if mem.flags[head] & np.uint32(mem.mask(PG.swapbacked)):
                mm.rss_shmem -= n
            else:
                mm.rss_file -= n
        core.flush_tlb_range(mm, start, end)


def split_huge_page_file(core: MmCore, pfn: int, caller_holds_ref: bool = False) -> int:
    """mm/huge_memory.c ``split_huge_page`` of the page-cache THP holding ``pfn`` (v5.12
    ``split_huge_page_to_list``; 6.1 the same; 6.18 ``split_folio``): 0, or -EBUSY when
    the THP was truncated or something beyond the cache and the mappings holds a
    reference.

    The caller's reference is taken here and dropped at the end, unless
    ``caller_holds_ref`` (``split_huge_page``'s callers, memory_failure). After the mappings
    are gone (:func:`unmap_page_file`) ``__split_huge_page`` makes 512 order-0 pages:
    each keeps its index and one page-cache reference, the head's flags (dirty,
    uptodate, swapbacked, lru) pass to the tails, PG_hwpoison stays per page, and the
    pages at or past ``DIV_ROUND_UP(i_size, PAGE_SIZE)`` leave the cache (and are
    freed). Vectorised over the 512 pages.
    """
    mem = core.pages
    head = thp_head(core, pfn)
    mapping = page_mapping(mem[head])
    if mapping is None or not mem.order[head]:
        return -errno.EBUSY
    if not caller_holds_ref:
        get_page(mem[head])
    if not can_split_huge_page_file(core, head):
        if not caller_holds_ref:
            put_page(mem[head])
        return -errno.EBUSY
    unmap_page_file(core, mapping, head)
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
    inherit = mem.flags[head] & np.uint32(mem.bits.mask(PG.dirty, PG.uptodate, PG.swapbacked,
                                                        PG.lru))
    mem.flags[pfns] |= inherit
    mem.flags[head] &= np.uint32(~mem.mask(PG.head) & 0xFFFF_FFFF)
    mem.order[pfns] = 0
    mem.compound_mapcount.pop(head, None)
    mem._refcount[pfns] = 1  # the page cache's reference, one per page now
    mem._refcount[pfn] += 1  # and the caller's, on the page it passed
    host = mapping.host
    end = (host.i_size + PAGE_SIZE - 1) >> PAGE_SHIFT
    index = mem.index[pfns]
    beyond = pfns[index >= end]
    if len(beyond):  # __split_huge_page: "Some pages can be beyond i_size"
        mapping.pages[mem.index[beyond]] = -1
        mapping.nrpages -= len(beyond)
        mem.mapping[beyond] = 0
        mem.flags[beyond] &= np.uint32(~mem.mask(PG.dirty) & 0xFFFF_FFFF)
        _put_pages_bulk(core, beyond[beyond != pfn])
        if (beyond == pfn).any():  # the caller's page too: drop the cache's reference
            put_page(mem[pfn])
    if not caller_holds_ref:
        put_page(mem[pfn])  # the caller's
    return 0


def _thp_heads_in(core: MmCore, mapping: AddressSpace, lo: int, hi: int) -> list[int]:
    """Heads of the compound pages cached at some index in [lo, hi)."""
    if hi <= lo:
        return []
    pfns = mapping.lookup_range(lo, hi - lo)
    pfns = pfns[pfns >= 0]
    order = core.pages.order[pfns].astype(np.int64)
    big = pfns[order != 0]
    if not len(big):
        return []
    heads = big & ~((np.int64(1) << order[order != 0]) - 1)
    return [int(h) for h in sorted_unique(heads)]


def shmem_undo_range_huge(core: MmCore, inode: Inode, lstart: int, lend: int) -> list[int]:
    """The huge-page steps of mm/shmem.c ``shmem_undo_range`` (v5.12; 6.1; 6.18) for the
    byte range [lstart, lend] (``lend`` -1: to EOF), after the range was unmapped.

    Splits each THP the range covers in part (see the module docstring for which,
    per version); a THP whose split fails is zeroed over the range and kept, dirty.
    Returns the head indices of the THPs kept: the caller truncates the whole pages
    of the range but not theirs (THPs wholly inside are truncated with the rest).
    """
    mapping = inode.mapping
    assert mapping is not None
    mem = core.pages
    first = (lstart + PAGE_SIZE - 1) >> PAGE_SHIFT
    last = len(mapping.pages) if lend == -1 else (lend + 1) >> PAGE_SHIFT
    touched_hi = len(mapping.pages) if lend == -1 else (lend >> PAGE_SHIFT) + 1
    v6 = core.kcfg.version.tuple >= (5, 17)  # 5.17: truncate_inode_partial_folio
    kept: list[int] = []
    for head in _thp_heads_in(core, mapping, lstart >> PAGE_SHIFT, touched_hi):
        if not mem.order[head]:
            continue  # split already (one THP's split cannot touch another)
        h = int(mem.index[head])
        whole_lo, whole_hi = max(h, first), min(h + HPAGE_PMD_NR, last)
        if h >= first and h + HPAGE_PMD_NR <= last:
            continue  # wholly inside: truncated whole
        if not v6 and whole_lo >= whole_hi:
            continue  # v5.12: no whole page of it in [start, end): no split
        if v6:
            mem.flags[head] |= np.uint32(mem.mask(PG.dirty))  # folio_mark_dirty
        if split_huge_page_file(core, head) == 0:
            continue
        if whole_lo < whole_hi:  # clear_highpage of each whole page in the range
            core.clear_pages(head + np.arange(whole_lo - h, whole_hi - h, dtype=np.int64))
        mem.flags[head] |= np.uint32(mem.mask(PG.dirty))
        kept.append(h)
    return kept


def shmem_truncate_range_huge(core: MmCore, inode: Inode, lstart: int, lend: int,
                              even_cows: bool) -> None:
    """``unmap_mapping_range`` + mm/shmem.c ``shmem_truncate_range`` over a mapping that
    holds THPs: unmap the whole pages of [lstart, lend], run the huge-page steps, then
    drop the whole pages of the range outside the THPs that were kept. The caller
    zeroes the partial pages at the edges."""
    mapping = inode.mapping
    assert mapping is not None
    first = (lstart + PAGE_SIZE - 1) >> PAGE_SHIFT
    last = 1 << 40 if lend == -1 else (lend + 1) >> PAGE_SHIFT
    unmap_mapping_range(mapping, first, last, even_cows)
    kept = sorted(shmem_undo_range_huge(core, inode, lstart, lend))
    lo = first
    for h in kept:
        if lo < h:
            truncate_inode_pages_range(core, mapping, lo, min(h, last), even_cows)
        lo = max(lo, h + HPAGE_PMD_NR)
    if lo < last:
        truncate_inode_pages_range(core, mapping, lo, last, even_cows)
