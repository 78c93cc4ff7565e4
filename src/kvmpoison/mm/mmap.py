"""mmap, munmap, VMA splitting, populate and exit_mmap.

Follows ``mm/mmap.c``, ``mm/util.c`` and ``mm/gup.c:__mm_populate`` (v5.12).
Addresses are handed out top-down below ``mmap_base`` as the x86-64 legacy
layout does. VMAs are not merged back after a split (the kernel's
``vma_merge`` only saves memory; behaviour is the same).
"""

from __future__ import annotations

import bisect
import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.fault import find_vma
from kvmpoison.mm.file import O_ACCMODE, O_RDONLY, O_WRONLY, File
from kvmpoison.mm.gup import FOLL, __get_user_pages
from kvmpoison.mm.huge_memory import vma_adjust_trans_huge
from kvmpoison.mm.memory import copy_page_range, unmap_vmas
from kvmpoison.mm.mm_types import VM, MmStruct, Vma, vma_is_accessible
from kvmpoison.mm.pagetable import TASK_SIZE
from kvmpoison.mm.rmap import anon_vma_fork, unlink_anon_vmas
from kvmpoison.mm.shmem import shmem_zero_setup

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x0100
MAP_DENYWRITE = 0x0800
MAP_EXECUTABLE = 0x1000
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000
MAP_STACK = 0x20000
MAP_HUGETLB = 0x40000
MAP_SYNC = 0x80000
MAP_FIXED_NOREPLACE = 0x100000
MAP_UNINITIALIZED = 0x4000000
LEGACY_MAP_MASK = (MAP_SHARED | MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS | MAP_DENYWRITE
                   | MAP_EXECUTABLE | MAP_UNINITIALIZED | MAP_GROWSDOWN | MAP_LOCKED
                   | MAP_NORESERVE | MAP_POPULATE | MAP_NONBLOCK | MAP_STACK | MAP_HUGETLB)

MMAP_BASE = 0x7F00_0000_0000
MMAP_MIN_ADDR = 0x10000  # vm.mmap_min_addr's default on x86


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def calc_vm_prot_bits(prot: int) -> VM:
    """``include/linux/mman.h:calc_vm_prot_bits`` (no pkeys): PROT_* to VM_*."""
    out = VM(0)
    if prot & PROT_READ:
        out |= VM.READ
    if prot & PROT_WRITE:
        out |= VM.WRITE
    if prot & PROT_EXEC:
        out |= VM.EXEC
    return out


def _insert_vma(mm: MmStruct, vma: Vma) -> None:
    starts = [v.vm_start for v in mm.vmas]
    mm.vmas.insert(bisect.bisect_left(starts, vma.vm_start), vma)
    if vma.vm_file is not None and vma.vm_file.f_mapping is not None:
        vma.vm_file.f_mapping.i_mmap.append(vma)


def _remove_vma(mm: MmStruct, vma: Vma) -> None:
    mm.vmas.remove(vma)
    if vma.vm_file is not None and vma.vm_file.f_mapping is not None:
        vma.vm_file.f_mapping.i_mmap.remove(vma)
    unlink_anon_vmas(vma)
    if vma.vm_flags & VM.LOCKED:
        mm.locked_vm -= vma.npages


def get_unmapped_area(mm: MmStruct, length: int, hint: int = 0) -> int:
    """Top-down: the highest gap below ``MMAP_BASE`` that fits (plus a guard gap).

    ``arch/x86/kernel/sys_x86_64.c:arch_get_unmapped_area_topdown`` (v5.12,
    6.18): a hint address (rounded up to ``mmap_min_addr``) is taken when
    [hint, hint + length) is free. Simplified: the search leaves a one-page
    gap between mappings, where the kernel packs them.
    """
    if length > TASK_SIZE:
        return -errno.ENOMEM
    if hint:
        hint = max(hint, MMAP_MIN_ADDR) & ~(PAGE_SIZE - 1)  # round_hint_to_min
        if hint + length <= TASK_SIZE:
            nxt = find_vma(mm, hint)
            if nxt is None or hint + length <= nxt.vm_start:
                return hint
    top = MMAP_BASE
    for vma in sorted(mm.vmas, key=lambda v: v.vm_start, reverse=True):
        if vma.vm_start >= top:
            continue
        if vma.vm_end + PAGE_SIZE <= top - length:
            return top - length
        top = vma.vm_start
    if top - length < PAGE_SIZE * 16:
        return -errno.ENOMEM
    return top - length


