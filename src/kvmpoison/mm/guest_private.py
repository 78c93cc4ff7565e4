"""The hardened design's mm side: PG_guest_private pages and their refusals.

Not upstream (docs/hardened.md): with ``MmHooks.guest_private`` a page KVM
made private carries PG_guest_private (never PG_hwpoison) and every host PTE
of it is a PTE_MARKER_GUEST_PRIVATE entry. The fault, zap, fork and rmap
paths honour them where they live (mm/memory.c, mm/rmap.c, mm/shmem.c);
this module holds the range test they share and the entry points that
refuse to move or take such a page: ``move_pages``/``migrate_pages``,
``offline_pages`` and ``alloc_contig_range``. Each names the kernel function
it sits in; without the hook they model what the kernel decides, simplified
as their docstrings say.
"""

from __future__ import annotations

import errno

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_pfn, pte_present, pte_present_array
from kvmpoison.arch.x86.pgtable_64 import __swp_offset_array, __swp_type_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    PAGE_SIZE,
)
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import PAGE_MAPPING_ANON, Page, PageFlag, page_count
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.swapops import (
    PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT,
    PteMarker,
    make_guest_private_entry,
    swp_entry_to_pte,
)

GUP_PIN_BIAS = 1 << 10  # GUP_PIN_COUNTING_BIAS (include/linux/mm.h); mm/gup.py imports us


def PageGuestPrivate(page: Page) -> bool:
    """The hardened design's page flag (a modelled PG_guest_private)."""
    return PageFlag(page, PG.guest_private)


_MARKER_CLEAN = np.uint64(~(_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP | _PAGE_SWP_EXCLUSIVE)
                          & 0xFFFF_FFFF_FFFF_FFFF)


def guest_private_markers(mm: MmStruct, start: int, end: int) -> npt.NDArray[np.int64]:
    """The pfns that PTE_MARKER_GUEST_PRIVATE entries of ``mm`` in [start, end) hold."""
    core = mm.core
    out: list[npt.NDArray[np.int64]] = []
    if core.swap_types.pte_marker is None:
        return np.zeros(0, dtype=np.int64)
    start &= ~(PAGE_SIZE - 1)
    end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    for chunk in mm.pgd.chunks(start, end):
        pfns = guest_private_marker_pfns(core, core.ptes.rows[chunk.rows, chunk.cols])
        if len(pfns):
            out.append(pfns)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def guest_private_marker_pfns(core: MmCore, ptes: npt.NDArray[np.uint64]
                              ) -> npt.NDArray[np.int64]:
    """The pfns the PTE_MARKER_GUEST_PRIVATE entries among the PTE values ``ptes`` hold
    (each holds one reference on its page)."""
    types = core.swap_types
    swap = ~pte_none_array(ptes) & ~pte_present_array(ptes)
    if types.pte_marker is None or not swap.any():
        return np.zeros(0, dtype=np.int64)
    clean = ptes[swap] & _MARKER_CLEAN
    stypes = __swp_type_array(clean).astype(np.int64)
    soffs = __swp_offset_array(clean).astype(np.int64)
    hit = (stypes == types.pte_marker) & ((soffs & int(PteMarker.GUEST_PRIVATE)) != 0)
    pfns: npt.NDArray[np.int64] = soffs[hit] >> PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT
    return pfns


def range_holds_guest_private(mm: MmStruct, start: int, end: int) -> bool:
    """Does [start, end) of ``mm`` hold a guest-private marker (hardened only)?"""
    return mm.core.hooks.guest_private and bool(len(guest_private_markers(mm, start, end)))


def move_pages(mm: MmStruct, addrs: list[int]) -> list[int]:
    """move_pages(2) of each page to node 0: its status (mm/migrate.c ``do_pages_move`` ->
    ``add_page_for_migration``, v5.12 and 6.1, checked in 6.1's source).

    The model is one NUMA node, so node 0 is the only valid target and a page
    found is already there: status 0 (``page_to_nid(page) == node``). No VMA:
    -EFAULT. ``follow_page(FOLL_GET | FOLL_DUMP)`` finding no page (a none PTE,
    a swap, hwpoison or marker entry) is -EFAULT in an anonymous VMA
    (``no_page_table`` under FOLL_DUMP) and -ENOENT in a file VMA; the zero
    page is -EFAULT. The hardened design recognises its marker first and
    answers -EBUSY (the isolation ``isolate_lru_page`` would refuse), as
    guest_memfd's ``kvm_gmem_migrate_folio`` refuses its folios. Under the RFC
    the hwpoison entry is no page (E18: the page never moves).
    """
    core = mm.core
    out: list[int] = []
    for addr in addrs:
        vma = next((v for v in mm.vmas if v.vm_start <= addr < v.vm_end), None)  # vma_lookup
        if vma is None:
            out.append(-errno.EFAULT)
            continue
        if core.hooks.guest_private and len(guest_private_markers(mm, addr, addr + 1)):
            out.append(-errno.EBUSY)
            continue
        pte = mm.pgd.get(addr)
        anon = vma.vm_file is None
        if not pte_present(pte):
            out.append(-errno.EFAULT if anon else -errno.ENOENT)
            continue
        out.append(0 if page_count(core.pages[pte_pfn(pte)]) and pte_pfn(pte) != core.zero_pfn
                   else -errno.EFAULT)
    return out


