"""khugepaged collapse and MADV_COLLAPSE: replace 512 small anon pages by one THP.

Follows ``mm/khugepaged.c`` of v5.12 (``khugepaged_scan_pmd``,
``collapse_huge_page``, ``__collapse_huge_page_isolate``/``_copy``) and the
6.1 tree for MADV_COLLAPSE (``madvise_collapse``, ``hpage_collapse_scan_pmd``
with ``cc->is_khugepaged == false``: no ``max_ptes_*`` limits and no
"referenced" requirement, errno by ``madvise_collapse_errno``); 6.18 is
taken to follow the 6.1 code. The scan is vectorised over the 512 PTEs.

There is no background thread: :func:`khugepaged_scan` runs one full pass
over every mm when a scenario asks for it. Simplified: swap entries in the
range are swapped in with the scalar fault path (``__collapse_huge_page_swapin``)
and any other non-present entry (hwpoison, migration, marker) makes the
swap-in fail; no NUMA node choice, no memcg charge, no ``khugepaged_defrag``;
file and shmem collapse (``collapse_file``) are not modelled.
"""

from __future__ import annotations

import enum
import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PAGE_SHIFT,
)
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_MASK,
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    __transparent_hugepage_enabled,
    alloc_hugepage_vma,
    deferred_split_ptes_unmapped,
    map_anon_folio_pmd,
    prune_deferred_split_queue,
    transhuge_vma_suitable,
)
from kvmpoison.mm.memory import _put_pages_bulk, handle_mm_fault
from kvmpoison.mm.mm_types import VM, FaultFlag, MmStruct, Vma, VmFault, vma_is_anonymous
from kvmpoison.mm.page import put_page
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.mm.page_flags import PG

# /sys/kernel/mm/transparent_hugepage/khugepaged/* defaults (v5.12 and 6.x)
KHUGEPAGED_MAX_PTES_NONE = HPAGE_PMD_NR - 1
KHUGEPAGED_MAX_PTES_SWAP = HPAGE_PMD_NR // 8
KHUGEPAGED_MAX_PTES_SHARED = HPAGE_PMD_NR // 2


class Scan(enum.Enum):
    """``enum scan_result`` (mm/khugepaged.c): the names the kernel traces."""

    FAIL = "SCAN_FAIL"
    SUCCEED = "SCAN_SUCCEED"
    PMD_NULL = "SCAN_PMD_NULL"
    PMD_NONE = "SCAN_PMD_NONE"  # 6.1; v5.12 reports SCAN_PMD_NULL
    PMD_MAPPED = "SCAN_PMD_MAPPED"  # 6.1; v5.12 reports SCAN_PMD_NULL
    EXCEED_NONE_PTE = "SCAN_EXCEED_NONE_PTE"
    EXCEED_SWAP_PTE = "SCAN_EXCEED_SWAP_PTE"
    EXCEED_SHARED_PTE = "SCAN_EXCEED_SHARED_PTE"
    PTE_UFFD_WP = "SCAN_PTE_UFFD_WP"
    PAGE_RO = "SCAN_PAGE_RO"
    LACK_REFERENCED_PAGE = "SCAN_LACK_REFERENCED_PAGE"
    PAGE_NULL = "SCAN_PAGE_NULL"
    PAGE_COUNT = "SCAN_PAGE_COUNT"
    PAGE_LRU = "SCAN_PAGE_LRU"
    PAGE_LOCK = "SCAN_PAGE_LOCK"
    PAGE_ANON = "SCAN_PAGE_ANON"
    VMA_CHECK = "SCAN_VMA_CHECK"
    ALLOC_HUGE_PAGE_FAIL = "SCAN_ALLOC_HUGE_PAGE_FAIL"


