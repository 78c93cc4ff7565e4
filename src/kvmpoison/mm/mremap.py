"""mremap(2): grow, shrink or move a mapping, moving its page tables.

Follows ``mm/mremap.c`` (v5.12; 6.18 differs in what it allows with
MREMAP_DONTUNMAP and in moving several VMAs at once, see ``do_mremap``):
``move_ptes`` carries every PTE over as is,
except that with CONFIG_MEM_SOFT_DIRTY a swap PTE gets ``_PAGE_SWP_SOFT_DIRTY``
and a present one ``_PAGE_SOFT_DIRTY`` (``move_soft_dirty_pte``). Anonymous
pages keep their ``index``: the new VMA's ``vm_pgoff`` follows the old one.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_SOFT_DIRTY,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from kvmpoison.mm.fault import find_vma
from kvmpoison.mm.huge_memory import move_huge_pmd_range
from kvmpoison.mm.ksm import break_ksm
from kvmpoison.mm.mm_types import VM, MmStruct, Vma, VmFault
from kvmpoison.mm.mmap import (
    __mm_populate,
    _insert_vma,
    _remove_vma,
    do_munmap,
    free_pgtables,
    get_unmapped_area,
    page_align,
    split_vma,
)
from kvmpoison.mm.pagetable import TASK_SIZE

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4


def move_page_tables(old: Vma, old_addr: int, new: Vma, new_addr: int, length: int) -> None:
    """``mm/mremap.c:move_page_tables``/``move_ptes`` (v5.12): every PTE moves as is
    (swap, hwpoison and marker entries included), soft-dirty set with
    CONFIG_MEM_SOFT_DIRTY. A huge PMD moves whole (``move_huge_pmd``) when both
    ends are 2 MiB-aligned, else it is split first. Simplified: PTE by PTE, no
    PMD-level moves of PTE tables.
    """
    mm = old.vm_mm
    core = mm.core
    soft_dirty = core.kcfg.mem_soft_dirty
    delta = new_addr - old_addr
    if mm.pgd.nr_pmd_leaves:  # huge PMDs move whole when aligned, else split first
        move_huge_pmd_range(old, old_addr, new_addr, length)
    for chunk in mm.pgd.chunks(old_addr, old_addr + length):
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        live = ~pte_none_array(ptes)
        if not live.any():
            continue
        moved = ptes[live]
        if soft_dirty:
            present = pte_present_array(moved)
            moved = np.where(present, moved | np.uint64(_PAGE_SOFT_DIRTY),
                             moved | np.uint64(_PAGE_SWP_SOFT_DIRTY))
        core.ptes.rows[chunk.rows[live], chunk.cols[live]] = 0
        for addr, pte in zip(chunk.addr[live], moved, strict=True):
            mm.pgd.set(int(addr) + delta, int(pte))
    core.flush_tlb_range(mm, old_addr, old_addr + length)


def move_vma(mm: MmStruct, vma: Vma, old_addr: int, old_len: int, new_len: int,
             new_addr: int, flags: int) -> int:
    """``mm/mremap.c:move_vma`` (v5.12): copy the VMA, move its page tables, unmap the old.

    KSM pages of the old range are broken first (``ksm_madvise(MADV_UNMERGEABLE)``
    with the VMA's flags left as they were). With MREMAP_DONTUNMAP the old VMA
    stays, empty, and loses VM_LOCKED/VM_LOCKONFAULT. A VM_LOCKED VMA's grown
    part is populated (``mm_populate`` at the end of mremap).
    """
    if vma.vm_flags & VM.MERGEABLE:
        for addr in range(old_addr, old_addr + old_len, PAGE_SIZE):
            if break_ksm(vma, addr) & VmFault.OOM:
                return -errno.ENOMEM
    if old_len and vma.vm_start < old_addr:
        vma = split_vma(mm, vma, old_addr)
    if old_len and vma.vm_end > old_addr + old_len:
        split_vma(mm, vma, old_addr + old_len)
    new = Vma(vm_mm=mm, vm_start=new_addr, vm_end=new_addr + new_len, vm_flags=vma.vm_flags,
              vm_pgoff=vma.vm_pgoff + ((old_addr - vma.vm_start) >> PAGE_SHIFT),
              vm_file=vma.vm_file, vm_ops=vma.vm_ops)
    new.anon_vma = vma.anon_vma
    for av in vma.anon_vma_chain:
        av.vmas.append(new)
        new.anon_vma_chain.append(av)
    _insert_vma(mm, new)
    if old_len:
        move_page_tables(vma, old_addr, new, new_addr, old_len)
    if flags & MREMAP_DONTUNMAP:
        # The old VMA stays, unlocked; locked_vm is untouched (it now counts the new one).
        vma.vm_flags &= ~(VM.LOCKED | VM.LOCKONFAULT)  # VM_LOCKED_CLEAR_MASK
        return new_addr
    if old_len:  # do_munmap(old_addr, 0) fails: a duplicated shared mapping keeps the old
        _remove_vma(mm, vma)
        free_pgtables(mm, old_addr, old_addr + old_len)
    if new.vm_flags & VM.LOCKED:
        mm.locked_vm += new.npages
    if new.vm_flags & VM.LOCKED and new_len > old_len:
        __mm_populate(mm, new_addr + old_len, new_len - old_len, ignore_errors=True)
    return new_addr


def vma_to_resize(mm: MmStruct, addr: int, old_len: int, new_len: int,
                  flags: int) -> Vma | int:
    """``mm/mremap.c:vma_to_resize`` (v5.12; DONTUNMAP on any VMA from 5.13, as 6.18)."""
    vma = find_vma(mm, addr)
    if vma is None or vma.vm_start > addr:
        return -errno.EFAULT
    if not old_len and not vma.vm_flags & (VM.SHARED | VM.MAYSHARE):
        return -errno.EINVAL  # "attempted to duplicate a private mapping"
    if flags & MREMAP_DONTUNMAP:
        if mm.core.kcfg.version.tuple < (5, 13):
            if vma.vm_ops is not None or vma.vm_flags & VM.SHARED:
                return -errno.EINVAL  # v5.12: private anonymous VMAs only
        elif vma.vm_flags & (VM.DONTEXPAND | VM.PFNMAP):
            return -errno.EINVAL
    if vma.vm_flags & VM.HUGETLB:
        return -errno.EINVAL
    if old_len > vma.vm_end - addr:
        return -errno.EFAULT
    if new_len == old_len:
        return vma
    if vma.vm_flags & (VM.DONTEXPAND | VM.PFNMAP):
        return -errno.EFAULT
    return vma


def mremap_to(mm: MmStruct, addr: int, old_len: int, new_addr: int, new_len: int,
              flags: int) -> int:
    """``mm/mremap.c:mremap_to`` (v5.12): MREMAP_FIXED and/or MREMAP_DONTUNMAP."""
    if new_addr & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if new_len > TASK_SIZE or new_addr > TASK_SIZE - new_len:
        return -errno.EINVAL
    if addr + old_len > new_addr and new_addr + new_len > addr:
        return -errno.EINVAL  # the old and new ranges overlap
    if flags & MREMAP_FIXED:
        ret = do_munmap(mm, new_addr, new_len)
        if ret:
            return ret
    if old_len >= new_len:
        ret = do_munmap(mm, addr + new_len, old_len - new_len) if old_len > new_len else 0
        if ret and old_len != new_len:
            return ret
        old_len = new_len
    vma = vma_to_resize(mm, addr, old_len, new_len, flags)
    if isinstance(vma, int):
        return vma
    if not flags & MREMAP_FIXED:
        new_addr = get_unmapped_area(mm, new_len, new_addr)
        if new_addr < 0:
            return new_addr
    return move_vma(mm, vma, addr, old_len, new_len, new_addr, flags)


def do_mremap(mm: MmStruct, addr: int, old_len: int, new_len: int, flags: int,
              new_addr: int = 0) -> int:
    """``SYSCALL_DEFINE5(mremap)`` (v5.12). Simplified: 6.17+'s moves of several VMAs
    at once are not modelled (a range must lie in one VMA)."""
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        return -errno.EINVAL
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        return -errno.EINVAL
    if flags & MREMAP_DONTUNMAP and (not flags & MREMAP_MAYMOVE or old_len != new_len):
        return -errno.EINVAL
    if addr & (PAGE_SIZE - 1):
        return -errno.EINVAL
    old_len, new_len = page_align(old_len), page_align(new_len)
    if not new_len:
        return -errno.EINVAL
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        return mremap_to(mm, addr, old_len, new_addr, new_len, flags)
    if old_len >= new_len:  # always allowed: just unmap the tail
        ret = do_munmap(mm, addr + new_len, old_len - new_len) if old_len > new_len else 0
        return ret if ret < 0 and old_len != new_len else addr
    vma = vma_to_resize(mm, addr, old_len, new_len, flags)
    if isinstance(vma, int):
        return vma
    if old_len == vma.vm_end - addr:
        nxt = find_vma(mm, vma.vm_end)
        end = addr + new_len
        if (nxt is None or nxt.vm_start >= end) and end <= TASK_SIZE:
            vma.vm_end = end  # vma_expandable: grow in place
            if vma.vm_flags & VM.LOCKED:
                mm.locked_vm += (new_len - old_len) >> PAGE_SHIFT
                __mm_populate(mm, addr + old_len, new_len - old_len, ignore_errors=True)
            return addr
    if not flags & MREMAP_MAYMOVE:
        return -errno.ENOMEM
    target = get_unmapped_area(mm, new_len)
    if target < 0:
        return target
    return move_vma(mm, vma, addr, old_len, new_len, target, flags)