def _unmovable(core: MmCore, pfns: npt.NDArray[np.int64], isolated_hwpoison: bool
               ) -> bool:
    """Would isolating and migrating every in-use page of ``pfns`` fail? (the verdict of
    ``start_isolate_page_range`` + ``do_migrate_range`` + ``test_pages_isolated``)."""
    mem = core.pages
    flags = mem.flags[pfns]
    in_use = mem._refcount[pfns] > 0
    if core.hooks.guest_private and (flags & np.uint32(mem.mask(PG.guest_private))).any():
        return True  # the design's private pages never move
    poisoned = (flags & np.uint32(mem.mask(PG.hwpoison))) != 0
    if poisoned.any() and not isolated_hwpoison:
        return True  # without MEMORY_OFFLINE a poisoned page is not isolated
    movers = in_use & ~poisoned
    if ((flags[movers] & np.uint32(mem.mask(PG.lru))) == 0).any():
        return True  # has_unmovable_pages: in use and not on the LRU
    if (mem._refcount[pfns[movers]] >= GUP_PIN_BIAS).any():
        return True  # pinned: migrate_pages fails on the extra references
    values = sorted_unique(mem.mapping[pfns[movers]])
    for value in values[(values != 0) & ((values & PAGE_MAPPING_ANON) == 0)].tolist():
        host = getattr(mem.registry.decode(int(value)), "host", None)
        if getattr(host, "kind", "") == "gmem":
            return True  # guest_memfd: mapping_set_unmovable (AS_UNMOVABLE)
    return False


def offline_pages(core: MmCore, start_pfn: int, nr_pages: int) -> int:
    """Memory hot-unplug of [start_pfn, start_pfn + nr_pages): 0 or -errno.

    mm/memory_hotplug.c ``offline_pages`` (v5.12, 6.1 source), reduced to its
    verdict: ``start_isolate_page_range(MEMORY_OFFLINE)``/``has_unmovable_pages``,
    ``do_migrate_range`` and ``test_pages_isolated(MEMORY_OFFLINE)``. A
    PageHWPoison page is skipped by the migration and counted as isolated
    (``__test_page_isolated_in_pageblock``), so a range whose only users are
    poisoned pages goes offline: with the RFC that is every protected page,
    still mapped in the guest (E17). An LRU page would migrate. Refused with
    -EBUSY: a page in use but not on the LRU, a pinned page, a guest_memfd
    page (AS_UNMOVABLE), and, in the hardened design, a PG_guest_private page.
    Simplified: no migration happens (success only reports 0, the range stays
    in the allocator), and where the kernel retries a failing migration until
    a signal the model answers -EBUSY at once. Any range inside the machine,
    not only a memory block.
    """
    end = start_pfn + nr_pages
    if nr_pages <= 0 or start_pfn < 1 or end > core.pages.nr_pages:
        return -errno.EINVAL
    pfns = np.arange(start_pfn, end, dtype=np.int64)
    return -errno.EBUSY if _unmovable(core, pfns, isolated_hwpoison=True) else 0


def alloc_contig_range(core: MmCore, start_pfn: int, nr_pages: int) -> int:
    """CMA's contiguous allocation over [start_pfn, +nr_pages): 0 or -errno.

    mm/page_alloc.c ``alloc_contig_range`` (v5.12, 6.1 source), reduced to its
    verdict as :func:`offline_pages`, but isolation runs without
    MEMORY_OFFLINE: a PageHWPoison page is not isolated, so every
    RFC-protected page makes it fail with -EBUSY (E19).
    """
    end = start_pfn + nr_pages
    if nr_pages <= 0 or start_pfn < 1 or end > core.pages.nr_pages:
        return -errno.EINVAL
    pfns = np.arange(start_pfn, end, dtype=np.int64)
    return -errno.EBUSY if _unmovable(core, pfns, isolated_hwpoison=False) else 0


def guest_private_refault(mm: MmStruct, addr: int) -> int | None:
    """The hardened design's answer to RFCv2 09/13's TODO ("fault in hwpoison entries"):
    map a guest-private page of a shmem file back into ``mm`` at ``addr`` as a marker.

    When a zap without truncation (MADV_DONTNEED, munmap and mmap again) drops
    the VMM's marker, the page is still in the file's page cache, private and
    bound. KVM asks for it here: a none PTE over a cached PG_guest_private
    page gets a PTE_MARKER_GUEST_PRIVATE entry again (with its page
    reference). Returns the pfn, or None (no such page: nothing is done).
    """
    core = mm.core
    vma = next((v for v in mm.vmas if v.vm_start <= addr < v.vm_end), None)
    if vma is None or vma.vm_file is None or vma.vm_file.f_inode.kind != "shmem":
        return None
    mapping = vma.vm_file.f_mapping
    if mapping is None or mm.pgd.get(addr) != 0:
        return None
    pfn = mapping.lookup(vma.linear_page_index(addr))
    if pfn is None or not PageGuestPrivate(core.pages[pfn]):
        return None
    slot = mm.pgd.pte_slot(addr, alloc=True)
    assert slot is not None
    core.ptes.rows[slot] = swp_entry_to_pte(make_guest_private_entry(pfn, core.swap_types))
    core.pages._refcount[pfn] += 1  # the marker's reference (get_page)
    return int(pfn)
