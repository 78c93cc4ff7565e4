"""The real kernel doing the bulk mm work the model's benchmarks compare against.

Each function times one kind of work on this machine's kernel through ctypes and
returns nanoseconds of CPU time (user + system of this process) per 4 KiB page.
Nothing here faults: every range is mapped and populated before it is touched,
and the forked mapper only maps and waits.
"""

from __future__ import annotations

import ctypes
import os
import time

from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    libc,
    mmap,
)

PAGE = 4096
PROT_RW = PROT_READ | PROT_WRITE
MAP_NORESERVE = 0x4000
MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 15, 23
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def anon_bulk(size: int) -> dict[str, float]:
    """ns/page on a private anonymous 4 KiB mapping (THP off) of ``size`` bytes.

    ``fault-in``: MADV_POPULATE_WRITE (allocate, clear_page, map each page);
    ``clear``: memset(0) over the populated range, the clear_page part of fault-in;
    ``mprotect``: PROT_NONE over it; ``munmap``: unmap and free it.
    """
    pages = size // PAGE
    addr = mmap(None, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    _check(libc.madvise(addr, size, MADV_NOHUGEPAGE), "madvise(NOHUGEPAGE)")
    out = {}
    t0 = time.process_time_ns()
    _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "madvise(POPULATE_WRITE)")
    out["fault-in"] = (time.process_time_ns() - t0) / pages
    t0 = time.process_time_ns()
    ctypes.memset(addr, 0, size)
    out["clear"] = (time.process_time_ns() - t0) / pages
    t0 = time.process_time_ns()
    _check(libc.mprotect(addr, size, PROT_NONE), "mprotect")
    out["mprotect"] = (time.process_time_ns() - t0) / pages
    t0 = time.process_time_ns()
    _check(libc.munmap(addr, size), "munmap")
    out["munmap"] = (time.process_time_ns() - t0) / pages
    return out


def memfd_punch(size: int, mappers: int, per_page: bool) -> float:
    """ns/page for fallocate(PUNCH_HOLE|KEEP_SIZE) over a memfd mapped and populated by
    ``mappers`` processes (0, 1 or 2), in one call or one call per 4 KiB page.

    mappers=2 adds a forked child that maps and populates the whole file, then waits.
    """
    pages = size // PAGE
    fd = os.memfd_create("kvmpoison-bench", 0)
    os.ftruncate(fd, size)
    addr = None
    if mappers >= 1:
        addr = mmap(None, size, PROT_RW, MAP_SHARED, fd)
        _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "populate")
    child = None
    go_w = -1
    if mappers >= 2:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            caddr = libc.mmap(None, size, PROT_RW, MAP_SHARED, fd, 0)
            libc.madvise(caddr, size, MADV_POPULATE_WRITE)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            os._exit(0)
        os.read(ready_r, 1)
        for end in (ready_r, ready_w, go_r):
            os.close(end)
    if mappers == 0:
        _check(libc.fallocate(fd, 0, 0, size), "fallocate")
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    try:
        t0 = time.process_time_ns()
        if per_page:
            for off in range(0, size, PAGE):
                libc.fallocate(fd, mode, off, PAGE)
        else:
            _check(libc.fallocate(fd, mode, 0, size), "punch")
        spent = time.process_time_ns() - t0
    finally:
        if child is not None:
            os.write(go_w, b"g")
            os.close(go_w)
            os.waitpid(child, 0)
        if addr is not None:
            libc.munmap(addr, size)
        os.close(fd)
    return spent / pages
