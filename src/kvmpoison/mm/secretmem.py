"""memfd_secret(2): memory mapped only in its owner's page tables.

Follows ``mm/secretmem.c`` (v5.14+, as in 6.18): VMAs are VM_LOCKED|VM_DONTDUMP
and MAP_SHARED only (set by ->mmap, so mmap does not populate them); faults
allocate a page, take it out of the kernel direct map and cache it;
read/write are -EINVAL, fallocate -EOPNOTSUPP, and once i_size is non-zero
every ftruncate is -EINVAL. GUP refuses these VMAs
(``check_vma_flags``), so O_DIRECT, vmsplice, process_vm_* and FOLL_FORCE
users all fail while the owner's loads, stores and uaccess work.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from kvmpoison.kconfig import KernelVersion
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import O_CLOEXEC, File, Inode, NoFileOperations
from kvmpoison.mm.mm_types import VM, Vma, VmFault, VmFaultInfo
from kvmpoison.mm.page import get_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.shmem import new_inode


@dataclass
class SecretmemVmOps:
    sm: Secretmem
    inode: Inode

    def fault(self, vmf: VmFaultInfo) -> VmFault:
        return self.sm.secretmem_fault(self.inode, vmf)


class Secretmem(NoFileOperations):
    """``secretmem_fops``: no read/write/fallocate (the NULL-slot defaults)."""

    kind = "secretmem"

    def __init__(self, core: MmCore):
        self.core = core
        self.direct_map_invalid: set[int] = set()  # pfns removed from the direct map

    def mmap(self, file: File, vma: Vma) -> int:
        """``secretmem_mmap``: shared only (VM_SHARED or VM_MAYSHARE), then locked."""
        if not vma.vm_flags & (VM.SHARED | VM.MAYSHARE):
            return -errno.EINVAL
        # Debian's 6.1.192 ("mm/secretmem: properly account locked pages") charges the
        # pages to the locked limit itself and leaves VM_LOCKED off: MADV_DONTNEED works.
        locked = VM(0) if self.core.kcfg.version == KernelVersion.V6_1 else VM.LOCKED
        vma.vm_flags |= locked | VM.DONTDUMP
        vma.vm_ops = SecretmemVmOps(self, file.f_inode)
        return 0

    def secretmem_fault(self, inode: Inode, vmf: VmFaultInfo) -> VmFault:
        """``mm/secretmem.c:secretmem_fault`` (6.18): SIGBUS past i_size; a new page is
        zeroed, removed from the direct map and cached.
        """
        core = self.core
        if vmf.pgoff >= inode.nr_pages:
            return VmFault.SIGBUS
        mapping = inode.mapping
        assert mapping is not None
        pfn = mapping.lookup(vmf.pgoff)
        if pfn is None:
            page = core.buddy.alloc_pages(0)
            if page is None:
                return VmFault.OOM
            core.clear_pages(np.array([page.pfn], dtype=np.int64))
            core.pages.flags[page.pfn] |= np.uint32(core.pages.bits.mask(
                PG.uptodate, PG.unevictable, PG.mlocked))
            self.direct_map_invalid.add(page.pfn)  # set_direct_map_invalid_noflush
            mapping.add_to_page_cache(page, vmf.pgoff)
            pfn = page.pfn
        get_page(core.pages[pfn])
        vmf.page = pfn
        return VmFault(0)

    def setattr_size(self, file: File, size: int) -> int:
        """``secretmem_setattr``: any size change once i_size is non-zero is -EINVAL."""
        if size < 0 or file.f_inode.i_size:
            return -errno.EINVAL
        file.f_inode.i_size = size
        return 0

    def fsync(self, file: File) -> int:
        return 0


def memfd_secret(core: MmCore, flags: int) -> File | int:
    """``SYSCALL_DEFINE1(memfd_secret)`` (v5.14+, 6.18): only O_CLOEXEC is a valid flag."""
    if flags & ~O_CLOEXEC:
        return -errno.EINVAL
    return File(name="secretmem", f_inode=new_inode(core, "secretmem"), f_op=Secretmem(core),
                fmode_pread=True)
