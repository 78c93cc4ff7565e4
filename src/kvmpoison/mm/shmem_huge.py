"""shmem/memfd transparent huge pages: the huge decision, the order-9 page-cache folio,
its PMD mapping, and the counters.

Follows ``mm/shmem.c``, ``mm/memory.c`` (``do_set_pmd``), ``mm/filemap.c``
(``filemap_map_pmd``), ``mm/huge_memory.c`` (the file branches of
``zap_huge_pmd`` and ``__split_huge_pmd_locked``) and ``mm/rmap.c``
(``page_add_file_rmap``/``page_remove_file_rmap`` of a compound page) at
v5.12, 6.1 (read in Debian's 6.1.192 tree) and 6.18, gated by version:

* ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` is ``shmem_huge``;
  the internal ``shm_mnt`` that memfd and MAP_SHARED|MAP_ANONYMOUS use takes
  its ``huge=`` from it (``shmem_init``/``shmem_enabled_store``: every value but
  deny and force is copied into the mount);
* the decision for a fault, a write and fallocate: v5.12's ``sgp_huge`` switch in
  ``shmem_getpage_gfp``, 6.1's ``shmem_is_huge`` and 6.18's
  ``shmem_huge_global_enabled``; ``shmem_huge_enabled`` (v5.12) answers smaps'
  THPeligible and khugepaged;
* ``shmem_alloc_hugepage``: one order-9 compound page whose 512 subpages take
  512 consecutive indices of the page cache (the cache holds 512 references on
  the head, as ``shmem_add_to_page_cache``'s ``page_ref_add(page, nr)``);
* ``do_set_pmd`` maps it with one PMD leaf (no deposited table: x86 has no
  ``arch_needs_pgtable_deposit``); a PMD mapping of a file THP counts in every
  subpage's ``_mapcount`` and in the compound mapcount (v5.12 and 6.1
  ``page_add_file_rmap(page, true)``; 6.18 keeps ``_entire_mapcount`` only, with
  the same ``page_mapcount``/``total_mapcount`` results);
* ShmemHugePages (NR_SHMEM_THPS) and ShmemPmdMapped (NR_SHMEM_PMDMAPPED), as
  ``/proc/meminfo`` and smaps print them.

As for anon THP, the model writes PG_swapbacked, PG_uptodate, PG_lru, mapping
and index into every subpage so that the vectorised PTE paths stay right when
a subpage is mapped by a PTE (the kernel reads the head). Not modelled:
swap-out of a shmem THP, the ``shmem_unused_huge_shrink`` list (pages beyond
i_size stay until truncated), 6.8+'s smaller mTHP orders and the per-size
``hugepages-2048kB/shmem_enabled`` (read as its default, inherit), the huge=
option of other tmpfs mounts, ``shmem_get_unmapped_area``'s 2 MiB alignment,
fault-around mapping PTEs beside a THP it cannot map by PMD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pmd_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_ACCESSED, _PAGE_DIRTY, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_MASK,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    maybe_pmd_mkwrite,
    mk_huge_pmd,
    pmd_trans_huge,
    transhuge_vma_suitable,
)
from kvmpoison.mm.mm_types import (
    FAULT_FLAG_WRITE_I,
    VM,
    VM_FAULT_0,
    Vma,
    VmFault,
    VmFaultInfo,
)
from kvmpoison.mm.page import put_page
from kvmpoison.mm.page_flags import PG

if TYPE_CHECKING:
    from kvmpoison.mm.core import MmCore
    from kvmpoison.mm.file import AddressSpace, Inode

IntArray = npt.NDArray[np.int64]

# mm/shmem.c: the values of shmem_huge and of a mount's huge=
SHMEM_HUGE_NEVER = 0
SHMEM_HUGE_ALWAYS = 1
SHMEM_HUGE_WITHIN_SIZE = 2
SHMEM_HUGE_ADVISE = 3
SHMEM_HUGE_DENY = -1
SHMEM_HUGE_FORCE = -2

_PARSE = {"never": SHMEM_HUGE_NEVER, "always": SHMEM_HUGE_ALWAYS,
          "within_size": SHMEM_HUGE_WITHIN_SIZE, "advise": SHMEM_HUGE_ADVISE,
          "deny": SHMEM_HUGE_DENY, "force": SHMEM_HUGE_FORCE}

# The model's getter passes SGP_READ 0, SGP_CACHE 1, SGP_WRITE 2 (mm/shmem.py); v5.12's
# two fault-only values, SGP_NOHUGE and SGP_HUGE, exist only inside the decision here.
SGP_CACHE = 1
SGP_NOHUGE, SGP_HUGE = -2, -3


def shmem_parse_huge(value: str) -> int:
    """mm/shmem.c ``shmem_parse_huge`` (v5.12, 6.1): the sysfs/mount word as SHMEM_HUGE_*."""
    try:
        return _PARSE[value]
    except KeyError:
        raise ValueError(f"shmem huge {value!r} is not one of {', '.join(_PARSE)}") from None


def shmem_huge(core: MmCore) -> int:
    """The global ``shmem_huge`` of mm/shmem.c (v5.12, 6.1), set through
    /sys/kernel/mm/transparent_hugepage/shmem_enabled."""
    return shmem_parse_huge(core.thp.shmem_enabled)


def shm_mnt_huge(core: MmCore) -> int:
    """``SHMEM_SB(shm_mnt->mnt_sb)->huge``: the huge= of the internal mount behind memfd
    and shared anonymous memory. ``shmem_enabled_store`` copies every value above
    SHMEM_HUGE_DENY into it (v5.12, 6.1, 6.18). Simplified: under deny or force the
    mount keeps its boot value, never (the model does not remember earlier writes).
    """
    huge = shmem_huge(core)
    return huge if huge > SHMEM_HUGE_DENY else SHMEM_HUGE_NEVER


def _vma_nohuge(vma: Vma | None) -> bool:
    # MMF_DISABLE_THP (prctl) is not modelled
    return vma is not None and bool(vma.vm_flags & VM.NOHUGEPAGE)


def _vma_huge(vma: Vma | None) -> bool:
    return vma is not None and bool(vma.vm_flags & VM.HUGEPAGE)


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def shmem_huge_enabled(vma: Vma) -> bool:
    """mm/shmem.c ``shmem_huge_enabled`` (v5.12): may a shmem VMA hold huge pages
    (smaps' THPeligible, khugepaged)? VM_NOHUGEPAGE refuses, then force/deny, then
    the mount: within_size asks for an i_size of at least 2 MiB reaching the first
    aligned index at or after ``vm_pgoff``; advise asks for VM_HUGEPAGE."""
    file = vma.vm_file
    if file is None or _vma_nohuge(vma):
        return False
    core = vma.vm_mm.core
    huge = shmem_huge(core)
    if huge == SHMEM_HUGE_FORCE:
        return True
    if huge == SHMEM_HUGE_DENY:
        return False
    mount = shm_mnt_huge(core)
    if mount == SHMEM_HUGE_ALWAYS:
        return True
    if mount == SHMEM_HUGE_WITHIN_SIZE:
        off = _round_up(vma.vm_pgoff, HPAGE_PMD_NR)
        i_size = _round_up(file.f_inode.i_size, PAGE_SIZE)
        if i_size >= HPAGE_PMD_SIZE and i_size >> PAGE_SHIFT >= off:
            return True
    return mount in (SHMEM_HUGE_WITHIN_SIZE, SHMEM_HUGE_ADVISE) and _vma_huge(vma)


def shmem_is_huge(core: MmCore, vma: Vma | None, inode: Inode, index: int,
                  shmem_huge_force: bool = False, write_end: int = 0) -> bool:
    """mm/shmem.c ``__shmem_is_huge`` (6.1; checked in Debian's 6.1.192) and, from 6.14
    on, ``shmem_huge_global_enabled`` != 0 for the PMD order (6.18): may the folio at
    ``index`` be huge?

    VM_NOHUGEPAGE refuses, deny refuses, force (or ``shmem_huge_force``) allows;
    then the mount: always; within_size when i_size (6.18: or ``write_end``, the end
    of the write being prepared) reaches ``round_up(index + 1, 512)``; advise (and
    within_size's fall-through) when the VMA has VM_HUGEPAGE. 6.18's MADV_COLLAPSE
    rule (``shmem_huge_force`` only under advise) is not modelled: the model has no
    MADV_COLLAPSE. Anonymous shared memory's per-size knob is read as inherit, which
    makes it the same answer.
    """
    if _vma_nohuge(vma):
        return False
    huge = shmem_huge(core)
    if huge == SHMEM_HUGE_DENY:
        return False
    if shmem_huge_force or huge == SHMEM_HUGE_FORCE:
        return True
    mount = shm_mnt_huge(core)
    if mount == SHMEM_HUGE_ALWAYS:
        return True
    if mount == SHMEM_HUGE_WITHIN_SIZE:
        aligned = _round_up(index + 1, HPAGE_PMD_NR)
        i_size = inode.i_size
        if core.kcfg.version.tuple >= (6, 14):  # shmem_get_orders_within_size
            i_size = max(write_end, i_size)
        if _round_up(i_size, PAGE_SIZE) >> PAGE_SHIFT >= aligned:
            return True
    return mount in (SHMEM_HUGE_WITHIN_SIZE, SHMEM_HUGE_ADVISE) and _vma_huge(vma)


def shmem_getpage_wants_huge(core: MmCore, inode: Inode, index: int, sgp: int,
                             vma: Vma | None, write_end: int = 0) -> bool:
    """The huge/no-huge choice ``shmem_getpage_gfp`` (v5.12) / ``shmem_get_folio_gfp``
    (6.x) makes before allocating for ``index`` (``sgp`` as the model's getter passes
    it: SGP_CACHE for a fault, SGP_WRITE for write and fallocate).

    v5.12: ``shmem_fault`` turns the VMA's VM_NOHUGEPAGE/VM_HUGEPAGE into
    SGP_NOHUGE/SGP_HUGE; deny or SGP_NOHUGE refuse, force allows, then the mount:
    within_size needs ``i_size >= 2 MiB`` and ``i_size >> PAGE_SHIFT >=
    round_up(index, 512)`` (so a huge page may reach past EOF), advise needs
    SGP_HUGE. Writes and fallocate pass no VMA, so advise never gives them a huge
    page. 6.x: :func:`shmem_is_huge` with the fault's VMA.
    """
    if core.kcfg.version.tuple >= (5, 16):  # 5.16: shmem_is_huge replaced the switch
        return shmem_is_huge(core, vma, inode, index, write_end=write_end)
    sgp_huge = sgp
    if vma is not None:  # shmem_fault
        sgp_huge = SGP_NOHUGE if _vma_nohuge(vma) else SGP_HUGE if _vma_huge(vma) else sgp
    huge = shmem_huge(core)
    if huge == SHMEM_HUGE_DENY or sgp_huge == SGP_NOHUGE:
        return False
    if huge == SHMEM_HUGE_FORCE:
        return True
    mount = shm_mnt_huge(core)
    if mount == SHMEM_HUGE_ALWAYS:
        return True
    if mount == SHMEM_HUGE_WITHIN_SIZE:
        off = _round_up(index, HPAGE_PMD_NR)
        i_size = _round_up(inode.i_size, PAGE_SIZE)
        if i_size >= HPAGE_PMD_SIZE and i_size >> PAGE_SHIFT >= off:
            return True
    return mount in (SHMEM_HUGE_WITHIN_SIZE, SHMEM_HUGE_ADVISE) and sgp_huge == SGP_HUGE


def shmem_huge_possible(core: MmCore, inode: Inode, vma: Vma | None) -> bool:
    """Could any fault of ``vma`` on ``inode`` allocate a huge page, or does its cache
    already hold one? False with the defaults (shmem_enabled never), so the bulk
    populate of order-0 pages stays what it was."""
    mapping = inode.mapping
    if mapping is not None and mapping_has_thp(core, mapping):
        return True
    if shmem_huge(core) in (SHMEM_HUGE_NEVER, SHMEM_HUGE_DENY) \
            and shm_mnt_huge(core) == SHMEM_HUGE_NEVER:
        return False
    return shmem_getpage_wants_huge(core, inode, 0, SGP_CACHE, vma) or \
        shmem_getpage_wants_huge(core, inode, max(inode.nr_pages - 1, 0), SGP_CACHE, vma)


# -- the page cache -----------------------------------------------------------------------


def shmem_alloc_hugepage(core: MmCore, mapping: AddressSpace, index: int) -> int:
    """mm/shmem.c ``shmem_alloc_hugepage`` (v5.12; 6.1 ``shmem_alloc_hugefolio``; 6.18
    ``shmem_alloc_and_add_folio`` with ``shmem_suitable_orders``): a zeroed order-9
    compound page for the 512 indices around ``index``, or -1 (the caller falls back
    to a small page) when any of those indices is already cached (``xa_find``) or no
    order-9 block is free (THP_FILE_FALLBACK)."""
    hindex = index & ~(HPAGE_PMD_NR - 1)
    if (mapping.lookup_range(hindex, HPAGE_PMD_NR) >= 0).any():
        return -1
    page = core.buddy.alloc_pages(HPAGE_PMD_ORDER, compound=True)
    if page is None:
        return -1
    core.clear_pages(np.arange(page.pfn, page.pfn + HPAGE_PMD_NR, dtype=np.int64))
    return page.pfn


def shmem_add_huge_to_page_cache(core: MmCore, mapping: AddressSpace, head: int,
                                 index: int) -> None:
    """mm/shmem.c ``shmem_add_to_page_cache`` of an order-9 page (v5.12; 6.x the folio):
    one multi-index entry over 512 indices (the model stores each subpage's pfn at
    its index), ``page_ref_add(page, 512)`` (the allocation's reference is one of
    them here: the model's getter returns pages without a reference of its own),
    ``nrpages += 512`` and NR_SHMEM_THPS, plus the flags ``shmem_getpage_gfp`` sets
    (swapbacked, uptodate after the clear, lru)."""
    mem = core.pages
    hindex = index & ~(HPAGE_PMD_NR - 1)
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
    mapping.add_bulk(pfns, hindex + np.arange(HPAGE_PMD_NR, dtype=np.int64))
    mapping.thp_cached = True
    mem._refcount[head] += HPAGE_PMD_NR - 1
    mem.flags[pfns] |= np.uint32(mem.bits.mask(PG.swapbacked, PG.uptodate, PG.lru))


def shmem_getpage_huge(core: MmCore, inode: Inode, index: int, sgp: int,
                       vma: Vma | None, write_end: int = 0) -> int:
    """The huge path of ``shmem_getpage_gfp`` after a cache miss: the subpage pfn for
    ``index`` of a newly cached THP, or -1 to allocate a small page instead."""
    mapping = inode.mapping
    assert mapping is not None
    if not shmem_getpage_wants_huge(core, inode, index, sgp, vma, write_end):
        return -1
    if vma is not None and core.kcfg.version.tuple >= (6, 11):
        # shmem_suitable_orders ("mm: shmem: add mTHP support for anonymous shmem"):
        # the 2 MiB must fit the VMA at a PMD-aligned address
        addr = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
        if not transhuge_vma_suitable(vma, addr & HPAGE_PMD_MASK):
            return -1
    head = shmem_alloc_hugepage(core, mapping, index)
    if head < 0:
        return -1
    shmem_add_huge_to_page_cache(core, mapping, head, index)
    return head + (index & (HPAGE_PMD_NR - 1))


def mapping_has_thp(core: MmCore, mapping: AddressSpace) -> bool:
    """Does the page cache hold a compound page (vectorised over its indices; no scan
    for a cache that never held one)?"""
    if not mapping.thp_cached:
        return False
    pfns = mapping.pages[mapping.pages >= 0]
    return bool(len(pfns)) and bool(core.pages.order[pfns].any())


def thp_head(core: MmCore, pfn: int) -> int:
    """``compound_head`` as a pfn."""
    order = int(core.pages.order[pfn])
    return pfn & ~((1 << order) - 1) if order else pfn


# -- mapping by PMD -------------------------------------------------------------------------


def page_has_hwpoisoned(core: MmCore, head: int) -> bool:
    """``PageHasHWPoisoned`` (5.15+, so 6.1 and 6.18): a THP one of whose subpages is
    PageHWPoison. The kernel sets the bit in ``memory_failure`` when it poisons a
    subpage of a THP; the model reads it off the subpages, which says the same
    wherever only memory_failure poisons pages."""
    mem = core.pages
    return bool((mem.flags[head : head + HPAGE_PMD_NR] & np.uint32(mem.m_hwpoison)).any())


def page_add_file_rmap_compound(core: MmCore, head: int) -> None:
    """mm/rmap.c ``page_add_file_rmap(page, true)`` (v5.12, 6.1): every subpage's
    ``_mapcount`` and the compound mapcount go up by one."""
    mem = core.pages
    mem._mapcount[head : head + HPAGE_PMD_NR] += 1
    mem.compound_mapcount[head] = mem.compound_mapcount.get(head, 0) + 1


def page_remove_file_rmap_compound(core: MmCore, head: int) -> None:
    """mm/rmap.c ``page_remove_file_rmap(page, true)`` (v5.12, 6.1): the reverse; a file
    THP is never queued for deferred split."""
    mem = core.pages
    count = mem.compound_mapcount.get(head, 0)
    if count <= 0:
        raise AssertionError(f"page_remove_rmap: file THP {head:#x} is not PMD-mapped")
    mem._mapcount[head : head + HPAGE_PMD_NR] -= 1
    if count == 1:
        del mem.compound_mapcount[head]
    else:
        mem.compound_mapcount[head] = count - 1


def do_set_pmd(vmf: VmFaultInfo, pfn: int) -> VmFault:
    """mm/memory.c ``do_set_pmd`` (v5.12; 6.1; 6.18 ``do_set_pmd(vmf, folio, page)``):
    map the order-9 page-cache page holding ``pfn`` with one PMD leaf at the fault's
    2 MiB. FALLBACK (map a PTE instead) when the 2 MiB is not inside the VMA or the
    file offset is not aligned with the address (``transhuge_vma_suitable``), the
    page is not of PMD order, or (5.15+, "mm: filemap: check if THP has hwpoisoned
    subpage for PMD page fault") a subpage is hwpoisoned: v5.12 maps a THP with a
    poisoned subpage by PMD all the same. A write makes it dirty and, if the VMA
    is writable, writable. The fault's reference becomes the mapping's;
    MM_SHMEMPAGES += 512.
    """
    vma = vmf.vma
    mm = vma.vm_mm
    core = mm.core
    haddr = vmf.address & HPAGE_PMD_MASK
    if not transhuge_vma_suitable(vma, haddr):
        return VmFault.FALLBACK
    head = thp_head(core, pfn)
    if int(core.pages.order[head]) != HPAGE_PMD_ORDER:
        return VmFault.FALLBACK
    if core.kcfg.version.tuple >= (5, 15) and page_has_hwpoisoned(core, head):
        return VmFault.FALLBACK
    if not mm.pgd.pmd_none(haddr):
        return VmFault.FALLBACK  # a PTE table is there (the kernel checks under the lock)
    entry = mk_huge_pmd(head, vma.vm_page_prot) | _PAGE_ACCESSED
    if int(vmf.flags) & FAULT_FLAG_WRITE_I:
        entry = maybe_pmd_mkwrite(entry | _PAGE_DIRTY, vma)
    mem = core.pages
    if mem.flags[head] & np.uint32(mem.mask(PG.swapbacked)):
        mm.rss_shmem += HPAGE_PMD_NR
    else:
        mm.rss_file += HPAGE_PMD_NR
    page_add_file_rmap_compound(core, head)
    mm.pgd.set_pmd(haddr, entry)
    return VM_FAULT_0


def filemap_map_pmd(vmf: VmFaultInfo, first: int) -> bool:
    """mm/filemap.c ``filemap_map_pmd`` (v5.12, 6.1) for fault-around: when the first
    page ``next_uptodate_page`` found is a THP and the PMD is none, map it with
    :func:`do_set_pmd` (taking the reference a mapping holds). True when the fault
    is done (mapped now, or a huge PMD was there already)."""
    core = vmf.vma.vm_mm.core
    mm = vmf.vma.vm_mm
    if pmd_trans_huge(mm.pgd.pmd_leaf(vmf.address)):
        return True
    head = thp_head(core, first)
    if head == first and not core.pages.order[head]:
        return False
    if not mm.pgd.pmd_none(vmf.address):
        return False
    core.pages._refcount[head] += 1  # next_uptodate_page's page_cache_get_speculative
    if do_set_pmd(vmf, head):
        put_page(core.pages[head])
        return False
    return True


def thp_head_skipped(core: MmCore, pfns: IntArray) -> npt.NDArray[np.bool_]:
    """Per cached pfn of a fault-around window: is it a subpage of a THP whose head
    ``next_uptodate_page`` skips (locked or PG_hwpoison: v5.12 and 6.1 test the head the
    xarray holds, so none of that THP's pages is mapped)?"""
    mem = core.pages
    order = mem.order[pfns].astype(np.int64)
    heads = pfns & ~((np.int64(1) << order) - 1)
    skip = np.uint32(mem.mask(PG.locked) | mem.m_hwpoison)
    return np.asarray((order != 0) & ((mem.flags[heads] & skip) != 0), dtype=np.bool_)


def filemap_map_pmd_window(vmf: VmFaultInfo, pfns: IntArray) -> bool | None:
    """The THP step of mm/filemap.c ``filemap_map_pages`` (v5.12; 6.1; 6.18) over the
    fault-around window's cached pfns: ``next_uptodate_page`` takes the first entry
    that is not locked, is uptodate and not PG_hwpoison, testing those flags on the
    entry the xarray holds, the head of a THP (so a THP with a poisoned tail is not
    skipped, and a poisoned head skips all of it); when that page is a THP,
    :func:`filemap_map_pmd`. True: the fault is done by a PMD; None: go on with
    PTEs."""
    core = vmf.vma.vm_mm.core
    mem = core.pages
    skip = np.uint32(mem.mask(PG.locked) | mem.m_hwpoison)
    need = np.uint32(mem.mask(PG.uptodate))
    for pfn in pfns[pfns >= 0].tolist():  # the window: at most FAULT_AROUND_PAGES
        head = thp_head(core, pfn)
        flags = mem.flags[head]
        if flags & skip or not flags & need:
            continue
        if not mem.order[head]:
            return None
        return True if filemap_map_pmd(vmf, pfn) else None
    return None


# -- unmapping a PMD --------------------------------------------------------------------------


def _unmap_file_pmd(vma: Vma, haddr: int) -> int:
    """Clear the PMD leaf at ``haddr`` of a file VMA and drop what the mapping held:
    the compound rmap, MM_SHMEMPAGES (or MM_FILEPAGES) and the head's reference.
    Dirty moves to the page. Returns the head pfn, or -1 when no leaf was there."""
    mm = vma.vm_mm
    core = mm.core
    orig = mm.pgd.pmdp_huge_get_and_clear(haddr)
    if not orig:
        return -1
    head = pmd_pfn(orig)
    mem = core.pages
    if orig & _PAGE_DIRTY:
        mem.flags[head] |= np.uint32(mem.mask(PG.dirty))
    page_remove_file_rmap_compound(core, head)
    if mem.flags[head] & np.uint32(mem.mask(PG.swapbacked)):
        mm.rss_shmem -= HPAGE_PMD_NR
    else:
        mm.rss_file -= HPAGE_PMD_NR
    put_page(mem[head])  # tlb_remove_page_size / put_page
    return head


def zap_huge_pmd_file(vma: Vma, haddr: int) -> int:
    """The file branch of mm/huge_memory.c ``zap_huge_pmd`` (v5.12; 6.1; 6.18): clear the
    PMD, ``page_remove_rmap(page, true)``, MM_SHMEMPAGES -= 512, drop the mapping's
    reference; no deposited table to free on x86. The page stays in the page
    cache. Returns the pages unmapped."""
    return HPAGE_PMD_NR if _unmap_file_pmd(vma, haddr) >= 0 else 0


def __split_huge_pmd_locked_file(vma: Vma, haddr: int) -> None:
    """The ``!vma_is_anonymous(vma)`` branch of mm/huge_memory.c
    ``__split_huge_pmd_locked`` (v5.12; 6.1; 6.18): a file PMD is not turned into
    PTEs, it is zapped ("We are going to unmap this huge page. So just go ahead and
    zap it"): no PTE table, no deposit to withdraw; the next access refaults (with
    PTEs when the VMA no longer fits the 2 MiB, with a PMD again otherwise). Dirty
    and young move to the page."""
    _unmap_file_pmd(vma, haddr)
    vma.vm_mm.core.flush_tlb_range(vma.vm_mm, haddr, haddr + HPAGE_PMD_SIZE)


# -- counters ---------------------------------------------------------------------------------


def _shmem_thp_heads(core: MmCore) -> IntArray:
    """Heads of the order-9 shmem pages in some page cache (vectorised over the vmemmap)."""
    mem = core.pages
    want = np.uint32(mem.bits.mask(PG.head, PG.swapbacked))
    sel = ((mem.flags & want) == want) & (mem.order == HPAGE_PMD_ORDER) & (mem.mapping != 0) \
        & ((mem.mapping & 1) == 0)
    return np.flatnonzero(sel).astype(np.int64)


def meminfo_shmem_thp(core: MmCore) -> dict[str, int]:
    """/proc/meminfo's ShmemHugePages (NR_SHMEM_THPS: shmem THPs in the page cache) and
    ShmemPmdMapped (NR_SHMEM_PMDMAPPED: those mapped by at least one PMD), in kB
    (fs/proc/meminfo.c, v5.12; 6.18 the same fields)."""
    heads = _shmem_thp_heads(core)
    mapped = sum(1 for h in heads.tolist() if core.pages.compound_mapcount.get(h, 0) > 0)
    kb = HPAGE_PMD_SIZE >> 10
    return {"ShmemHugePages": len(heads) * kb, "ShmemPmdMapped": mapped * kb}