def split_vma(mm: MmStruct, vma: Vma, addr: int) -> Vma:
    """``mm/mmap.c:__split_vma`` (v5.12): split ``vma`` at ``addr``; returns the upper part.
    A huge PMD across ``addr`` is split first (``vma_adjust_trans_huge``)."""
    assert vma.vm_start < addr < vma.vm_end and not addr & (PAGE_SIZE - 1)
    vma_adjust_trans_huge(vma, addr)  # no huge PMD may straddle the new boundary
    new = Vma(vm_mm=mm, vm_start=addr, vm_end=vma.vm_end, vm_flags=vma.vm_flags,
              vm_pgoff=vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT),
              vm_file=vma.vm_file, vm_ops=vma.vm_ops, uffd_ctx=vma.uffd_ctx)
    vma.vm_end = addr
    new.anon_vma = vma.anon_vma
    for av in vma.anon_vma_chain:  # anon_vma_clone
        av.vmas.append(new)
        new.anon_vma_chain.append(av)
    _insert_vma(mm, new)
    return new


def vmas_in_range(mm: MmStruct, start: int, end: int, split: bool) -> list[Vma]:
    """The VMAs overlapping [start, end), split at the edges when ``split``."""
    out = []
    for old in list(mm.vmas):
        if old.vm_end <= start or old.vm_start >= end:
            continue
        vma = split_vma(mm, old, start) if split and old.vm_start < start else old
        if split and vma.vm_end > end:
            split_vma(mm, vma, end)
        out.append(vma)
    return sorted(out, key=lambda v: v.vm_start)


def range_is_mapped(mm: MmStruct, start: int, end: int) -> bool:
    """Whether VMAs cover [start, end) without a hole."""
    addr = start
    for vma in sorted(mm.vmas, key=lambda v: v.vm_start):
        if vma.vm_end <= addr:
            continue
        if vma.vm_start > addr:
            return False
        addr = vma.vm_end
        if addr >= end:
            return True
    return addr >= end


def free_pgtables(mm: MmStruct, start: int, end: int) -> None:
    """Free leaf tables of [start, end) between the neighbouring VMAs (floor/ceiling)."""
    pmd = 1 << 21
    lo, hi = start & ~(pmd - 1), (end + pmd - 1) & ~(pmd - 1)
    for vma in mm.vmas:
        if vma.vm_end <= lo or vma.vm_start >= hi:
            continue
        if vma.vm_end <= start:
            lo = max(lo, (vma.vm_end + pmd - 1) & ~(pmd - 1))
        elif vma.vm_start >= end:
            hi = min(hi, vma.vm_start & ~(pmd - 1))
    if lo < hi:
        mm.pgd.free_empty_tables(lo, hi)


def do_munmap(mm: MmStruct, start: int, length: int) -> int:
    """``mm/mmap.c:__do_munmap`` (v5.12, 6.18): -EINVAL for a misaligned start, a range
    past TASK_SIZE or a zero length; splits the edge VMAs, zaps and frees the range.
    """
    if start & (PAGE_SIZE - 1) or start >= TASK_SIZE or length > TASK_SIZE - start:
        return -errno.EINVAL
    length = page_align(length)
    if not length:
        return -errno.EINVAL
    end = start + length
    for vma in vmas_in_range(mm, start, end, split=True):
        unmap_vmas(vma, vma.vm_start, vma.vm_end)
        _remove_vma(mm, vma)
    free_pgtables(mm, start, end)
    return 0


