"""/proc/PID/smaps counters: what each mapping has resident, and how much of it is THP.

Follows ``fs/proc/task_mmu.c`` ``smap_gather_stats`` -> ``smaps_pte_entry`` /
``smaps_pmd_entry`` -> ``smaps_account`` (v5.12; 6.18 the same for these
fields), vectorised over PTE chunks. A PTE counts when it is present and
``vm_normal_page`` finds a page (the shared zero page does not); a huge PMD
counts 2 MiB, and AnonHugePages too when its page is anon (the huge zero
page is skipped: ``follow_trans_huge_pmd(FOLL_DUMP)`` fails on it). Values
are in kB, as the file prints them. Not modelled: Pss, Shared/Private
splits, Referenced, Swap, Locked, FilePmdMapped (no THP of a regular file).
ShmemPmdMapped counts the shmem THPs a PMD maps (mm/shmem_huge.py).
"""

from __future__ import annotations

import numpy as np

from kvmpoison.arch.x86.pgtable import pmd_pfn, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL, PAGE_SIZE
from kvmpoison.mm.huge_memory import HPAGE_PMD_SIZE, is_huge_zero_pmd, pmd_trans_huge
from kvmpoison.mm.mm_types import MmStruct, Vma
from kvmpoison.mm.page_flags import PG

SMAPS_FIELDS = ("Rss", "Anonymous", "AnonHugePages", "ShmemPmdMapped")


def smap_gather_stats(vma: Vma) -> dict[str, int]:
    """fs/proc/task_mmu.c ``smap_gather_stats`` (v5.12) for one VMA, in kB."""
    mm = vma.vm_mm
    core = mm.core
    mem = core.pages
    rss = anon = anon_huge = shmem_huge = 0
    swapbacked = np.uint32(mem.mask(PG.swapbacked))
    for chunk in mm.pgd.chunks(vma.vm_start, vma.vm_end):
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        pfns = pte_pfn_array(ptes[normal])
        rss += len(pfns) * PAGE_SIZE
        anon += int(((mem.mapping[pfns] & 1) != 0).sum()) * PAGE_SIZE
    for _, pmd in mm.pgd.pmd_leaves(vma.vm_start, vma.vm_end):
        if not pmd_trans_huge(pmd) or is_huge_zero_pmd(core, pmd):
            continue
        rss += HPAGE_PMD_SIZE
        head = pmd_pfn(pmd)
        if mem.mapping[head] & 1:
            anon += HPAGE_PMD_SIZE
            anon_huge += HPAGE_PMD_SIZE
        elif mem.flags[head] & swapbacked:  # smaps_pmd_entry: mss->shmem_thp
            shmem_huge += HPAGE_PMD_SIZE
    return {"Rss": rss >> 10, "Anonymous": anon >> 10, "AnonHugePages": anon_huge >> 10,
            "ShmemPmdMapped": shmem_huge >> 10}


def smaps_shmem_pmd_mapped(vma: Vma) -> int:
    """smaps' ShmemPmdMapped of one VMA, in kB: the shmem THPs it maps by PMD
    (``smaps_pmd_entry``'s ``mss->shmem_thp``, v5.12; 6.18 the same)."""
    return smap_gather_stats(vma)["ShmemPmdMapped"]


def smaps_rollup(mm: MmStruct) -> dict[str, int]:
    """fs/proc/task_mmu.c ``show_smaps_rollup`` (v5.12): the sums over every VMA, in kB."""
    total = dict.fromkeys(SMAPS_FIELDS, 0)
    for vma in mm.vmas:
        for key, value in smap_gather_stats(vma).items():
            total[key] += value
    return total
