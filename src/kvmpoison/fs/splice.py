"""vmsplice(2).

Follows ``fs/splice.c`` (v5.12): splicing user memory *into* a pipe takes
page references with ``iov_iter_get_pages`` (GUP), so an inaccessible page
is -EFAULT; splicing *from* a pipe to user memory copies with
``copy_to_user`` (``vmsplice_to_user``).
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.fs.pipe import Pipe
from kvmpoison.mm.filemap import kernel_read_page
from kvmpoison.mm.gup import FOLL, get_user_pages_fast, put_pages
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import Page
from kvmpoison.mm.uaccess import IovIter


def vmsplice_to_pipe(mm: MmStruct, pipe: Pipe, addr: int, length: int) -> int:
    first = addr & ~(PAGE_SIZE - 1)
    nr = ((addr + length - 1 - first) >> PAGE_SHIFT) + 1
    pages: list[Page] = []
    got = get_user_pages_fast(mm, first, nr, FOLL(0), pages)
    if got <= 0:
        return -errno.EFAULT
    data = b""
    for i, page in enumerate(pages):
        lo = max(addr, first + i * PAGE_SIZE)
        hi = min(addr + length, first + (i + 1) * PAGE_SIZE)
        data += kernel_read_page(mm.core, page.pfn, lo & (PAGE_SIZE - 1), hi - lo)
    put_pages(pages)
    pipe.data += data
    return len(data)


def vmsplice_to_user(mm: MmStruct, cpu: Cpu | None, pipe: Pipe, addr: int, length: int) -> int:
    it = IovIter(mm, cpu, addr, length)
    chunk = bytes(pipe.data[:length])
    copied = it.copy_to_iter(chunk)
    if copied < len(chunk):
        return copied or -errno.EFAULT
    del pipe.data[:copied]
    return copied
