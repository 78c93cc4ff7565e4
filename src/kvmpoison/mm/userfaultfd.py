"""userfaultfd: the file, UFFDIO_API, registration, UFFDIO_COPY/ZEROPAGE and UFFDIO_POISON.

Follows ``fs/userfaultfd.c`` and ``mm/userfaultfd.c`` (v5.12; 6.1/6.18 where
they differ; v6.6+ for POISON: ``mfill_atomic_pte_poison`` installs
``PTE_MARKER_POISONED`` where the PTE is none, -EEXIST otherwise). A missing
fault queues a UFFD_EVENT_PAGEFAULT message and sleeps
(:mod:`kvmpoison.mm.userfaultfd_k`); read(2) returns the messages, and
UFFDIO_COPY/ZEROPAGE fill the pages and wake the sleepers.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmpoison.arch.x86.pgtable import pfn_pte, pte_none, pte_none_array, pte_present
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.fault import vma_lookup
from kvmpoison.mm.file import O_RDONLY, O_RDWR, File, Inode, NoFileOperations
from kvmpoison.mm.memory import maybe_mkwrite
from kvmpoison.mm.mm_types import VM, MmStruct, Vma
from kvmpoison.mm.mmap import range_is_mapped, vmas_in_range
from kvmpoison.mm.page import get_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.pagetable import TASK_SIZE
from kvmpoison.mm.rmap import anon_vma_prepare, page_add_new_anon_rmap, page_add_rmap
from kvmpoison.mm.swapops import (
    PteMarker,
    is_pte_marker_entry,
    make_pte_marker_entry,
    pte_marker_get,
    pte_to_swp_entry,
    swp_entry_to_pte,
)
from kvmpoison.mm.uaccess import IovIter
from kvmpoison.mm.userfaultfd_k import (
    UFFD_API,
    UFFD_FEATURE_SIGBUS,
    UFFD_MSG_SIZE,
    UserfaultBlocked,
    wake_userfault,
)
from kvmpoison.mm.userfaultfd_k import (
    UffdCtx as UffdCtx,
)

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2


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


# -- the file, UFFDIO_API, read(2), UFFDIO_COPY/ZEROPAGE -----------------------------------

UFFD_USER_MODE_ONLY = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
# UFFD_API_FEATURES the model accepts at UFFDIO_API (v5.12's list; the rest are refused
# as this kernel would refuse a feature it lacks): SIGBUS only changes what a fault does.
UFFD_API_FEATURES_MODELLED = UFFD_FEATURE_SIGBUS


class UffdFile(NoFileOperations):
    """``userfaultfd_fops`` (fs/userfaultfd.c): read(2) of messages; no write, no mmap."""

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        ctx = file.private_data
        assert isinstance(ctx, UffdCtx)
        got = userfaultfd_read(ctx, bool(file.f_flags & O_NONBLOCK), to.count)
        if isinstance(got, int):
            return got
        copied = to.copy_to_iter(got)
        return copied if copied == len(got) else -errno.EFAULT

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        """``vfs_fallocate`` (fs/open.c, v5.12) on a writable userfaultfd: its anon inode
        has no file type (``alloc_anon_inode``: S_IRUSR | S_IWUSR), so neither S_ISREG
        nor S_ISBLK: -ENODEV, before the missing ->fallocate. From 6.1 the file is
        O_RDONLY and vfs_fallocate stops earlier at -EBADF."""
        return -errno.ENODEV


def sys_userfaultfd(mm: MmStruct, flags: int, ino: int) -> File | int:
    """``SYSCALL_DEFINE1(userfaultfd)`` (fs/userfaultfd.c, v5.12; 6.18 ``new_userfaultfd``):
    flags beyond O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY are -EINVAL. The model's
    VMM holds CAP_SYS_PTRACE, so the vm.unprivileged_userfaultfd check passes. The
    context waits for UFFDIO_API. The file is O_RDWR on v5.12 and O_RDONLY from 6.1
    ("userfaultfd: open userfaultfds with O_RDONLY", Debian's 6.1 tree has it)."""
    if flags & ~(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY):
        return -errno.EINVAL
    ctx = UffdCtx(mm, initialized=False)
    access = O_RDONLY if mm.core.kcfg.version.tuple >= (6, 1) else O_RDWR
    return File(name="[userfaultfd]", f_inode=Inode(ino=ino, kind="userfaultfd"),
                f_op=UffdFile(), f_flags=access | (flags & O_NONBLOCK), fmode_pread=False,
                private_data=ctx)


def userfaultfd_api(ctx: UffdCtx, api: int, features: int) -> int:
    """``userfaultfd_api`` (fs/userfaultfd.c, v5.12; 6.1 and 6.18 alike here): -EINVAL for
    a second call, another API number or an unknown feature; else the context runs."""
    if ctx.initialized:
        return -errno.EINVAL
    if api != UFFD_API or features & ~UFFD_API_FEATURES_MODELLED:
        return -errno.EINVAL
    ctx.features = features
    ctx.initialized = True
    return 0


def userfaultfd_read(ctx: UffdCtx, nonblock: bool, count: int) -> bytes | int:
    """``userfaultfd_read`` -> ``userfaultfd_ctx_read`` (fs/userfaultfd.c, v5.12): the
    pending messages, oldest first, as many whole ones as ``count`` holds (each moves
    from fault_pending_wqh to fault_wqh); -EINVAL before UFFDIO_API or for a count
    below one message; none pending: -EAGAIN with O_NONBLOCK, else the reader sleeps
    (:class:`UserfaultBlocked`; the model does not wake a sleeping reader)."""
    if not ctx.initialized or count < UFFD_MSG_SIZE:
        return -errno.EINVAL
    out = b""
    for w in ctx.waiters:
        if len(out) + UFFD_MSG_SIZE > count:
            break
        if not w.reported:
            w.reported = True
            out += w.msg
    if out:
        return out
    if nonblock:
        return -errno.EAGAIN
    raise UserfaultBlocked(None)


def validate_range(start: int, length: int) -> int:
    """``validate_range`` (fs/userfaultfd.c, v5.12)."""
    if start & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or not length:
        return -errno.EINVAL
    if start >= TASK_SIZE or length > TASK_SIZE - start:
        return -errno.EINVAL
    return 0


def _pte_none_mostly(core: MmCore, pte: int) -> bool:
    """What ``mfill_atomic_install_pte`` may overwrite: v5.12 ``pte_none``; 6.1 on
    ``pte_none_mostly`` (a PTE marker too: a uffd-wp marker over a hole). The hardened
    design's guest-private marker is never overwritten (its rule: -EEXIST)."""
    if pte_none(pte):
        return True
    if not core.kcfg.has_pte_markers or pte_present(pte):
        return False
    entry = pte_to_swp_entry(pte, core.kcfg)
    if not is_pte_marker_entry(entry, core.swap_types):
        return False
    return not pte_marker_get(entry) & PteMarker.GUEST_PRIVATE


def mfill_atomic_pte(vma: Vma, dst: int, data: bytes | None) -> int:
    """One page of ``__mcopy_atomic``: ``mfill_atomic_pte`` (mm/userfaultfd.c, v5.12), 0
    or -errno; ``data`` None is UFFDIO_ZEROPAGE.

    Private VMA: ``mcopy_atomic_pte`` (a new anonymous page with the bytes,
    writable and dirty if VM_WRITE) or ``mfill_zeropage_pte`` (the zero page,
    special); -EEXIST unless the PTE is none (6.1+: or a marker, for COPY).
    Shared (shmem): ``shmem_mfill_atomic_pte`` -EFAULT beyond EOF, -EEXIST when
    the index is cached (``shmem_add_to_page_cache``) or the PTE is not none (the
    page leaves the cache again), else a new page (zeroed for ZEROPAGE) in the
    cache and mapped. Not modelled: WP mode, memcg charge, the -ENOENT retry.
    """
    mm = vma.vm_mm
    core = mm.core
    pte = mm.pgd.get(dst)
    can_install = pte_none(pte) if data is None and not vma.vm_flags & VM.SHARED \
        else _pte_none_mostly(core, pte)
    if vma.vm_file is not None and vma.linear_page_index(dst) >= vma.vm_file.f_inode.nr_pages:
        return -errno.EFAULT  # offset >= max_off
    if not vma.vm_flags & VM.SHARED:
        if not can_install:
            return -errno.EEXIST
        if data is None:
            zero = pfn_pte(core.zero_pfn, vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
            mm.pgd.set(dst, zero)
            return 0
        anon_vma_prepare(vma)
        page = core.buddy.alloc_pages(0)
        if page is None:
            return -errno.ENOMEM
        core.hw.write(page.pfn << PAGE_SHIFT, data.ljust(PAGE_SIZE, b"\0"), 0)
        page_add_new_anon_rmap(page, vma, dst)
        core.pages.flags[page.pfn] |= np.uint32(core.pages.bits.mask(
            PG.swapbacked, PG.uptodate, PG.lru, PG.dirty))
        mm.rss_anon += 1
        prot = pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_DIRTY | _PAGE_ACCESSED
        mm.pgd.set(dst, maybe_mkwrite(prot, vma))
        return 0
    inode = vma.vm_file.f_inode if vma.vm_file is not None else None
    mapping = inode.mapping if inode is not None else None
    if mapping is None:
        return -errno.EINVAL
    index = vma.linear_page_index(dst)
    if mapping.lookup(index) is not None:
        return -errno.EEXIST  # shmem_add_to_page_cache
    if not can_install:
        return -errno.EEXIST  # out_release_unlock: delete_from_page_cache, put_page
    page = core.buddy.alloc_pages(0)
    if page is None:
        return -errno.ENOMEM
    if data is None:
        core.clear_pages(np.array([page.pfn], dtype=np.int64))
    else:
        core.hw.write(page.pfn << PAGE_SHIFT, data.ljust(PAGE_SIZE, b"\0"), 0)
    core.pages.flags[page.pfn] |= np.uint32(core.pages.bits.mask(
        PG.swapbacked, PG.uptodate, PG.lru, PG.dirty))
    mapping.add_to_page_cache(page, index)  # the cache's reference
    get_page(page)  # the PTE's
    page_add_rmap(page)
    mm.rss_shmem += 1
    mm.pgd.set(dst, maybe_mkwrite(pfn_pte(page.pfn, vma.vm_page_prot) | _PAGE_DIRTY
                                  | _PAGE_ACCESSED, vma))
    return 0


def mfill_atomic(ctx: UffdCtx, dst: int, data: bytes | None, length: int) -> int:
    """``__mcopy_atomic`` (mm/userfaultfd.c, v5.12; 6.18 ``mfill_atomic``): bytes filled
    or -errno. -ENOENT unless one registered VMA holds the whole range
    (``find_dst_vma``); -EINVAL for a VMA that is neither anonymous nor shmem; a
    huge PMD is -EEXIST. Stops at the first page that fails (then the count so far)."""
    mm = ctx.mm

    vma = vma_lookup(mm, dst)
    if vma is None or dst + length > vma.vm_end or vma.uffd_ctx is None:
        return -errno.ENOENT
    shmem = vma.vm_file is not None and vma.vm_file.f_inode.kind == "shmem"
    if not (vma.vm_file is None and vma.vm_ops is None) and not shmem:
        return -errno.EINVAL
    done = 0
    err = 0
    while done < length:
        addr = dst + done
        if mm.pgd.pmd_leaves(addr, addr + PAGE_SIZE):
            err = -errno.EEXIST  # pmd_trans_huge(dst_pmdval)
            break
        chunk = None if data is None else data[done : done + PAGE_SIZE]
        err = mfill_atomic_pte(vma, addr, chunk)
        if err:
            break
        done += PAGE_SIZE
    return done if done else err


def userfaultfd_copy(ctx: UffdCtx, dst: int, data: bytes | None, length: int,
                     mode: int) -> tuple[int, int]:
    """``userfaultfd_copy`` / ``userfaultfd_zeropage`` (fs/userfaultfd.c, v5.12): the
    ioctl's return (0, -EAGAIN for a short fill, -errno) and the ``copy``/``zeropage``
    field (bytes or -errno). Unless DONTWAKE, the threads waiting on the filled
    range are woken (``ctx.woken``)."""
    if not ctx.initialized:
        return -errno.EINVAL, 0
    err = validate_range(dst, length)
    if err:
        return err, 0
    if mode & ~(UFFDIO_COPY_MODE_DONTWAKE | (UFFDIO_COPY_MODE_WP if data is not None else 0)):
        return -errno.EINVAL, 0
    if mode & UFFDIO_COPY_MODE_WP:
        return -errno.EINVAL, 0  # not modelled: a bad scenario would name it
    got = mfill_atomic(ctx, dst, data, length)
    if got < 0:
        return got, got
    if not mode & UFFDIO_COPY_MODE_DONTWAKE:
        wake_userfault(ctx, dst, got)
    return (0 if got == length else -errno.EAGAIN), got
