"""userfaultfd: registration and ``UFFDIO_POISON``.

Follows ``fs/userfaultfd.c`` and ``mm/userfaultfd.c`` (v6.6+ for POISON:
``mfill_atomic_pte_poison`` installs ``PTE_MARKER_POISONED`` where the PTE
is none, -EEXIST otherwise). Missing faults on a registered range are not
served by a monitor in the model: they end as VM_FAULT_SIGBUS, which is what
``UFFD_FEATURE_SIGBUS`` gives.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_none_array
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.mmap import range_is_mapped, vmas_in_range
from kvmpoison.mm.swapops import PteMarker, make_pte_marker_entry, swp_entry_to_pte

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2


@dataclass(eq=False)
class UffdCtx:
    """``struct userfaultfd_ctx``."""

    mm: MmStruct
    features: int = 0


def vma_can_userfault(vma: Vma, mode: int) -> bool:
    """fs/userfaultfd.c/``include/linux/userfaultfd_k.h`` ``vma_can_userfault``.

    v5.12: anonymous memory and shmem (hugetlb is not modelled); WP on
    anonymous memory only; no MINOR mode (v5.13). v6.18: MINOR on shmem
    only, WP also on shmem (PTE markers).
    """
    shmem = vma.vm_file is not None and vma.vm_file.f_inode.kind == "shmem"
    anon = vma.vm_file is None and vma.vm_ops is None
    modern = vma.vm_mm.core.kcfg.version.tuple >= (5, 19)  # shmem WP: PTE_MARKER_UFFD_WP
    if mode & UFFDIO_REGISTER_MODE_MINOR and not (modern and shmem):
        return False
    if mode & UFFDIO_REGISTER_MODE_WP and not (anon or (modern and shmem)):
        return False
    return anon or shmem


def userfaultfd_register(ctx: UffdCtx, start: int, length: int, mode: int) -> int:
    """fs/userfaultfd.c ``userfaultfd_register`` (v5.12; MINOR mode v5.13+).

    -EINVAL for a bad range or mode, a hole, or a VMA ``vma_can_userfault``
    refuses; -EPERM without VM_MAYWRITE; -EBUSY when another context holds
    the VMA. Features (UFFD_FEATURE_*) are not modelled.
    """
    mm = ctx.mm
    if start & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or not length:
        return -errno.EINVAL
    if not mode or mode & ~(UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP
                            | UFFDIO_REGISTER_MODE_MINOR):
        return -errno.EINVAL
    if not range_is_mapped(mm, start, start + length):
        return -errno.EINVAL
    for vma in vmas_in_range(mm, start, start + length, split=False):
        if not vma_can_userfault(vma, mode):
            return -errno.EINVAL
        if not vma.vm_flags & VM.MAYWRITE:
            return -errno.EPERM
        if vma.uffd_ctx is not None and vma.uffd_ctx is not ctx:
            return -errno.EBUSY
    for vma in vmas_in_range(mm, start, start + length, split=True):
        if mode & UFFDIO_REGISTER_MODE_MISSING:
            vma.vm_flags |= VM.UFFD_MISSING
        if mode & UFFDIO_REGISTER_MODE_WP:
            vma.vm_flags |= VM.UFFD_WP
        vma.uffd_ctx = ctx
    return 0


def mfill_atomic_poison(ctx: UffdCtx, start: int, length: int) -> int:
    """mm/userfaultfd.c ``mfill_atomic_poison`` (v6.6+; UFFDIO_POISON): returns bytes
    poisoned or -errno.
    """
    mm = ctx.mm
    core = mm.core
    if start & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or not length:
        return -errno.EINVAL
    if core.swap_types.pte_marker is None or not core.kcfg.has_uffdio_poison:
        return -errno.EINVAL  # no such ioctl before v6.6 (userfaultfd_ioctl's default)
    vmas = vmas_in_range(mm, start, start + length, split=False)
    # uffd_mfill_lock/validate_dst_vma: one registered VMA must hold the whole range
    if len(vmas) != 1 or not range_is_mapped(mm, start, start + length) \
            or vmas[0].uffd_ctx is not ctx:
        return -errno.ENOENT
    marker = np.uint64(swp_entry_to_pte(make_pte_marker_entry(PteMarker.POISONED,
                                                              core.swap_types)))
    done = 0
    end = start + length
    leaves = mm.pgd.pmd_leaves(start, end)
    if leaves:  # mfill_atomic: a huge PMD ends the fill with -EEXIST
        end = max(start, leaves[0][0])
    for chunk in mm.pgd.chunks(start, end, alloc=True):
        store = core.ptes.rows
        ptes = store[chunk.rows, chunk.cols]
        none = pte_none_array(ptes)
        stop = len(ptes) if none.all() else int(np.argmin(none))
        store[chunk.rows[:stop], chunk.cols[:stop]] = marker
        done += stop
        if stop < len(ptes):
            return done << PAGE_SHIFT if done else -errno.EEXIST
    if leaves:
        return done << PAGE_SHIFT if done else -errno.EEXIST
    return done << PAGE_SHIFT
