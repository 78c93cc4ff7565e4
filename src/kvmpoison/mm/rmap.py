"""Reverse mapping: anon_vma and i_mmap, and ``try_to_unmap``.

Follows ``mm/rmap.c`` (v5.12): an anon page's ``mapping`` is its anon_vma
and ``index`` its linear page index, so every VMA on that anon_vma's chain
that covers the index maps it at ``vm_start + (index - vm_pgoff) * PAGE_SIZE``;
a file page is found the same way through the file's ``i_mmap`` VMAs.
``try_to_unmap_one``'s hwpoison branch installs ``make_hwpoison_entry``.

TTU flag values follow the modelled kernel: v5.12 has TTU_IGNORE_HWPOISON
(0x20); from ~v6.0 the same bit is TTU_HWPOISON with the meaning inverted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmpoison.arch.x86.pgtable import (
    pmd_pfn,
    pte_pfn,
    pte_pfn_array,
    pte_present,
    pte_present_array,
)
from kvmpoison.arch.x86.pgtable_64 import __swp_entry_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_DIRTY, _PAGE_PSE, PAGE_SHIFT
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.page import (
    Page,
    PageAnon,
    PageArray,
    PageFlag,
    PageHWPoison,
    PageKsm,
    PageSwapBacked,
    SetPageDirty,
    compound_head,
    get_page,
    page_anon_vma,
    page_mapped,
    page_mapping,
    put_page,
)
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.swapops import (
    PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT,
    PteMarker,
    SwapTypes,
    make_guest_private_entry,
    make_hwpoison_entry,
    swp_entry_to_pte,
)
from kvmpoison.outcome import Halt, Outcome


class TTU(enum.IntFlag):
    """``enum ttu_flags``; IGNORE_HWPOISON (v5.12) and HWPOISON (v6.x) share 0x20."""

    MIGRATION = 0x1
    MUNLOCK = 0x2
    SPLIT_HUGE_PMD = 0x4
    IGNORE_MLOCK = 0x8
    SYNC = 0x10
    IGNORE_HWPOISON = 0x20
    BATCH_FLUSH = 0x40
    RMAP_LOCKED = 0x80


TTU_HWPOISON = TTU.IGNORE_HWPOISON  # v6.x name for bit 0x20, inverted meaning
_TTU_IGNORE_MLOCK = int(TTU.IGNORE_MLOCK)


@dataclass(eq=False)
class AnonVma:
    """``struct anon_vma``; ``vmas`` is the set its anon_vma_chain links to."""

    vmas: list[Vma] = field(default_factory=list)
    parent: AnonVma | None = None

    def __repr__(self) -> str:
        return f"AnonVma(vmas={len(self.vmas)})"


def anon_vma_prepare(vma: Vma) -> AnonVma:
    """mm/rmap.c ``__anon_vma_prepare`` (v5.12): give the VMA its anon_vma."""
    if vma.anon_vma is None:
        av = AnonVma(vmas=[vma])
        vma.anon_vma = av
        vma.anon_vma_chain.append(av)
    return vma.anon_vma


def anon_vma_fork(child: Vma, parent: Vma) -> None:
    """mm/rmap.c ``anon_vma_fork`` (v5.12): link the child VMA into every anon_vma
    of the parent and give it its own. Simplified: no anon_vma reuse by degree.
    """
    for av in parent.anon_vma_chain:
        av.vmas.append(child)
        child.anon_vma_chain.append(av)
    if parent.anon_vma is not None:
        own = AnonVma(vmas=[child], parent=parent.anon_vma)
        child.anon_vma = own
        child.anon_vma_chain.append(own)


def unlink_anon_vmas(vma: Vma) -> None:
    """mm/rmap.c ``unlink_anon_vmas`` (v5.12)."""
    for av in vma.anon_vma_chain:
        if vma in av.vmas:
            av.vmas.remove(vma)
    vma.anon_vma_chain.clear()


def mapping_encode(mem: PageArray, obj: Any, anon: bool) -> int:
    return mem.registry.encode(obj, anon)


def page_add_new_anon_rmap(page: Page, vma: Vma, address: int) -> None:
    """mm/rmap.c ``page_add_new_anon_rmap`` (v5.12, order-0): mapping, index, mapcount 0."""
    av = anon_vma_prepare(vma)
    mem = page.mem
    mem.mapping[page.pfn] = mapping_encode(mem, av, True)
    mem.index[page.pfn] = vma.linear_page_index(address)
    mem._mapcount[page.pfn] = 0


def page_add_rmap(page: Page) -> None:
    """mm/rmap.c ``page_add_anon_rmap``/``page_add_file_rmap`` (v5.12, order-0) for a
    page already set up: one more mapping.
    """
    page.mem._mapcount[page.pfn] += 1


def page_remove_rmap(page: Page) -> None:
    """mm/rmap.c ``page_remove_rmap`` (v5.12, order-0)."""
    mem = page.mem
    if mem._mapcount[page.pfn] < 0:
        raise AssertionError(f"page_remove_rmap: {page} is not mapped")
    mem._mapcount[page.pfn] -= 1


def _rmap_vmas(page: Page) -> list[Vma]:
    if PageAnon(page):
        av = page_anon_vma(page)
        return list(av.vmas) if av is not None else []
    mapping = page_mapping(page)
    return list(getattr(mapping, "i_mmap", []))


def vma_address(page: Page, vma: Vma) -> int | None:
    """mm/internal.h ``vma_address`` (v5.12): where ``page`` sits in ``vma``, or None."""
    head = compound_head(page)
    index = int(head.mem.index[head.pfn]) + (page.pfn - head.pfn)
    addr = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
    return addr if vma.vm_start <= addr < vma.vm_end else None


def rmap_walk_ksm(page: Page) -> Iterator[tuple[Vma, int]]:
    """A KSM page: each rmap item's anon_vma, at the item's address (``mm/ksm.c``)."""
    node = page.mem.registry.decode(int(page.mem.mapping[compound_head(page).pfn]))
    for av, addr in list(getattr(node, "rmap_items", [])):
        for vma in list(av.vmas):
            if vma.vm_start <= addr < vma.vm_end:
                yield vma, addr


def rmap_walk(page: Page) -> Iterator[tuple[Vma, int]]:
    """(vma, address) for every place the page may be mapped."""
    if PageKsm(page):
        yield from rmap_walk_ksm(page)
        return
    for vma in _rmap_vmas(page):
        addr = vma_address(page, vma)
        if addr is not None:
            yield vma, addr


def page_vma_mapped(page: Page, vma: Vma, addr: int) -> bool:
    """mm/page_vma_mapped.c ``check_pte`` (v5.12) for a walk without PVMW_MIGRATION.

    True when the PTE at ``addr`` is present and maps ``page`` (device-private
    entries, the other match, are not modelled). RFCv1 7/7 also let a
    hwpoison entry match, but only in the PVMW_MIGRATION branch, which only
    ``remove_migration_pte`` walks; migration is not modelled, so that change
    has no effect here (RFCv2 dropped it).
    """
    pte = vma.vm_mm.pgd.get(addr)
    return pte_present(pte) and pte_pfn(pte) == page.pfn


_TTU_BIT_0X20 = int(TTU.IGNORE_HWPOISON)


def _installs_hwpoison(mm: MmStruct, page: Page, flags: int) -> bool:
    if not PageHWPoison(page):
        return False
    if mm.core.kcfg.version.tuple >= (6, 0):  # TTU_HWPOISON in 6.1 too
        return bool(flags & _TTU_BIT_0X20)  # TTU_HWPOISON
    return not flags & _TTU_BIT_0X20  # TTU_IGNORE_HWPOISON


def try_to_unmap_one(page: Page, vma: Vma, addr: int, flags: TTU,
                     pteval: int | None = None) -> bool:
    """mm/rmap.c ``try_to_unmap_one`` (v5.12 with RFCv2 10/13; v6.18's TTU_HWPOISON).

    Clears the PTE (moving Dirty to the page); under the hardened design a
    PG_guest_private page gets a PTE_MARKER_GUEST_PRIVATE entry with a page
    reference; a PageHWPoison page gets a
    hwpoison entry instead (with the RFC's ``get_page`` when the design's
    entries hold a reference). An mlocked VMA stops the walk unless
    TTU_IGNORE_MLOCK. A subpage of a PTE-mapped anon THP that loses its last
    mapping queues the THP for deferred split (``page_remove_rmap``). Not
    modelled: swap and migration entries.
    """
    mm = vma.vm_mm
    core = mm.core
    if not int(flags) & _TTU_IGNORE_MLOCK and vma.vm_flags & VM.LOCKED:
        return False
    # page_vma_mapped_walk's pte pointer: cleared, flushed, then rewritten in place
    slot = mm.pgd.pte_slot(addr, alloc=True)
    assert slot is not None
    rows = mm.pgd.store.rows
    if pteval is None:
        pteval = int(rows[slot])
    rows[slot] = 0  # ptep_clear_flush
    core.flush_tlb_range(mm, addr, addr + (1 << PAGE_SHIFT))
    if pteval & _PAGE_DIRTY:
        SetPageDirty(page)
    anon = PageAnon(page)
    if core.hooks.guest_private and PageFlag(page, PG.guest_private):
        # hardened: the guest-private marker, holding a page reference (the page has
        # no other home when it is anonymous)
        rows[slot] = swp_entry_to_pte(make_guest_private_entry(page.pfn, core.swap_types))
        get_page(page)
    elif _installs_hwpoison(mm, page, int(flags)):
        entry = make_hwpoison_entry(page.pfn, core.swap_types)
        rows[slot] = swp_entry_to_pte(entry)  # set_pte_at
        if core.hooks.hwpoison_entry_holds_ref:
            get_page(page)
    if anon:  # dec_mm_counter(mm, mm_counter(page))
        mm.rss_anon -= 1
    elif PageSwapBacked(page):
        mm.rss_shmem -= 1
    else:
        mm.rss_file -= 1
    page_remove_rmap(page)
    if anon and page.mem.order[page.pfn]:  # a PTE-mapped THP subpage that lost its mapping
        from kvmpoison.mm.huge_memory import deferred_split_ptes_unmapped  # it imports rmap
        deferred_split_ptes_unmapped(core, np.array([page.pfn], dtype=np.int64))
    put_page(page)
    return True


def try_to_unmap(page: Page, flags: TTU) -> bool:
    """mm/rmap.c ``try_to_unmap`` (v5.12): unmap ``page`` from every mm; True when
    nothing maps it any more. Where a huge PMD maps the address,
    :func:`try_to_unmap_one_pmd` decides first.
    """
    for vma, addr in rmap_walk(page):
        if vma.vm_mm.pgd.nr_pmd_leaves and vma.vm_mm.pgd.pmd_leaf(addr) & _PAGE_PSE:  # trans huge
            done = try_to_unmap_one_pmd(page, vma, addr, flags)
            if done is False:
                break
            if done:
                continue
        if page_vma_mapped(page, vma, addr) and not try_to_unmap_one(page, vma, addr, flags):
            break
    return not page_mapped(page)


def try_to_unmap_one_pmd(page: Page, vma: Vma, addr: int, flags: TTU) -> bool | None:
    """``try_to_unmap_one`` (mm/rmap.c, v5.12) where a huge PMD maps ``addr``.

    TTU_SPLIT_HUGE_PMD splits the PMD first (``split_huge_pmd_address``) and
    the PTE walk goes on (None). Without it the mmu notifier range
    [addr, addr + ``page_size(page)``) is invalidated (4 KiB for a tail page, 2
    MiB for a THP's head), then ``page_vma_mapped_walk`` meets the huge PMD:
    ``pmd_page(*pvmw->pmd) != page`` is not_found for a tail page, so nothing
    is unmapped (True: the walk goes on to the next VMA). For the head it
    returns with ``pvmw.pte`` NULL: an mlocked VMA without TTU_IGNORE_MLOCK
    stops the walk (False); otherwise ``VM_BUG_ON_PAGE(!pvmw.pte, page)`` fires
    under CONFIG_DEBUG_VM, and without it the next line dereferences the NULL
    ``pvmw.pte`` (``pte_pfn(*pvmw.pte)``): an oops either way, modelled as a
    panic like the model's other kernel BUGs. PMD migration entries
    (TTU_MIGRATION) are not modelled.
    """
    mm = vma.vm_mm
    if flags & TTU.SPLIT_HUGE_PMD:
        from kvmpoison.mm.huge_memory import split_huge_pmd_address  # it imports rmap
        split_huge_pmd_address(vma, addr)
        return None
    head = compound_head(page)
    size = 1 << (PAGE_SHIFT + int(page.mem.order[page.pfn])) if head.pfn == page.pfn \
        else 1 << PAGE_SHIFT  # page_size(): a tail page reads as order 0
    mm.core.flush_tlb_range(mm, addr, min(vma.vm_end, addr + size))  # the notifier range
    if pmd_pfn(mm.pgd.pmd_leaf(addr)) != page.pfn:
        return True  # pmd_page(*pvmw->pmd) != page: not_found
    if not int(flags) & _TTU_IGNORE_MLOCK and vma.vm_flags & VM.LOCKED:
        return False
    raise Halt(Outcome.panic(
        f"kernel BUG at mm/rmap.c: try_to_unmap_one: VM_BUG_ON_PAGE(!pvmw.pte) for the "
        f"PMD-mapped THP head {page.pfn:#x} (\"Unexpected PMD-mapped THP?\"; without "
        f"CONFIG_DEBUG_VM a NULL pointer dereference of pvmw.pte)"))


def _unmap_pages_bulk(mem: PageArray, pfns: np.ndarray, vmas: list[Vma],
                      entry: Callable[[SwapTypes, np.ndarray], np.ndarray],
                      keep_ref: bool) -> int:
    """The PTE walk both bulk unmaps share: every present PTE of the order-0
    pages ``pfns`` (one rmap set, ``vmas``) becomes ``entry(types, hit_pfns)``.

    Per hit: the PTE's dirty bit moves to PG_dirty, the mapcount drops, the
    refcount drops unless ``keep_ref`` (the entry keeps the PTE's reference),
    and the mm's rss counter of the page's kind drops; one TLB flush per VMA
    range. Returns the number of PTEs replaced.
    """
    if not len(pfns) or not vmas:
        return 0
    sorted_pfns = np.sort(np.asarray(pfns, dtype=np.int64))
    index = mem.index[sorted_pfns]
    replaced = 0
    for vma in vmas:
        mm = vma.vm_mm
        core = mm.core
        addrs = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
        inside = (addrs >= vma.vm_start) & (addrs < vma.vm_end)
        if not inside.any():
            continue
        lo, hi = int(addrs[inside].min()), int(addrs[inside].max()) + (1 << PAGE_SHIFT)
        store = core.ptes.rows
        for chunk in mm.pgd.chunks(lo, hi):
            ptes = store[chunk.rows, chunk.cols]
            present = pte_present_array(ptes)
            pte_pfns = pte_pfn_array(ptes)
            pos = np.searchsorted(sorted_pfns, pte_pfns)
            pos[pos == len(sorted_pfns)] = 0
            hit = present & (sorted_pfns[pos] == pte_pfns)
            if not hit.any():
                continue
            hit_pfns = pte_pfns[hit]
            dirty = (ptes[hit] & np.uint64(_PAGE_DIRTY)) != 0
            mem.flags[hit_pfns[dirty]] |= np.uint32(mem.mask(PG.dirty))
            store[chunk.rows[hit], chunk.cols[hit]] = entry(core.swap_types, hit_pfns)
            np.subtract.at(mem._mapcount, hit_pfns, 1)
            if not keep_ref:
                np.subtract.at(mem._refcount, hit_pfns, 1)
            anon = (mem.mapping[hit_pfns] & 1) != 0
            shmem = ~anon & ((mem.flags[hit_pfns] & np.uint32(mem.mask(PG.swapbacked))) != 0)
            mm.rss_anon -= int(anon.sum())
            mm.rss_shmem -= int(shmem.sum())
            mm.rss_file -= int((~anon & ~shmem).sum())
            replaced += int(hit.sum())
        core.flush_tlb_range(mm, lo, hi)
    return replaced


def _hwpoison_entries(types: SwapTypes, pfns: np.ndarray) -> np.ndarray:
    """``make_hwpoison_entry`` for each pfn."""
    assert types.hwpoison is not None
    return __swp_entry_array(types.hwpoison, pfns.astype(np.uint64))


def _guest_private_entries(types: SwapTypes, pfns: np.ndarray) -> np.ndarray:
    """``make_guest_private_entry`` for each pfn (a PTE_MARKER_GUEST_PRIVATE)."""
    assert types.pte_marker is not None
    offsets = (pfns.astype(np.uint64) << np.uint64(PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT)) \
        | np.uint64(int(PteMarker.GUEST_PRIVATE))
    return __swp_entry_array(types.pte_marker, offsets)


def try_to_unmap_pages_hwpoison(mem: PageArray, pfns: np.ndarray, vmas: list[Vma],
                                holds_ref: bool) -> int:
    """Bulk hwpoison unmap of order-0 pages that share one rmap set (``vmas``).

    The vectorised counterpart of calling ``try_to_unmap(TTU_IGNORE_MLOCK)`` on
    each PageHWPoison page: every present PTE of those pages becomes a hwpoison
    entry; returns the number of PTEs replaced.
    """
    return _unmap_pages_bulk(mem, pfns, vmas, _hwpoison_entries, keep_ref=holds_ref)


def try_to_unmap_pages_guest_private(mem: PageArray, pfns: np.ndarray, vmas: list[Vma]) -> int:
    """The hardened design's bulk unmap: every present PTE of the PG_guest_private
    order-0 pages ``pfns`` (one rmap set, ``vmas``) becomes a PTE_MARKER_GUEST_PRIVATE
    entry that keeps the mapping's page reference.

    The vectorised counterpart of :func:`try_to_unmap` with TTU_IGNORE_MLOCK on
    each page (try_to_unmap_one drops the PTE's reference and takes the
    marker's: the count is unchanged). Returns the number of PTEs replaced.
    """
    return _unmap_pages_bulk(mem, pfns, vmas, _guest_private_entries, keep_ref=True)
