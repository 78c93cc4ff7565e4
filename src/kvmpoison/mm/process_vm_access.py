"""process_vm_readv/process_vm_writev.

Follows ``mm/process_vm_access.c`` (v5.12): remote pages are pinned with
``pin_user_pages_remote`` (no FOLL_FORCE) up to 16 at a time; a pin that
gets nothing ends the call with -EFAULT unless bytes already moved, in
which case the count so far is returned.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.filemap import kernel_read_page
from kvmpoison.mm.gup import FOLL, pin_user_pages, unpin_user_pages_dirty_lock
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import Page
from kvmpoison.mm.uaccess import IovIter

PVM_MAX_PP_ARRAY_COUNT = 16


def process_vm_rw(local: MmStruct, cpu: Cpu | None, remote: MmStruct, local_addr: int,
                  remote_addr: int, length: int, vm_write: bool) -> int:
    """mm/process_vm_access.c ``process_vm_rw_core``/``process_vm_rw_single_vec`` (v5.12).

    Pins up to 16 remote pages at a time, copies, and unpins with
    ``unpin_user_pages_dirty_lock(pages, vm_write)``; returns bytes moved or
    -EFAULT when nothing moved.
    """
    it = IovIter(local, cpu, local_addr, length)
    total = 0
    addr = remote_addr
    end = remote_addr + length
    while addr < end:
        first = addr & ~(PAGE_SIZE - 1)
        nr = min(PVM_MAX_PP_ARRAY_COUNT, ((end - 1 - first) >> PAGE_SHIFT) + 1)
        pages: list[Page] = []
        pinned = pin_user_pages(remote, first, nr, FOLL.REMOTE | (FOLL.WRITE if vm_write
                                                                  else FOLL(0)), pages)
        if pinned <= 0:
            return total or -errno.EFAULT
        for page in pages:
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, end - addr)
            if vm_write:
                data = it.copy_from_iter(n)
                remote.core.hw.write((page.pfn << PAGE_SHIFT) + off, data, 0)
            else:
                data = kernel_read_page(remote.core, page.pfn, off, n)
                data = data[: it.copy_to_iter(data)]
            total += len(data)
            addr += len(data)
            if len(data) < n:
                unpin_user_pages_dirty_lock(pages, vm_write)
                return total or -errno.EFAULT
        unpin_user_pages_dirty_lock(pages, vm_write)
    return total
