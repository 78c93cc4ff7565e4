"""The real kernel doing bulk mm work on an anonymous mapping, through ctypes (for ratios)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

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