def do_mmap(mm: MmStruct, addr: int, length: int, prot: int, flags: int, file: File | None,
            pgoff: int) -> int:
    """Returns the mapped address or -errno.

    ``mm/mmap.c:do_mmap`` (v5.12; 6.1's is the same in every check here):
    unknown PROT_* bits are ignored; a hint address is honoured when free;
    a MAP_FIXED range beyond TASK_SIZE is -ENOMEM, a misaligned one -EINVAL;
    anonymous mappings take only MAP_SHARED or MAP_PRIVATE; MAP_SHARED_VALIDATE
    refuses flags outside LEGACY_MAP_MASK with -EOPNOTSUPP; a read-only file
    mapped shared loses VM_SHARED and VM_MAYWRITE. Not modelled: MAP_HUGETLB,
    MAP_SYNC (no DAX), RLIMIT_MEMLOCK, READ_IMPLIES_EXEC, max_map_count.
    """
    if not length:
        return -errno.EINVAL
    if flags & MAP_FIXED_NOREPLACE:
        flags |= MAP_FIXED
    length = page_align(length)
    if length > TASK_SIZE:
        return -errno.ENOMEM
    if pgoff + (length >> PAGE_SHIFT) >= 1 << 64:
        return -errno.EOVERFLOW
    if flags & MAP_FIXED:  # get_unmapped_area's checks of a fixed address
        if addr > TASK_SIZE - length:
            return -errno.ENOMEM
        if addr & (PAGE_SIZE - 1):
            return -errno.EINVAL
        nxt = find_vma(mm, addr)
        if flags & MAP_FIXED_NOREPLACE and nxt is not None and nxt.vm_start < addr + length:
            return -errno.EEXIST
    map_type = flags & MAP_TYPE
    vm_flags = calc_vm_prot_bits(prot) | VM.MAYREAD | VM.MAYWRITE | VM.MAYEXEC
    if flags & MAP_LOCKED:
        vm_flags |= VM.LOCKED
    if flags & MAP_GROWSDOWN:
        vm_flags |= VM.GROWSDOWN
    if file is not None:
        acc = file.f_flags & O_ACCMODE
        if map_type in (MAP_SHARED, MAP_SHARED_VALIDATE):
            if map_type == MAP_SHARED_VALIDATE and flags & ~LEGACY_MAP_MASK:
                return -errno.EOPNOTSUPP
            if prot & PROT_WRITE and acc == O_RDONLY:
                return -errno.EACCES
            vm_flags |= VM.SHARED | VM.MAYSHARE
            if acc == O_RDONLY:
                vm_flags &= ~(VM.MAYWRITE | VM.SHARED)
        elif map_type != MAP_PRIVATE:
            return -errno.EINVAL
        if acc == O_WRONLY:
            return -errno.EACCES  # no FMODE_READ
        if file.f_inode.noexec:  # path_noexec()
            if vm_flags & VM.EXEC:
                return -errno.EPERM
            vm_flags &= ~VM.MAYEXEC
        if vm_flags & VM.GROWSDOWN:
            return -errno.EINVAL
    elif map_type == MAP_SHARED:
        if vm_flags & VM.GROWSDOWN:
            return -errno.EINVAL
        vm_flags |= VM.SHARED | VM.MAYSHARE
    elif map_type != MAP_PRIVATE:
        return -errno.EINVAL
    shared = bool(vm_flags & VM.MAYSHARE)
    if flags & MAP_FIXED:
        do_munmap(mm, addr, length)
    else:
        addr = get_unmapped_area(mm, length, addr)
        if addr < 0:
            return addr
    vma = Vma(vm_mm=mm, vm_start=addr, vm_end=addr + length, vm_flags=vm_flags,
              vm_pgoff=pgoff if file is not None else addr >> PAGE_SHIFT, vm_file=file)
    if file is not None:
        ret = file.f_op.mmap(file, vma)
        if ret:
            return ret
    elif shared:
        ret = shmem_zero_setup(mm.core, vma)
        if ret:
            return ret
    _insert_vma(mm, vma)
    if vma.vm_flags & VM.LOCKED:
        mm.locked_vm += vma.npages
    # vm_mmap_pgoff populates on the flags asked for, not those ->mmap added (secretmem)
    if (flags & (MAP_POPULATE | MAP_NONBLOCK)) == MAP_POPULATE or vm_flags & VM.LOCKED:
        __mm_populate(mm, addr, length, ignore_errors=True)
    return addr