def hugepage_vma_check(vma: Vma, enforce_sysfs: bool) -> bool:
    """mm/huge_memory.c ``hugepage_vma_check`` (6.1; v5.12 ``hugepage_vma_check`` in
    khugepaged.c, always enforcing sysfs) for the khugepaged / MADV_COLLAPSE callers:
    an anon VMA with an anon_vma, no VM_NOHUGEPAGE or VM_NO_KHUGEPAGED
    (VM_SPECIAL, VM_HUGETLB), an aligned 2 MiB inside it, and (khugepaged only) a
    sysfs mode that allows it."""
    flags = vma.vm_flags
    if flags & (VM.NOHUGEPAGE | VM.PFNMAP | VM.IO | VM.DONTEXPAND | VM.MIXEDMAP | VM.HUGETLB):
        return False
    if not vma_is_anonymous(vma) or flags & VM.SHARED or vma.anon_vma is None:
        return False
    if not transhuge_vma_suitable(vma, (vma.vm_end & HPAGE_PMD_MASK) - HPAGE_PMD_SIZE):
        return False
    return not enforce_sysfs or __transparent_hugepage_enabled(vma)


def hpage_collapse_scan_pmd(vma: Vma, address: int, is_khugepaged: bool) -> Scan:
    """mm/khugepaged.c ``khugepaged_scan_pmd`` (v5.12) / ``hpage_collapse_scan_pmd``
    (6.1): may the 2 MiB at ``address`` collapse? Then collapse it.

    Swap entries count as unmapped (at most ``max_ptes_swap``), none and
    zero-page PTEs as empty (at most ``max_ptes_none``), pages mapped more than
    once as shared (at most ``max_ptes_shared``); each present page must be an
    anon LRU page whose references are all mappings (no GUP pin:
    ``is_refcount_suitable``); one PTE must be writable, and for khugepaged one
    young (with swap entries, half of them). MADV_COLLAPSE skips the limits and
    the young test.
    """
    mm = vma.vm_mm
    core = mm.core
    version = core.kcfg.version.tuple
    pgd = mm.pgd
    if pgd.pmd_leaf(address):
        return Scan.PMD_MAPPED if version >= (6, 1) else Scan.PMD_NULL
    if pgd.pmd_none(address):
        return Scan.PMD_NONE if version >= (6, 1) else Scan.PMD_NULL
    ptes = _pmd_ptes(mm, address)
    none = pte_none_array(ptes)
    present = pte_present_array(ptes)
    swap = ~none & ~present
    pfns = pte_pfn_array(ptes)
    zero = present & ((ptes & np.uint64(_PAGE_SPECIAL)) != 0) & (pfns == core.zero_pfn)
    empty = none | zero
    if is_khugepaged and int(swap.sum()) > KHUGEPAGED_MAX_PTES_SWAP:
        return Scan.EXCEED_SWAP_PTE
    if is_khugepaged and int(empty.sum()) > KHUGEPAGED_MAX_PTES_NONE:
        return Scan.EXCEED_NONE_PTE
    if empty.any() and vma.uffd_ctx is not None and vma.vm_flags & (VM.UFFD_MISSING | VM.UFFD_WP):
        return Scan.EXCEED_NONE_PTE  # userfaultfd_armed
    mapped = present & ~zero
    if (mapped & ((ptes & np.uint64(_PAGE_SPECIAL)) != 0)).any():
        return Scan.PAGE_NULL  # vm_normal_page: a special mapping
    mem = core.pages
    idx = pfns[mapped]
    writable = bool((ptes[mapped] & np.uint64(_PAGE_RW)).any())
    if len(idx):
        heads = idx & ~((np.int64(1) << mem.order[idx].astype(np.int64)) - 1)
        mapcount = mem._mapcount[idx] + 1 + _per_head(mem.compound_mapcount, heads)
        if is_khugepaged and int((mapcount > 1).sum()) > KHUGEPAGED_MAX_PTES_SHARED:
            return Scan.EXCEED_SHARED_PTE
        flags = mem.flags[heads]
        if ((flags & np.uint32(mem.mask(PG.lru))) == 0).any():
            return Scan.PAGE_LRU
        if ((flags & np.uint32(mem.mask(PG.locked))) != 0).any():
            return Scan.PAGE_LOCK
        if ((mem.mapping[heads] & 1) == 0).any():
            return Scan.PAGE_ANON
        if not _refcounts_suitable(core, heads):
            return Scan.PAGE_COUNT
    referenced = int(((ptes[mapped] & np.uint64(_PAGE_ACCESSED)) != 0).sum())
    unmapped = int(swap.sum())
    if not writable:
        return Scan.PAGE_RO
    if is_khugepaged and (not referenced or (unmapped and referenced < HPAGE_PMD_NR // 2)):
        return Scan.LACK_REFERENCED_PAGE
    return collapse_huge_page(vma, address, unmapped)


def _pmd_ptes(mm: MmStruct, address: int) -> np.ndarray:
    """The 512 PTEs of the table under ``address``'s PMD slot."""
    slot = mm.pgd.pte_slot(address)
    assert slot is not None
    return np.asarray(mm.core.ptes.rows[slot[0]].copy(), dtype=np.uint64)


def _per_head(counts: dict[int, int], heads: np.ndarray) -> np.ndarray:
    """``counts[head]`` (0 when absent) for each element of ``heads``; one dict lookup per
    distinct compound head, not per page."""
    out = np.zeros(len(heads), dtype=np.int32)
    if counts:
        uniq = sorted_unique(heads)  # not np.unique: it imports numpy.ma on first use
        vals = np.array([counts.get(int(h), 0) for h in uniq], dtype=np.int32)
        out = vals[np.searchsorted(uniq, heads)]
    return out


def _refcounts_suitable(core: MmCore, heads: np.ndarray) -> bool:
    """mm/khugepaged.c ``is_refcount_suitable`` (v5.12) for every distinct page: its
    references are exactly its mappings (``total_mapcount``; no swap cache). Order-0
    pages are checked in one vector operation, compound pages one by one (few)."""
    mem = core.pages
    uniq = sorted_unique(heads)
    small = uniq[mem.order[uniq] == 0]
    if (mem._refcount[small] != mem._mapcount[small] + 1).any():
        return False
    for head in uniq[mem.order[uniq] != 0].tolist():
        order = int(mem.order[head])
        span = mem._mapcount[head : head + (1 << order)]
        total = int((span + 1).sum()) + mem.compound_mapcount.get(head, 0)
        if int(mem._refcount[head]) != total:
            return False
    return True


def collapse_huge_page(vma: Vma, address: int, unmapped: int) -> Scan:
    """mm/khugepaged.c ``collapse_huge_page`` (v5.12): allocate the THP, swap in the
    swap entries, detach the PTE table (``pmdp_collapse_flush``), copy every page
    (empty and zero-page PTEs give zeroes), drop the old pages (their mapping and
    the reference; MM_ANONPAGES grows by the empty PTEs), and map the THP by a
    dirty PMD, writable if the VMA is, the old PTE table deposited for a later
    split. Re-checks of the isolate step find what the scan found (the model is
    single-threaded), so they are not repeated.
    """
    mm = vma.vm_mm
    core = mm.core
    new = alloc_hugepage_vma(vma)
    if new is None:
        return Scan.ALLOC_HUGE_PAGE_FAIL
    if unmapped:  # __collapse_huge_page_swapin
        ptes = _pmd_ptes(mm, address)
        todo = np.flatnonzero(~pte_none_array(ptes) & ~pte_present_array(ptes))
        for i in todo.tolist():
            ret = handle_mm_fault(vma, address + (i << PAGE_SHIFT), FaultFlag.ALLOW_RETRY)
            if ret & (VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.OOM | VmFault.HWPOISON
                      | VmFault.RETRY):
                _free_new(core, new.pfn)
                return Scan.FAIL
        ptes = _pmd_ptes(mm, address)
        if (~pte_none_array(ptes) & ~pte_present_array(ptes)).any():
            _free_new(core, new.pfn)
            return Scan.FAIL
    ptes = _pmd_ptes(mm, address)
    present = pte_present_array(ptes)
    pfns = pte_pfn_array(ptes)
    zero = present & ((ptes & np.uint64(_PAGE_SPECIAL)) != 0)
    mapped = present & ~zero
    src = np.flatnonzero(mapped)
    held = core.hw.mem.allocated_pfns_in(pfns[src])  # frames that are not all zeroes
    if len(held):
        lookup = {int(p): int(i) for i, p in zip(src, pfns[src], strict=True)}
        for pfn in held.tolist():  # __collapse_huge_page_copy
            core.copy_page(new.pfn + lookup[pfn], pfn)
    old = pfns[mapped]
    mem = core.pages
    mm.pgd.pmd_install_leaf_over_table(address)  # pmdp_collapse_flush; the table is kept
    core.flush_tlb_range(mm, address, address + HPAGE_PMD_SIZE)
    if len(old):
        np.subtract.at(mem._mapcount, old, 1)  # page_remove_rmap
        if mem.order[old].any():
            deferred_split_ptes_unmapped(core, old)
        _put_pages_bulk(core, old)
        prune_deferred_split_queue(core)
    mm.rss_anon -= len(old)  # the old pages go; map_anon_folio_pmd counts all 512
    map_anon_folio_pmd(vma, new.pfn, address)
    return Scan.SUCCEED


def _free_new(core: MmCore, head: int) -> None:
    """``put_page`` of the new THP after a failed collapse (its only reference)."""
    put_page(core.pages[head])


def khugepaged_scan(core: MmCore) -> int:
    """One full pass of mm/khugepaged.c ``khugepaged_do_scan`` /
    ``khugepaged_scan_mm_slot`` (v5.12) over every mm: each 2 MiB of each VMA that
    ``hugepage_vma_check`` accepts (sysfs enforced) is scanned and collapsed when it
    qualifies. ``pages_to_scan`` is not modelled (the pass covers everything).
    Returns the number of THPs collapsed."""
    collapsed = 0
    for mm in list(core.mms.values()):
        for vma in sorted(mm.vmas, key=lambda v: v.vm_start):
            if not hugepage_vma_check(vma, enforce_sysfs=True):
                continue
            start = (vma.vm_start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
            for addr in range(start, vma.vm_end & HPAGE_PMD_MASK, HPAGE_PMD_SIZE):
                if hpage_collapse_scan_pmd(vma, addr, is_khugepaged=True) is Scan.SUCCEED:
                    collapsed += 1
    return collapsed


def madvise_collapse_errno(result: Scan) -> int:
    """mm/khugepaged.c ``madvise_collapse_errno`` (6.1)."""
    if result is Scan.ALLOC_HUGE_PAGE_FAIL:
        return -errno.ENOMEM
    if result in (Scan.PAGE_COUNT, Scan.PAGE_LOCK, Scan.PAGE_LRU):
        return -errno.EAGAIN
    return -errno.EINVAL


_CONTINUE = (Scan.PMD_NULL, Scan.PTE_UFFD_WP, Scan.PAGE_RO, Scan.LACK_REFERENCED_PAGE,
             Scan.PAGE_NULL, Scan.PAGE_COUNT, Scan.PAGE_LOCK, Scan.PAGE_LRU)


def madvise_collapse(vma: Vma, start: int, end: int) -> int:
    """mm/khugepaged.c ``madvise_collapse`` (6.1; MADV_COLLAPSE appeared in 6.1, so
    v5.12's ``madvise_behavior_valid`` refuses it with -EINVAL).

    -EINVAL when ``hugepage_vma_check`` (sysfs not enforced) refuses the VMA.
    Every aligned 2 MiB of [start, end) is scanned and collapsed; one already
    PMD-mapped counts as done. 0 when all are THPs at the end, else the errno of
    the last failure (``madvise_collapse_errno``); results outside the kernel's
    "continue" list stop the walk (SCAN_PMD_NONE, a range with no page table,
    is one).
    """
    if not hugepage_vma_check(vma, enforce_sysfs=False):
        return -errno.EINVAL
    hstart = (start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
    hend = end & HPAGE_PMD_MASK
    thps = 0
    last_fail = Scan.FAIL
    for addr in range(hstart, hend, HPAGE_PMD_SIZE):
        result = hpage_collapse_scan_pmd(vma, addr, is_khugepaged=False)
        if result in (Scan.SUCCEED, Scan.PMD_MAPPED):
            thps += 1
            continue
        last_fail = result
        if result not in _CONTINUE:
            break
    return 0 if thps == (hend - hstart) // HPAGE_PMD_SIZE else madvise_collapse_errno(last_fail)

