"""mlock(2)/munlock(2).

Follows ``mm/mlock.c`` (v5.12): VM_LOCKED is set on the range, then
``__mm_populate`` faults it in without ignoring errors, and
``__mlock_posix_error_return`` maps -EFAULT to -ENOMEM and -ENOMEM to -EAGAIN.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL, PAGE_SIZE
from kvmpoison.mm.mm_types import VM, MmStruct
from kvmpoison.mm.mmap import __mm_populate, page_align, range_is_mapped, vmas_in_range
from kvmpoison.mm.page_flags import PG


def __mlock_posix_error_return(retval: int) -> int:
    if retval == -errno.EFAULT:
        return -errno.ENOMEM
    if retval == -errno.ENOMEM:
        return -errno.EAGAIN
    return retval


def _mark_mlocked(mm: MmStruct, start: int, end: int) -> None:
    mem = mm.core.pages
    bits = np.uint32(mem.bits.mask(PG.mlocked, PG.unevictable))
    for chunk in mm.pgd.chunks(start, end):
        ptes = mm.core.ptes.rows[chunk.rows, chunk.cols]
        normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        mem.flags[pte_pfn_array(ptes[normal])] |= bits


def _lock_range(mm: MmStruct, start: int, length: int) -> tuple[int, int] | None:
    """[start, end) widened to pages, or None if a page of it is unmapped (-ENOMEM)."""
    length = page_align(length + (start & (PAGE_SIZE - 1)))
    start &= ~(PAGE_SIZE - 1)
    end = start + length
    return (start, end) if range_is_mapped(mm, start, end) else None


def do_mlock(mm: MmStruct, start: int, length: int) -> int:
    span = _lock_range(mm, start, length)
    if span is None:
        return -errno.ENOMEM
    start, end = span
    for vma in vmas_in_range(mm, start, end, split=True):
        if not vma.vm_flags & VM.LOCKED:
            vma.vm_flags |= VM.LOCKED
            mm.locked_vm += vma.npages
    ret = __mm_populate(mm, start, end - start, ignore_errors=False)
    if ret:
        return __mlock_posix_error_return(ret)
    _mark_mlocked(mm, start, end)
    return 0


def do_munlock(mm: MmStruct, start: int, length: int) -> int:
    span = _lock_range(mm, start, length)
    if span is None:
        return -errno.ENOMEM
    start, end = span
    for vma in vmas_in_range(mm, start, end, split=True):
        if vma.vm_flags & VM.LOCKED:
            vma.vm_flags &= ~VM.LOCKED
            mm.locked_vm -= vma.npages
    mem = mm.core.pages
    clear = np.uint32(~mem.bits.mask(PG.mlocked) & 0xFFFF_FFFF)
    for chunk in mm.pgd.chunks(start, end):
        ptes = mm.core.ptes.rows[chunk.rows, chunk.cols]
        normal = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        mem.flags[pte_pfn_array(ptes[normal])] &= clear
    return 0
