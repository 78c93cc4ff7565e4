"""mlock(2)/munlock(2).

Follows ``mm/mlock.c`` (v5.12): VM_LOCKED is set on the range, then
``__mm_populate`` faults it in without ignoring errors, and
``__mlock_posix_error_return`` maps -EFAULT to -ENOMEM and -ENOMEM to -EAGAIN.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pmd_pfn, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL, PAGE_SIZE
from kvmpoison.mm.huge_memory import is_huge_zero_pmd, pmd_trans_huge
from kvmpoison.mm.mm_types import VM, MmStruct
from kvmpoison.mm.mmap import __mm_populate, page_align, vmas_in_range
from kvmpoison.mm.page_flags import PG


def __mlock_posix_error_return(retval: int) -> int:
    """mm/mlock.c ``__mlock_posix_error_return`` (v5.12)."""
    if retval == -errno.EFAULT:
        return -errno.ENOMEM
    if retval == -errno.ENOMEM:
        return -errno.EAGAIN
    return retval


def _mark_mlocked(mm: MmStruct, start: int, end: int) -> None:
    """FOLL_MLOCK's ``mlock_vma_page`` (mm/gup.c follow_page_pte, v5.12) on the populated pages."""
    mem = mm.core.pages
    bits = np.uint32(mem.bits.mask(PG.mlocked, PG.unevictable))
    for chunk in mm.pgd.chunks(start, end):
        ptes = mm.core.ptes.rows[chunk.rows, chunk.cols]
        normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        mem.flags[pte_pfn_array(ptes[normal])] |= bits
    for head in _thp_heads(mm, start, end):  # follow_trans_huge_pmd's FOLL_MLOCK branch
        if mem.compound_mapcount.get(head, 0) == 1:
            mem.flags[head] |= bits


def _thp_heads(mm: MmStruct, start: int, end: int) -> list[int]:
    """Head pfns of the anon THPs mapped by huge PMDs in [start, end) (not the zero page)."""
    core = mm.core
    return [pmd_pfn(pmd) for _, pmd in mm.pgd.pmd_leaves(start, end)
            if pmd_trans_huge(pmd) and not is_huge_zero_pmd(core, pmd)]


def _lock_range(mm: MmStruct, start: int, length: int) -> tuple[int, int, int]:
    """(start, end, hole): [start, end) widened to pages, and where its first hole starts.

    ``apply_vma_lock_flags`` changes the VMAs up to a hole before it returns
    -ENOMEM, so the caller applies the change to [start, hole) either way.
    """
    length = page_align(length + (start & (PAGE_SIZE - 1)))
    start &= ~(PAGE_SIZE - 1)
    end = start + length
    addr = start
    for vma in sorted(mm.vmas, key=lambda v: v.vm_start):
        if vma.vm_end <= addr:
            continue
        if vma.vm_start > addr:
            break
        addr = min(vma.vm_end, end)
        if addr >= end:
            break
    return start, end, addr


def do_mlock(mm: MmStruct, start: int, length: int) -> int:
    """mm/mlock.c ``do_mlock`` (v5.12; v6.18 the same): lock, then ``__mm_populate``.

    Simplified: RLIMIT_MEMLOCK is not checked (the model runs with CAP_IPC_LOCK).
    """
    start, end, hole = _lock_range(mm, start, length)
    if hole > start:
        for vma in vmas_in_range(mm, start, hole, split=True):
            if not vma.vm_flags & VM.LOCKED:
                vma.vm_flags |= VM.LOCKED
                mm.locked_vm += vma.npages
    if hole < end:
        return -errno.ENOMEM  # the VMAs before the hole stay locked, unpopulated
    ret = __mm_populate(mm, start, end - start, ignore_errors=False)
    if ret:
        return __mlock_posix_error_return(ret)
    _mark_mlocked(mm, start, end)
    return 0


def do_munlock(mm: MmStruct, start: int, length: int) -> int:
    """mm/mlock.c ``munlock`` -> ``apply_vma_lock_flags(start, len, 0)``.

    ``munlock_vma_pages_range`` puts each page back on an evictable LRU:
    PG_mlocked and PG_unevictable are both cleared. Simplified: a page also
    mapped by another VM_LOCKED VMA loses them too (``try_to_munlock`` would
    keep it mlocked).
    """
    start, end, hole = _lock_range(mm, start, length)
    if hole > start:
        for vma in vmas_in_range(mm, start, hole, split=True):
            if vma.vm_flags & VM.LOCKED:
                vma.vm_flags &= ~VM.LOCKED
                mm.locked_vm -= vma.npages
        mem = mm.core.pages
        clear = np.uint32(~mem.bits.mask(PG.mlocked, PG.unevictable) & 0xFFFF_FFFF)
        for chunk in mm.pgd.chunks(start, hole):
            ptes = mm.core.ptes.rows[chunk.rows, chunk.cols]
            normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
            mem.flags[pte_pfn_array(ptes[normal])] &= clear
        for head in _thp_heads(mm, start, hole):
            mem.flags[head] &= clear
    return -errno.ENOMEM if hole < end else 0
