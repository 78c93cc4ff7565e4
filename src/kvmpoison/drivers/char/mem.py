"""``/dev/mem``: physical memory, here the part of it with no struct page (a PCI BAR).

Follows ``drivers/char/mem.c`` (v5.12; 6.18 the same here): ``mmap_mem`` checks
the range (``valid_mmap_phys_addr_range``, ``range_is_allowed``: with
CONFIG_STRICT_DEVMEM, x86's ``devmem_is_allowed`` refuses RAM with -EPERM),
then maps it with ``remap_pfn_range``: a VM_IO | VM_PFNMAP mapping of pfns the
memmap does not cover. It is what a VMM maps to give a guest device memory
(vfio-pci's BAR mmap is the same ``remap_pfn_range`` with VM_IO | VM_PFNMAP).

The model's machine has one device: a 64 KiB BAR at the first 128 MiB
boundary at or above the end of DRAM (:func:`bar_range`), so no struct page
exists for it (``pfn_valid`` is false, as for a BAR outside every memory
section). Simplified: no read/write on the file, no ``phys_mem_access_prot``
(the BAR's PTEs take the VMA's protection, not UC-), no PAT tracking.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import O_RDWR, File, Inode, NoFileOperations
from kvmpoison.mm.memory import remap_pfn_range
from kvmpoison.mm.mm_types import Vma

DEV_MEM = "/dev/mem"
SECTION_SIZE = 1 << 27  # x86-64 SECTION_SIZE_BITS = 27
BAR_SIZE = 64 << 10


def bar_range(core: MmCore) -> tuple[int, int]:
    """The model's device BAR: (physical address, size), in a section of its own."""
    dram = core.pages.nr_pages << PAGE_SHIFT
    return (dram + SECTION_SIZE - 1) & ~(SECTION_SIZE - 1), BAR_SIZE


class DevMem(NoFileOperations):
    """``mem_fops`` of /dev/mem: only ``mmap`` (``mmap_mem``) is modelled."""

    def __init__(self, core: MmCore):
        self.core = core

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        """``vfs_fallocate`` (fs/open.c, v5.12 and 6.1): a character device is neither
        S_ISREG nor S_ISBLK: -ENODEV, before the missing ->fallocate."""
        return -errno.ENODEV

    def mmap(self, file: File, vma: Vma) -> int:
        """``mmap_mem`` (drivers/char/mem.c): -EINVAL outside physical memory, -EPERM for
        RAM (``range_is_allowed``: x86 ``devmem_is_allowed`` with STRICT_DEVMEM) or a range
        nothing decodes, then ``remap_pfn_range`` (its failure is -EAGAIN)."""
        size = vma.vm_end - vma.vm_start
        offset = vma.vm_pgoff << PAGE_SHIFT
        if offset + size > 1 << 52:  # valid_mmap_phys_addr_range: __PHYSICAL_MASK
            return -errno.EINVAL
        bar, bar_size = bar_range(self.core)
        if not (bar <= offset and offset + size <= bar + bar_size):
            return -errno.EPERM  # RAM, or (model) no device decodes it
        self.core.hw.add_iomem(bar, bar_size)
        if remap_pfn_range(vma, vma.vm_start, vma.vm_pgoff, size, vma.vm_page_prot):
            return -errno.EAGAIN
        return 0


def open_dev_mem(core: MmCore, ino: int, flags: int = O_RDWR) -> File:
    """``open("/dev/mem")`` (``open_port``: CAP_SYS_RAWIO, which the model's VMM holds)."""
    return File(name=DEV_MEM, f_inode=Inode(ino=ino, kind="devmem"), f_op=DevMem(core),
                f_flags=flags, fmode_pread=False)


__all__ = ["DEV_MEM", "DevMem", "bar_range", "open_dev_mem"]
