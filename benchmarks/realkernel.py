"""The real kernel doing bulk mm work on an anonymous mapping, through ctypes (for ratios)."""

from __future__ import annotations

import ctypes
import os
import time

from kvmpoison.backends.kvm.libc import libc  # the typed libc of the real-kernel backend

PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 15, 23


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def anon_bulk(size: int) -> dict[str, float]:
    """ns/page for populate (MADV_POPULATE_WRITE), mprotect(PROT_NONE), munmap; 4K pages."""
    pages = size // 4096
    addr = libc.mmap(None, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    _check(libc.madvise(addr, size, MADV_NOHUGEPAGE), "madvise(NOHUGEPAGE)")
    out = {}
    t0 = time.perf_counter_ns()
    _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "madvise(POPULATE_WRITE)")
    out["fault-in"] = (time.perf_counter_ns() - t0) / pages
    t0 = time.perf_counter_ns()
    _check(libc.mprotect(addr, size, PROT_NONE), "mprotect")
    out["mprotect"] = (time.perf_counter_ns() - t0) / pages
    t0 = time.perf_counter_ns()
    _check(libc.munmap(addr, size), "munmap")
    out["munmap"] = (time.perf_counter_ns() - t0) / pages
    return out


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def memfd_punch(size: int, mappers: int, per_page: bool) -> float:
    """ns/page for fallocate(PUNCH_HOLE|KEEP_SIZE) over a memfd mapped+populated by ``mappers``.

    mappers=2 adds a forked child that maps and touches the whole file and waits.
    """
    pages = size // 4096
    fd = os.memfd_create("bench", 0)
    os.ftruncate(fd, size)
    shared = 0x01
    addr = None
    if mappers >= 1:
        addr = libc.mmap(None, size, PROT_RW, shared, fd, 0)
        _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "populate")
    child = None
    if mappers >= 2:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            caddr = libc.mmap(None, size, PROT_RW, shared, fd, 0)
            libc.madvise(caddr, size, MADV_POPULATE_WRITE)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            os._exit(0)
        os.read(ready_r, 1)
    if mappers == 0:
        _check(libc.fallocate(fd, 0, 0, size), "fallocate")
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    t0 = time.perf_counter_ns()
    if per_page:
        for off in range(0, size, 4096):
            libc.fallocate(fd, mode, off, 4096)
    else:
        _check(libc.fallocate(fd, mode, 0, size), "punch")
    spent = time.perf_counter_ns() - t0
    if child is not None:
        os.write(go_w, b"g")
        os.waitpid(child, 0)
    if addr is not None:
        libc.munmap(addr, size)
    os.close(fd)
    return spent / pages
