"""mincore(2): which pages are resident.

Follows ``mm/mincore.c``: a none PTE (and, from v6.x, a PTE marker, via
``pte_none_mostly``) asks the page cache of a file VMA; a present PTE is 1;
a migration or hwpoison entry "is always uptodate" (1); a real swap entry
is resident only while in the swap cache, which the model never keeps (0).
A PMD leaf (``pmd_trans_huge_lock`` succeeds: a THP, the huge zero page or a
PMD migration entry) reports all of its pages resident.
"""

from __future__ import annotations

import errno

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.memory import _swp_entry_fields
from kvmpoison.mm.mm_types import MmStruct, Vma
from kvmpoison.mm.mmap import page_align, range_is_mapped, vmas_in_range


def _mincore_vma(vma: Vma, start: int, end: int) -> npt.NDArray[np.uint8]:
    """mm/mincore.c ``mincore_pte_range``/``__mincore_unmapped_range`` (v5.12; 6.18's
    ``pte_none_mostly`` and ``mincore_swap``) for one VMA.
    """
    mm = vma.vm_mm
    core = mm.core
    types = core.swap_types
    n = (end - start) >> PAGE_SHIFT
    vec = np.zeros(n, dtype=np.uint8)
    unmapped = np.ones(n, dtype=bool)
    for chunk in mm.pgd.chunks(start, end):
        idx = (chunk.addr - start) >> PAGE_SHIFT
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        none = pte_none_array(ptes)
        present = pte_present_array(ptes)
        swap = ~none & ~present
        stypes, _ = _swp_entry_fields(core, ptes)
        marker = swap & (stypes == (types.pte_marker if types.pte_marker is not None else -1))
        vec[idx[present]] = 1
        vec[idx[swap & ~marker & (stypes >= types.max_swapfiles)]] = 1
        unmapped[idx[~(none | marker)]] = False
    for haddr, _ in mm.pgd.pmd_leaves(start, end):  # mincore_pte_range: memset(vec, 1, nr)
        lo = (max(haddr, start) - start) >> PAGE_SHIFT
        hi = (min(haddr + (1 << 21), end) - start) >> PAGE_SHIFT
        vec[lo:hi] = 1
        unmapped[lo:hi] = False
    mapping = vma.vm_file.f_mapping if vma.vm_file is not None else None
    if mapping is not None and unmapped.any():
        first = vma.linear_page_index(start)
        cached = mapping.lookup_range(first, n) >= 0
        vec[unmapped & cached] = 1
    return vec


def do_mincore(mm: MmStruct, start: int, length: int) -> npt.NDArray[np.uint8] | int:
    """mm/mincore.c ``do_mincore`` (v5.12): the residency vector, or -errno.

    Not modelled: ``can_do_mincore`` (a file the caller cannot write reports 1s).
    """
    if start & (PAGE_SIZE - 1):
        return -errno.EINVAL
    end = start + page_align(length)
    if not range_is_mapped(mm, start, end):
        return -errno.ENOMEM
    parts = [_mincore_vma(v, max(start, v.vm_start), min(end, v.vm_end))
             for v in vmas_in_range(mm, start, end, split=False)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
