"""mremap(2): grow, shrink or move a mapping, moving its page tables.

Follows ``mm/mremap.c`` (v5.12): ``move_ptes`` carries every PTE over as is,
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
from kvmpoison.mm.fault import find_vma, vma_lookup
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.mmap import (
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
    mm = old.vm_mm
    core = mm.core
    soft_dirty = core.kcfg.mem_soft_dirty
    delta = new_addr - old_addr
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
    if vma.vm_start < old_addr:
        vma = split_vma(mm, vma, old_addr)
    if vma.vm_end > old_addr + old_len:
        split_vma(mm, vma, old_addr + old_len)
    new = Vma(vm_mm=mm, vm_start=new_addr, vm_end=new_addr + new_len, vm_flags=vma.vm_flags,
              vm_pgoff=vma.vm_pgoff, vm_file=vma.vm_file, vm_ops=vma.vm_ops)
    new.anon_vma = vma.anon_vma
    for av in vma.anon_vma_chain:
        av.vmas.append(new)
        new.anon_vma_chain.append(av)
    _insert_vma(mm, new)
    move_page_tables(vma, old_addr, new, new_addr, min(old_len, new_len))
    if flags & MREMAP_DONTUNMAP:
        return new_addr
    _remove_vma(mm, vma)
    free_pgtables(mm, old_addr, old_addr + old_len)
    if vma.vm_flags & VM.LOCKED:
        mm.locked_vm += new.npages
    return new_addr


def do_mremap(mm: MmStruct, addr: int, old_len: int, new_len: int, flags: int,
              new_addr: int = 0) -> int:
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        return -errno.EINVAL
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        return -errno.EINVAL
    if addr & (PAGE_SIZE - 1):
        return -errno.EINVAL
    old_len, new_len = page_align(old_len), page_align(new_len)
    if not new_len or not old_len:
        return -errno.EINVAL
    vma = vma_lookup(mm, addr)
    if vma is None or addr + old_len > vma.vm_end:
        return -errno.EFAULT
    if flags & MREMAP_FIXED:
        if new_addr & (PAGE_SIZE - 1) or new_addr + new_len > TASK_SIZE:
            return -errno.EINVAL
        if new_addr < addr + old_len and addr < new_addr + new_len:
            return -errno.EINVAL
        do_munmap(mm, new_addr, new_len)
        return move_vma(mm, vma, addr, old_len, new_len, new_addr, flags)
    if new_len <= old_len:
        if new_len < old_len:
            do_munmap(mm, addr + new_len, old_len - new_len)
        return addr
    nxt = find_vma(mm, addr + old_len)
    if addr + old_len == vma.vm_end and (nxt is None or nxt.vm_start >= addr + new_len):
        vma.vm_end = addr + new_len  # grow in place
        if vma.vm_flags & VM.LOCKED:
            mm.locked_vm += (new_len - old_len) >> PAGE_SHIFT
        return addr
    if not flags & MREMAP_MAYMOVE:
        return -errno.ENOMEM
    target = get_unmapped_area(mm, new_len)
    if target < 0:
        return target
    return move_vma(mm, vma, addr, old_len, new_len, target, flags)
