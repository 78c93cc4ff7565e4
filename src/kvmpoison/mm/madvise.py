"""madvise(2).

Follows ``mm/madvise.c`` (v5.12, plus v6.x's MADV_POPULATE_READ/WRITE with
the v6.9 error mapping, MADV_GUARD_INSTALL/REMOVE from v6.13, and
MADV_HWPOISON/SOFT_OFFLINE only where CONFIG_MEMORY_FAILURE is set).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_64 import __swp_entry_array, __swp_offset_array, __swp_type_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_SPECIAL, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.kconfig import KernelVersion
from kvmpoison.mm.file import O_ACCMODE, O_RDONLY
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.gup import FOLL, __get_user_pages, get_user_pages_fast
from kvmpoison.mm.khugepaged import madvise_collapse
from kvmpoison.mm.ksm import ksm_madvise
from kvmpoison.mm.memory import zap_page_range
from kvmpoison.mm.mm_types import VM, MmStruct, Vma, vma_is_anonymous
from kvmpoison.mm.mmap import page_align, range_is_mapped, vmas_in_range
from kvmpoison.mm.page import Page, put_page
from kvmpoison.mm.swapops import PteMarker, make_pte_marker_entry, swp_entry_to_pte
from kvmpoison.uapi.errno import EHWPOISON

MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25
MADV_HWPOISON = 100
MADV_SOFT_OFFLINE = 101
MADV_GUARD_INSTALL = 102
MADV_GUARD_REMOVE = 103



def madvise_behavior_valid(mm: MmStruct, behavior: int) -> bool:
    """``mm/madvise.c:madvise_behavior_valid`` (v5.12; 6.18 adds POPULATE_READ/WRITE and
    GUARD_INSTALL/REMOVE). MADV_HWPOISON/SOFT_OFFLINE only with CONFIG_MEMORY_FAILURE.
    MADV_COLLAPSE exists from 6.1 (v5.12: -EINVAL).
    """
    cfg = mm.core.kcfg
    valid = {MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED,
             MADV_FREE, MADV_REMOVE, MADV_DONTFORK, MADV_DOFORK, MADV_MERGEABLE,
             MADV_UNMERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP, MADV_DODUMP,
             MADV_WIPEONFORK, MADV_KEEPONFORK, MADV_COLD, MADV_PAGEOUT}
    if cfg.has_madv_populate:
        valid |= {MADV_POPULATE_READ, MADV_POPULATE_WRITE}
    if cfg.has_guard_pages:
        valid |= {MADV_GUARD_INSTALL, MADV_GUARD_REMOVE}
    if cfg.version.tuple >= (6, 1):
        valid.add(MADV_COLLAPSE)
    if cfg.memory_failure:
        valid |= {MADV_HWPOISON, MADV_SOFT_OFFLINE}
    return behavior in valid


def _vma_flag_change(mm: MmStruct, start: int, end: int, behavior: int) -> int:
    """The VMA-flag advices of ``madvise_behavior``/``madvise_update_vma`` (v5.12, 6.18)."""
    for vma in vmas_in_range(mm, start, end, split=True):
        match behavior:
            case 10:  # DONTFORK
                vma.vm_flags |= VM.DONTCOPY
            case 11:  # DOFORK: a VM_IO mapping must stay out of the child
                if vma.vm_flags & VM.IO:
                    return -errno.EINVAL
                vma.vm_flags &= ~VM.DONTCOPY
            case 14:
                vma.vm_flags = (vma.vm_flags | VM.HUGEPAGE) & ~VM.NOHUGEPAGE
            case 15:
                vma.vm_flags = (vma.vm_flags | VM.NOHUGEPAGE) & ~VM.HUGEPAGE
            case 16:
                vma.vm_flags |= VM.DONTDUMP
            case 17:  # DODUMP: not for VM_SPECIAL mappings
                if vma.vm_flags & _VM_SPECIAL and not vma.vm_flags & VM.HUGETLB:
                    return -errno.EINVAL
                vma.vm_flags &= ~VM.DONTDUMP
            case 18:  # WIPEONFORK: private anonymous only
                if vma.vm_flags & VM.SHARED or vma.vm_file is not None:
                    return -errno.EINVAL
                vma.vm_flags |= VM.WIPEONFORK
            case 19:
                vma.vm_flags &= ~VM.WIPEONFORK
            case 12 | 13:  # MERGEABLE / UNMERGEABLE
                err = ksm_madvise(vma, vma.vm_start, vma.vm_end, behavior == MADV_MERGEABLE)
                if err:
                    return err
    return 0


def madvise_populate(mm: MmStruct, start: int, end: int, write: bool) -> int:
    """``mm/madvise.c:madvise_populate`` (6.18, with 6.9's error mapping)."""
    flags = FOLL.TOUCH | FOLL.MADV_POPULATE | FOLL.HWPOISON | (FOLL.WRITE if write else FOLL(0))
    addr = start
    while addr < end:
        ret = __get_user_pages(mm, addr, (end - addr) >> PAGE_SHIFT, flags, None)
        if ret < 0:
            # -EINVAL (incompatible VMA), -EHWPOISON, -EFAULT (SIGBUS/SIGSEGV), -ENOMEM
            # (unmapped) pass through; anything else is reported as -ENOMEM.
            if ret in (-errno.EINVAL, -EHWPOISON, -errno.EFAULT, -errno.ENOMEM, -errno.EINTR):
                return ret
            return -errno.ENOMEM
        addr += ret << PAGE_SHIFT
    return 0


def madvise_free_single_vma(vma: Vma, start: int, end: int) -> int:
    """MADV_FREE: ``mm/madvise.c:madvise_free_single_vma``/``madvise_free_pte_range``.

    Anonymous VMAs only (-EINVAL otherwise). Present pages become lazily
    freeable but keep their data until reclaim, which the model never runs,
    so they stay mapped. Swap entries are freed and cleared (the next touch
    gets a zero page); other non-swap entries stay in v5.12
    (``if (non_swap_entry(entry)) continue``) while 6.x also clears hwpoison
    entries and poisoned markers (6.1: ``is_hwpoison_entry ||
    is_swapin_error_entry``; 6.18: ``is_poisoned_swp_entry``).
    """
    if not vma_is_anonymous(vma):
        return -errno.EINVAL
    mm = vma.vm_mm
    core = mm.core
    types = core.swap_types
    modern = core.kcfg.version.tuple >= (6, 1)  # the 6.1 tree clears poisoned entries
    store = core.ptes.rows
    for chunk in mm.pgd.chunks(start, end):
        ptes = store[chunk.rows, chunk.cols]
        swap = ~pte_none_array(ptes) & ~pte_present_array(ptes)
        if not swap.any():
            continue
        kind = __swp_type_array(ptes).astype(np.int64)
        off = __swp_offset_array(ptes).astype(np.int64)
        real = swap & (kind < types.max_swapfiles)
        drop = real.copy()
        if modern and types.hwpoison is not None:
            drop |= swap & (kind == types.hwpoison)
        if modern and types.pte_marker is not None:
            drop |= swap & (kind == types.pte_marker) & ((off & int(PteMarker.POISONED)) != 0)
        for slot in off[real]:
            core.swap_space.pop(int(slot), None)
        store[chunk.rows[drop], chunk.cols[drop]] = 0
    core.flush_tlb_range(mm, start, end)
    return 0


_VM_SPECIAL = VM.IO | VM.DONTEXPAND | VM.PFNMAP | VM.MIXEDMAP


def is_valid_guard_vma(vma: Vma, allow_locked: bool) -> bool:
    """6.18: no VM_SPECIAL or hugetlb VMA; VM_LOCKED only for removal (file VMAs allowed)."""
    disallowed = _VM_SPECIAL | VM.HUGETLB | (VM(0) if allow_locked else VM.LOCKED)
    return not vma.vm_flags & disallowed


def madvise_guard_install(vma: Vma, start: int, end: int) -> int:
    """``mm/madvise.c:madvise_guard_install`` (6.18): zap, then a GUARD marker in every PTE."""
    if not is_valid_guard_vma(vma, allow_locked=False):
        return -errno.EINVAL
    zap_page_range(vma, start, end)
    mm = vma.vm_mm
    core = mm.core
    guard = swp_entry_to_pte(make_pte_marker_entry(PteMarker.GUARD, core.swap_types))
    for chunk in mm.pgd.chunks(start, end, alloc=True):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        none = pte_none_array(ptes)
        store[chunk.rows[none], chunk.cols[none]] = np.uint64(guard)
    return 0


def madvise_guard_remove(vma: Vma, start: int, end: int) -> int:
    """``mm/madvise.c:madvise_guard_remove`` (6.18): clear GUARD markers, nothing else."""
    if not is_valid_guard_vma(vma, allow_locked=True):
        return -errno.EINVAL
    mm = vma.vm_mm
    core = mm.core
    guard = np.uint64(swp_entry_to_pte(make_pte_marker_entry(PteMarker.GUARD, core.swap_types)))
    for chunk in mm.pgd.chunks(start, end):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        hit = ptes == guard
        store[chunk.rows[hit], chunk.cols[hit]] = 0
    return 0


def madvise_pageout(vma: Vma, start: int, end: int) -> int:
    """Reclaim exclusive private anon pages to the swap device (MADV_PAGEOUT).

    ``mm/madvise.c:madvise_pageout`` (v5.12, 6.18): -EINVAL for a VMA that
    ``can_madv_lru_vma`` refuses. Simplified: file and shmem pages are not
    reclaimed, and a page with extra references is skipped (the kernel
    would leave it in the swap cache behind a swap entry).
    """
    if vma.vm_flags & (VM.LOCKED | VM.PFNMAP | VM.HUGETLB):
        return -errno.EINVAL
    if vma.vm_file is not None:
        return 0
    mm = vma.vm_mm
    core = mm.core
    mem = core.pages
    for chunk in mm.pgd.chunks(start, end):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        cand = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        pfns = pte_pfn_array(ptes)
        ok = cand.copy()
        ok[cand] = ((mem.mapping[pfns[cand]] & 1) != 0) & (mem._mapcount[pfns[cand]] == 0) \
            & (mem._refcount[pfns[cand]] == 1)
        idx = np.flatnonzero(ok)
        if not len(idx):
            continue
        offsets = np.arange(core.next_swap_offset, core.next_swap_offset + len(idx),
                            dtype=np.int64)
        core.next_swap_offset += len(idx)
        for pfn, off in zip(pfns[idx], offsets, strict=True):
            core.swap_space[int(off)] = core.hw.read(int(pfn) << PAGE_SHIFT, PAGE_SIZE, 0).data
        store[chunk.rows[idx], chunk.cols[idx]] = __swp_entry_array(0, offsets.astype(np.uint64))
        mem._mapcount[pfns[idx]] -= 1
        mm.rss_anon -= len(idx)
        mem._refcount[pfns[idx]] = 0
        core.buddy.free_pages_bulk(pfns[idx])
        core.flush_tlb_range(mm, start, end)
    return 0


def madvise_remove(vma: Vma, start: int, end: int) -> int:
    """``mm/madvise.c:madvise_remove`` (v5.12, 6.18): punch a hole in a shared writable file.

    The range's file offsets go to ``vfs_fallocate(PUNCH_HOLE | KEEP_SIZE)``;
    a file opened without write access is -EBADF there.
    """
    if vma.vm_flags & VM.LOCKED:
        return -errno.EINVAL
    file = vma.vm_file
    if file is None or file.f_mapping is None:
        return -errno.EINVAL
    if (vma.vm_flags & (VM.SHARED | VM.WRITE)) != (VM.SHARED | VM.WRITE):
        return -errno.EACCES
    if file.f_flags & O_ACCMODE == O_RDONLY:
        return -errno.EBADF
    offset = (start - vma.vm_start) + (vma.vm_pgoff << PAGE_SHIFT)
    return file.f_op.fallocate(file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                               end - start)


def madvise_inject_error(mm: MmStruct, start: int, end: int, behavior: int) -> int:
    """MADV_HWPOISON / MADV_SOFT_OFFLINE: needs CAP_SYS_ADMIN (the model runs as root).

    ``mm/madvise.c:madvise_inject_error``. v5.12 drops GUP's reference and
    calls ``memory_failure(pfn, 0)``; 6.18 keeps it and passes
    MF_ACTION_REQUIRED | MF_COUNT_INCREASED | MF_SW_SIMULATED, so the caller
    (``current``, the mm's owner) is killed early like a real consumer
    (BUS_MCEERR_AR for a dirty page), and -EOPNOTSUPP (filtered) counts as 0.
    """
    memory_failure, soft_offline = mm.core.memory_failure, mm.core.soft_offline_page
    if memory_failure is None or soft_offline is None:
        return -errno.EINVAL
    for addr in range(start, end, PAGE_SIZE):
        pages: list[Page] = []
        ret = get_user_pages_fast(mm, addr, 1, FOLL(0), pages)
        if ret != 1:
            return ret
        page = pages[0]
        if behavior == MADV_SOFT_OFFLINE:
            err = soft_offline(page.pfn, 0x1)  # MF_COUNT_INCREASED: it drops GUP's ref
            if err:
                return err
            continue
        if mm.core.kcfg.version >= KernelVersion.V6_18:
            # MF_ACTION_REQUIRED | MF_COUNT_INCREASED | MF_SW_SIMULATED: GUP's ref is kept
            flags = 0x2 | 0x1 | 0x20
        elif mm.core.kcfg.version >= KernelVersion.V6_1:
            flags = 0x1 | 0x20  # v6.1: MF_COUNT_INCREASED | MF_SW_SIMULATED, no AR signal
        else:
            put_page(page)
            flags = 0
        err = memory_failure(page.pfn, flags, mm.owner_pid)
        if err == -errno.EOPNOTSUPP and flags:
            err = 0
        if err:
            return err
    return 0


def do_madvise(mm: MmStruct, start: int, length: int, behavior: int) -> int:
    """``mm/madvise.c:do_madvise`` (v5.12, 6.18): -EINVAL for a bad advice or start,
    VMA by VMA over the range, -ENOMEM at the end if part of it was unmapped.
    Simplified: VMAs are split for flag changes even when nothing changes
    (invisible but in the VMA count).
    """
    if start & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if not madvise_behavior_valid(mm, behavior):
        return -errno.EINVAL
    end = start + page_align(length)
    if end < start:
        return -errno.EINVAL
    if end == start:
        return 0
    if behavior in (MADV_HWPOISON, MADV_SOFT_OFFLINE):
        return madvise_inject_error(mm, start, end, behavior)
    if behavior in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        return madvise_populate(mm, start, end, behavior == MADV_POPULATE_WRITE)
    mapped = range_is_mapped(mm, start, end)
    ret = 0
    if behavior in (MADV_DONTFORK, MADV_DOFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP,
                    MADV_DODUMP, MADV_WIPEONFORK, MADV_KEEPONFORK, MADV_MERGEABLE,
                    MADV_UNMERGEABLE):
        ret = _vma_flag_change(mm, start, end, behavior)
    else:
        for vma in vmas_in_range(mm, start, end, split=False):
            lo, hi = max(start, vma.vm_start), min(end, vma.vm_end)
            if behavior in (MADV_DONTNEED, MADV_FREE):
                if vma.vm_flags & (VM.LOCKED | VM.PFNMAP | VM.HUGETLB):  # can_madv_lru_vma
                    return -errno.EINVAL
                if behavior == MADV_FREE:
                    ret = madvise_free_single_vma(vma, lo, hi)
                else:
                    zap_page_range(vma, lo, hi)
            elif behavior == MADV_GUARD_INSTALL:
                ret = madvise_guard_install(vma, lo, hi)
            elif behavior == MADV_GUARD_REMOVE:
                ret = madvise_guard_remove(vma, lo, hi)
            elif behavior == MADV_PAGEOUT:
                ret = madvise_pageout(vma, lo, hi)
            elif behavior == MADV_REMOVE:
                ret = madvise_remove(vma, lo, hi)
            elif behavior == MADV_COLLAPSE:
                ret = madvise_collapse(vma, lo, hi)
            if ret:
                return ret
    if ret:
        return ret
    return 0 if mapped else -errno.ENOMEM
