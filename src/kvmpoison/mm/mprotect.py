"""mprotect(2): change VMA protections and rewrite the present PTEs in bulk.

Follows ``mm/mprotect.c`` (v5.12 ``do_mprotect_pkey``/``mprotect_fixup``/
``change_pte_range``; 6.18's ``can_change_pte_writable`` upgrade of exclusive
anonymous pages). Swap entries, hwpoison entries and PTE markers are left
alone. Simplified: no pkeys, no READ_IMPLIES_EXEC, no PROT_GROWSDOWN/UP
semantics (the bits are stripped), no commit accounting, write migration
entries are not downgraded (the model never migrates).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_modify_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_DIRTY, _PAGE_RW, _PAGE_SPECIAL, PAGE_SIZE
from kvmpoison.mm.fault import find_vma
from kvmpoison.mm.huge_memory import change_huge_pmd_range
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.mmap import (
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    calc_vm_prot_bits,
    page_align,
    populate_vma_page_range,
    split_vma,
)


def change_protection(vma: Vma, start: int, end: int) -> int:
    """``mm/mprotect.c:change_pte_range`` (v5.12; 6.18's write upgrade): rewrite the
    present PTEs of [start, end) to ``vma.vm_page_prot``; returns pages changed.

    Non-present entries (swap, hwpoison, markers) are left as they are.
    """
    mm = vma.vm_mm
    core = mm.core
    newprot = vma.vm_page_prot
    flags = int(vma.vm_flags)  # plain ints: enum Flag operators cost microseconds each
    private_write = flags & _VM_WRITE_SHARED == _VM_WRITE
    shared_write = flags & _VM_WRITE_SHARED == _VM_WRITE_SHARED
    changed = 0
    mem = core.pages
    version = core.kcfg.version.tuple
    if mm.pgd.nr_pmd_leaves:  # change_pmd_range: whole huge PMDs in place, partial ones split
        changed += change_huge_pmd_range(vma, start, end, newprot)
    for chunk in mm.pgd.chunks(start, end):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        present = pte_present_array(ptes)
        if not present.any():
            continue
        old = ptes[present]
        new = pte_modify_array(old, newprot)
        if private_write and version >= (6, 1):
            # 6.x MM_CP_TRY_CHANGE_WRITABLE: an exclusive anonymous page (PageAnonExclusive,
            # approximated as mapped once) is made writable at once; v5.12 waits for the
            # fault. The 6.1 tree also requires pte_dirty; 6.18 does not.
            normal = (old & np.uint64(_PAGE_SPECIAL)) == 0
            pfns = pte_pfn_array(old)
            exclusive = normal & ((mem.mapping[pfns] & 1) != 0) & (mem._mapcount[pfns] == 0)
            if version < (6, 18):
                exclusive &= (old & np.uint64(_PAGE_DIRTY)) != 0
            new = np.where(exclusive, new | np.uint64(_PAGE_RW), new)
        elif not shared_write:
            new &= np.uint64(~_PAGE_RW & 0xFFFF_FFFF_FFFF_FFFF)
        store[chunk.rows[present], chunk.cols[present]] = new
        changed += int(present.sum())
    core.flush_tlb_range(mm, start, end)
    return changed


_VM_WRITE = int(VM.WRITE)
_VM_WRITE_SHARED = int(VM.WRITE | VM.SHARED)
_VM_RWX = int(VM.READ | VM.WRITE | VM.EXEC)
_VM_WRITE_SHARED_LOCKED = int(VM.WRITE | VM.SHARED | VM.LOCKED)
_VM_LOCKED = int(VM.LOCKED)

PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000


def do_mprotect(mm: MmStruct, start: int, length: int, prot: int) -> int:
    """``do_mprotect_pkey`` (v5.12, 6.18): VMA by VMA, stopping at the first error.

    VMAs before a hole or a refused VMA keep their new protection, as in
    the kernel's loop. PROT_SEM is accepted (``arch_validate_prot``) and has
    no effect; a private VM_LOCKED VMA turned writable is populated to
    break COW (``mprotect_fixup``).
    """
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~(PROT_GROWSDOWN | PROT_GROWSUP)
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        return -errno.EINVAL
    if start & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if not length:
        return 0
    length = page_align(length)
    end = start + length
    if end <= start:
        return -errno.ENOMEM
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        return -errno.EINVAL
    vma = find_vma(mm, start)
    if vma is None or vma.vm_start > start:
        return -errno.ENOMEM
    if grows and not vma.vm_flags & VM.GROWSDOWN:
        return -errno.EINVAL  # PROT_GROWSUP has no VMA on x86 either
    want = int(calc_vm_prot_bits(prot))
    nstart = start
    while True:
        newflags = (int(vma.vm_flags) & ~_VM_RWX) | want
        may = (newflags >> 4) & _VM_RWX  # VM_MAY* >> 4
        if want & ~may:
            return -errno.EACCES
        tmp = min(vma.vm_end, end)
        mprotect_fixup(mm, vma, nstart, tmp, VM(newflags))
        nstart = tmp
        if nstart >= end:
            return 0
        vma = find_vma(mm, nstart)
        if vma is None or vma.vm_start != nstart:
            return -errno.ENOMEM


def mprotect_fixup(mm: MmStruct, vma: Vma, start: int, end: int, newflags: VM) -> None:
    """``mm/mprotect.c:mprotect_fixup`` (v5.12): split the VMA to [start, end), set the
    flags, rewrite the PTEs; a private VM_LOCKED VMA turned writable is populated
    to break COW at once. Simplified: no VMA merging, no commit accounting.
    """
    oldflags = vma.vm_flags
    if newflags == oldflags:
        return
    if vma.vm_start < start:
        vma = split_vma(mm, vma, start)
    if vma.vm_end > end:
        split_vma(mm, vma, end)
    vma.vm_flags = newflags
    change_protection(vma, vma.vm_start, vma.vm_end)
    if int(oldflags) & _VM_WRITE_SHARED_LOCKED == _VM_LOCKED and int(newflags) & _VM_WRITE:
        populate_vma_page_range(vma, vma.vm_start, vma.vm_end)
