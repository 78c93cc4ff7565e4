"""guest_memfd: the successor design's file of guest-private memory.

Follows ``virt/kvm/guest_memfd.c`` as of v6.18 (``GUEST_MEMFD_FLAG_MMAP`` =
1, ``GUEST_MEMFD_FLAG_INIT_SHARED`` = 2) and the file ABI measured on this
project's machines (the ``gmem_*`` columns of docs/matrix.md): size
fixed at creation, read/write -EINVAL, pread/pwrite -ESPIPE, ftruncate
-EINVAL, fallocate only with KEEP_SIZE, mmap only with the MMAP flag, only
MAP_SHARED, never executable (the mount is noexec). Without INIT_SHARED
every offset is private and a host fault is VM_FAULT_SIGBUS. Folios are
order-0 and unevictable.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import AS_UNEVICTABLE, File, Inode
from kvmpoison.mm.filemap import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    truncate_inode_pages_range,
)
from kvmpoison.mm.mm_types import VM, Vma, VmFault, VmFaultInfo
from kvmpoison.mm.page import get_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.shmem import new_inode
from kvmpoison.mm.uaccess import IovIter

MF_DELAYED = 2  # enum mf_result (include/linux/mm.h)
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_VALID_FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


@dataclass
class GmemVmOps:
    gmem: GuestMemfd
    inode: Inode

    def fault(self, vmf: VmFaultInfo) -> VmFault:
        return self.gmem.kvm_gmem_fault_user_mapping(vmf)


class Invalidate(Protocol):
    def __call__(self, start: int, end: int, /) -> None: ...


@dataclass(eq=False)
class GmemBinding:
    """One range of ``f->bindings``: file pages [start, end) bound to ``slot``.

    ``invalidate(start, end)`` is ``__kvm_gmem_invalidate_begin`` for file pages
    [start, end) of this binding: it zaps the SPTEs of the matching gfns.
    """

    start: int
    end: int
    slot: object
    invalidate: Invalidate


class GuestMemfd:
    """``kvm_gmem_fops`` for one guest_memfd bound to ``owner`` (a VM)."""

    kind = "gmem"

    def __init__(self, core: MmCore, owner: object, flags: int):
        self.core = core
        self.owner = owner
        self.flags = flags
        self.bindings: list[GmemBinding] = []

    def kvm_gmem_invalidate_begin(self, start: int, end: int) -> None:
        """Zap every bound memslot's SPTEs for file pages [start, end)."""
        for b in list(self.bindings):
            lo, hi = max(b.start, start), min(b.end, end)
            if lo < hi:
                b.invalidate(lo, hi)

    def kvm_gmem_error_folio(self, index: int) -> int:
        """``a_ops->error_remove_folio``: zap the SPTEs, keep the page, MF_DELAYED.

        The guest's next access finds the poisoned folio: ``kvm_gmem_get_pfn``
        returns -EHWPOISON and what to do is the VMM's decision.
        """
        self.kvm_gmem_invalidate_begin(index, index + 1)
        return MF_DELAYED

    @property
    def shared(self) -> bool:
        return bool(self.flags & GUEST_MEMFD_FLAG_INIT_SHARED)

    def kvm_gmem_get_folio(self, inode: Inode, index: int) -> tuple[int | None, int]:
        """``kvm_gmem_get_folio`` (virt/kvm/guest_memfd.c, 6.18): find or create the folio
        (``__filemap_get_folio(FGP_LOCK | FGP_ACCESSED | FGP_CREAT)``), cleared and marked
        up to date. No hwpoison check here: ``kvm_gmem_get_pfn`` (KVM's side) has it, a
        user fault finds it in ``__do_fault``, and fallocate has none."""
        core = self.core
        mapping = inode.mapping
        assert mapping is not None
        if index >= inode.nr_pages:
            return None, -errno.EINVAL
        pfn = mapping.lookup(index)
        if pfn is None:
            # kvm_gmem_aops: installed before the first page enters the cache
            mapping.error_remove_folio = self.kvm_gmem_error_folio
            page = core.buddy.alloc_pages(0)
            if page is None:
                return None, -errno.ENOMEM
            core.clear_pages(np.array([page.pfn], dtype=np.int64))
            core.pages.flags[page.pfn] |= np.uint32(core.pages.bits.mask(
                PG.uptodate, PG.unevictable))
            mapping.add_to_page_cache(page, index)
            pfn = page.pfn
        return pfn, 0

    def kvm_gmem_fault_user_mapping(self, vmf: VmFaultInfo) -> VmFault:
        """``kvm_gmem_fault_user_mapping`` (virt/kvm/guest_memfd.c, 6.18): SIGBUS beyond
        i_size or without INIT_SHARED, else the folio (a poisoned one too: ``__do_fault``
        turns it into VM_FAULT_HWPOISON)."""
        inode = vmf.vma.vm_file.f_inode if vmf.vma.vm_file is not None else None
        assert inode is not None
        if vmf.pgoff >= inode.nr_pages or not self.shared:
            return VmFault.SIGBUS
        pfn, err = self.kvm_gmem_get_folio(inode, vmf.pgoff)
        if err or pfn is None:
            return VmFault.OOM if err == -errno.ENOMEM else VmFault.SIGBUS
        get_page(self.core.pages[pfn])
        vmf.page = pfn
        return VmFault(0)

    # -- file_operations ---------------------------------------------------------

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        return -errno.EINVAL

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        return -errno.EINVAL

    def mmap(self, file: File, vma: Vma) -> int:
        """``kvm_gmem_mmap`` (6.18): -ENODEV without GUEST_MEMFD_FLAG_MMAP, MAP_SHARED only."""
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            return -errno.ENODEV
        if (vma.vm_flags & (VM.SHARED | VM.MAYSHARE)) != (VM.SHARED | VM.MAYSHARE):
            return -errno.EINVAL
        vma.vm_flags |= VM.DONTEXPAND
        vma.vm_ops = GmemVmOps(self, file.f_inode)
        return 0

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        """``kvm_gmem_fallocate`` (6.18): KEEP_SIZE required, PUNCH_HOLE the only other
        mode, page-aligned; ``kvm_gmem_allocate`` refuses beyond i_size (-EINVAL) and
        fills every folio, poisoned ones included. Simplified: no invalidation of KVM's
        mappings (the model binds no memslot to a guest_memfd)."""
        inode = file.f_inode
        if not mode & FALLOC_FL_KEEP_SIZE:
            return -errno.EOPNOTSUPP
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            return -errno.EOPNOTSUPP
        if offset & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or offset < 0 or length <= 0:
            return -errno.EINVAL
        mapping = inode.mapping
        assert mapping is not None
        if mode & FALLOC_FL_PUNCH_HOLE:
            first = offset >> PAGE_SHIFT
            last = min(inode.nr_pages, (offset + length) >> PAGE_SHIFT)
            self.kvm_gmem_invalidate_begin(first, (offset + length) >> PAGE_SHIFT)
            if first < last:
                truncate_inode_pages_range(self.core, mapping, first, last)
            return 0
        if offset + length > inode.i_size:
            return -errno.EINVAL
        for index in range(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT):
            _, err = self.kvm_gmem_get_folio(inode, index)
            if err:
                return err
        return 0

    def setattr_size(self, file: File, size: int) -> int:
        return -errno.EINVAL

    def fsync(self, file: File) -> int:
        return 0


def kvm_gmem_create(core: MmCore, owner: object, size: int, flags: int) -> File | int:
    """``KVM_CREATE_GUEST_MEMFD`` (``kvm_gmem_create``/``__kvm_gmem_create``, 6.18): a new
    guest_memfd file, or -EINVAL for unknown flags or a size that is not a positive
    multiple of the page size. Simplified: every flag is valid for every VM type."""
    if flags & ~GUEST_MEMFD_VALID_FLAGS:
        return -errno.EINVAL
    if size <= 0 or size & (PAGE_SIZE - 1):
        return -errno.EINVAL
    inode = new_inode(core, "gmem", size)
    inode.noexec = True
    assert inode.mapping is not None
    inode.mapping.flags |= AS_UNEVICTABLE
    return File(name="anon_inode:[kvm-gmem]", f_inode=inode,
                f_op=GuestMemfd(core, owner, flags), fmode_pread=False)


def kvm_gmem_init(kernel: Kernel) -> None:
    """Register ``KVM_CREATE_GUEST_MEMFD`` with the kernel at boot (kernel/ never imports virt/)."""
    # A partial, not a closure: a copied machine's kernel gets its own bound core.
    kernel.kvm_create_guest_memfd = functools.partial(kvm_gmem_create, kernel.core)