def populate_vma_page_range(vma: Vma, start: int, end: int) -> int:
    """``mm/gup.c:populate_vma_page_range`` (v5.12): fault the range in with GUP,
    writing only to break COW of private writable VMAs, FOLL_FORCE unless PROT_NONE.
    """
    gup_flags = FOLL.TOUCH | FOLL.POPULATE | FOLL.MLOCK
    if vma.vm_flags & VM.LOCKONFAULT:
        gup_flags &= ~FOLL.POPULATE
    if (vma.vm_flags & (VM.WRITE | VM.SHARED)) == VM.WRITE:
        gup_flags |= FOLL.WRITE
    if vma_is_accessible(vma):
        gup_flags |= FOLL.FORCE  # mlock must succeed for any non-PROT_NONE region
    return __get_user_pages(vma.vm_mm, start, (end - start) >> PAGE_SHIFT, gup_flags, None)


def __mm_populate(mm: MmStruct, start: int, length: int, ignore_errors: bool) -> int:
    """``mm/gup.c:__mm_populate`` (v5.12): populate each VMA of the range, skipping
    VM_IO/VM_PFNMAP; errors are ignored for mmap/mlock (``ignore_errors``).
    """
    end = start + length
    addr = start
    while addr < end:
        vma = find_vma(mm, addr)
        if vma is None or vma.vm_start >= end:
            break
        addr = max(addr, vma.vm_start)
        stop = min(end, vma.vm_end)
        if vma.vm_flags & (VM.IO | VM.PFNMAP):
            addr = stop
            continue
        ret = populate_vma_page_range(vma, addr, stop)
        if ret < 0:
            if ignore_errors:
                addr = stop
                continue
            return ret
        addr += ret << PAGE_SHIFT
    return 0


def dup_mmap(child: MmStruct, parent: MmStruct) -> int:
    """``kernel/fork.c:dup_mmap`` (v5.12): copy every VMA but VM_DONTCOPY ones.

    The child's VMAs lose VM_LOCKED/VM_LOCKONFAULT and the uffd flags;
    VM_WIPEONFORK VMAs start empty; the rest get ``copy_page_range``, whose
    error (the hardened design's -EPERM for guest-private pages) fails the fork:
    0 or -errno (the caller tears the child's mm down).
    """
    for vma in sorted(parent.vmas, key=lambda v: v.vm_start):
        if vma.vm_flags & VM.DONTCOPY:
            continue
        dropped = VM.LOCKED | VM.LOCKONFAULT | VM.UFFD_MISSING | VM.UFFD_WP
        new = Vma(vm_mm=child, vm_start=vma.vm_start, vm_end=vma.vm_end,
                  vm_flags=vma.vm_flags & ~dropped,
                  vm_pgoff=vma.vm_pgoff, vm_file=vma.vm_file, vm_ops=vma.vm_ops)
        if vma.vm_flags & VM.WIPEONFORK:
            _insert_vma(child, new)
            continue
        anon_vma_fork(new, vma)
        _insert_vma(child, new)
        ret = copy_page_range(new, vma)
        if ret:
            return ret
    return 0


def exit_mmap(mm: MmStruct) -> None:
    """``mm/mmap.c:exit_mmap`` (v5.12): release the notifiers, zap and remove every VMA,
    free the page tables.
    """
    for notifier in list(mm.mmu_notifiers):
        notifier.release()
    for vma in list(mm.vmas):
        unmap_vmas(vma, vma.vm_start, vma.vm_end)
        _remove_vma(mm, vma)
    mm.pgd.destroy()
    mm.core.mms.pop(mm.ident, None)
