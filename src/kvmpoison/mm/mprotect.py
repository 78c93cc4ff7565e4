"""mprotect(2): change VMA protections and rewrite the present PTEs in bulk.

Follows ``mm/mprotect.c`` (v5.12 ``mprotect_fixup``/``change_pte_range``, with
v6.x's ``can_change_pte_writable`` for exclusive anonymous pages). Swap
entries, hwpoison entries and PTE markers are left alone.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_modify_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_DIRTY, _PAGE_RW, _PAGE_SPECIAL, PAGE_SIZE
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.mmap import (
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    calc_vm_prot_bits,
    page_align,
    range_is_mapped,
    vmas_in_range,
)


def change_protection(vma: Vma, start: int, end: int) -> int:
    """Rewrite present PTEs of [start, end) to ``vma.vm_page_prot``; returns pages changed."""
    mm = vma.vm_mm
    core = mm.core
    newprot = vma.vm_page_prot
    private_write = (vma.vm_flags & (VM.WRITE | VM.SHARED)) == VM.WRITE
    shared_write = bool(vma.vm_flags & VM.WRITE and vma.vm_flags & VM.SHARED)
    changed = 0
    mem = core.pages
    for chunk in mm.pgd.chunks(start, end):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        present = pte_present_array(ptes)
        if not present.any():
            continue
        old = ptes[present]
        new = pte_modify_array(old, newprot)
        if private_write:
            # An exclusive, dirty anonymous page can be made writable at once.
            normal = (old & np.uint64(_PAGE_SPECIAL)) == 0
            pfns = pte_pfn_array(old)
            exclusive = normal & ((mem.mapping[pfns] & 1) != 0) & (mem._mapcount[pfns] == 0)
            dirty = (old & np.uint64(_PAGE_DIRTY)) != 0
            new = np.where(exclusive & dirty, new | np.uint64(_PAGE_RW), new)
        elif not shared_write:
            new &= np.uint64(~_PAGE_RW & 0xFFFF_FFFF_FFFF_FFFF)
        store[chunk.rows[present], chunk.cols[present]] = new
        changed += int(present.sum())
    core.flush_tlb_range(mm, start, end)
    return changed


def do_mprotect(mm: MmStruct, start: int, length: int, prot: int) -> int:
    if start & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
        return -errno.EINVAL
    length = page_align(length)
    end = start + length
    if end < start:
        return -errno.ENOMEM
    if not length:
        return 0
    if not range_is_mapped(mm, start, end):
        return -errno.ENOMEM
    want = calc_vm_prot_bits(prot)
    vmas = vmas_in_range(mm, start, end, split=False)
    for vma in vmas:  # check all before changing any
        may = ((VM.READ if vma.vm_flags & VM.MAYREAD else VM(0))
               | (VM.WRITE if vma.vm_flags & VM.MAYWRITE else VM(0))
               | (VM.EXEC if vma.vm_flags & VM.MAYEXEC else VM(0)))
        if want & ~may:
            return -errno.EACCES
    for vma in vmas_in_range(mm, start, end, split=True):
        vma.vm_flags = (vma.vm_flags & ~(VM.READ | VM.WRITE | VM.EXEC)) | want
        change_protection(vma, vma.vm_start, vma.vm_end)
    return 0
