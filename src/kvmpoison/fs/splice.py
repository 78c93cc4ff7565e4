"""vmsplice(2).

Follows ``fs/splice.c`` (v5.12; 6.18 the same in what is modelled).
Splicing user memory *into* a pipe (``iter_to_pipe``) pins the pages with
``iov_iter_get_pages`` (GUP, read access) and queues each as a buffer that
*references* the page: no copy is made, the reader gets the page's bytes as
they are when it reads, and the pipe holds a page reference until then. A page
GUP refuses ends the transfer (-EFAULT when nothing was queued); a full pipe
stops it (-EAGAIN when nothing was queued, as with SPLICE_F_NONBLOCK).
Splicing *from* a pipe to user memory (``vmsplice_to_user``) copies buffer
by buffer with ``copy_page_to_iter`` (``pipe_to_user``): a buffer whose copy
faults stays in the pipe and the call returns what earlier buffers moved, or
-EFAULT.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.fs.pipe import Pipe, PipeBuffer
from kvmpoison.mm.gup import FOLL, get_user_pages_fast, put_pages
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import Page
from kvmpoison.mm.uaccess import IovIter


def vmsplice_to_pipe(mm: MmStruct, pipe: Pipe, addr: int, length: int) -> int:
    """``iter_to_pipe``: queue references to the user pages of [addr, addr + length)."""
    if not length:
        return 0
    if pipe.full:
        return -errno.EAGAIN  # wait_for_space with SPLICE_F_NONBLOCK
    first = addr & ~(PAGE_SIZE - 1)
    nr = ((addr + length - 1 - first) >> PAGE_SHIFT) + 1
    pages: list[Page] = []
    got = get_user_pages_fast(mm, first, nr, FOLL(0), pages)
    if got <= 0:
        return got if got < 0 else -errno.EFAULT
    total = 0
    for i, page in enumerate(pages):
        if pipe.full:  # add_to_pipe: -EAGAIN; the remaining pins are dropped
            put_pages(pages[i:])
            break
        lo = max(addr, first + i * PAGE_SIZE)
        hi = min(addr + length, first + (i + 1) * PAGE_SIZE)
        pipe.bufs.append(PipeBuffer(pfn=page.pfn, offset=lo & (PAGE_SIZE - 1), len=hi - lo,
                                    core=mm.core, can_merge=False))  # keeps GUP's reference
        total += hi - lo
    return total


def vmsplice_to_user(mm: MmStruct, cpu: Cpu | None, pipe: Pipe, addr: int, length: int) -> int:
    """``vmsplice_to_user`` through ``__splice_from_pipe`` with ``pipe_to_user``."""
    if not length:
        return 0
    if not pipe.bufs:
        return -errno.EAGAIN  # splice_from_pipe_next with SPLICE_F_NONBLOCK
    it = IovIter(mm, cpu, addr, length)
    spliced = 0
    while pipe.bufs and it.count:
        buf = pipe.bufs[0]
        n = min(buf.len, it.count)
        if it.copy_to_iter(buf.read(n)) < n:
            return spliced or -errno.EFAULT
        spliced += n
        pipe.consume(buf, n)
    return spliced
