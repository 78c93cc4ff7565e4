"""The real kernel doing the bulk mm work the model's benchmarks compare against.

Each function times one kind of work on this machine's kernel through ctypes and
returns nanoseconds of CPU time (user + system of this process) per 4 KiB page
(per 2 MiB for the THP timings).
Nothing here faults: every range is mapped and populated before it is touched,
and the forked mapper only maps and waits.
"""

from __future__ import annotations

import ctypes
import os
import time

from kvmpoison.backends.kvm import thp
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
from kvmpoison.matrix.protocol import HPAGE_PMD_SIZE

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


def thp_bulk(size: int, rounds: int) -> dict[str, float]:
    """ns per 2 MiB on a private anonymous THP region of ``size`` bytes (a multiple of 2 MiB).

    The region is 2 MiB-aligned (over-allocated, then trimmed), MADV_HUGEPAGE, populated
    with MADV_POPULATE_WRITE, and checked PMD-mapped (smaps AnonHugePages = its size;
    :class:`~kvmpoison.backends.kvm.thp.ThpNotMapped` where the kernel gave no huge pages:
    THP off here, or memory too fragmented). ``mprotect``: the mean of ``rounds`` toggles
    PROT_NONE / PROT_READ|PROT_WRITE over the whole region (change_huge_pmd per PMD, no
    split); ``munmap``: one munmap of it (zap_huge_pmd and the free of each THP).
    """
    hpage = HPAGE_PMD_SIZE
    if size <= 0 or size % hpage:
        raise ValueError(f"the THP region must be a positive multiple of 2 MiB, not {size}")
    units = size // hpage
    base = mmap(None, size + hpage, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    addr = (base + hpage - 1) & ~(hpage - 1)
    if addr > base:
        _check(libc.munmap(base, addr - base), "munmap head")
    if base + hpage > addr:
        _check(libc.munmap(addr + size, base + hpage - addr), "munmap tail")
    try:
        _check(libc.madvise(addr, size, thp.MADV_HUGEPAGE), "madvise(HUGEPAGE)")
        _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "madvise(POPULATE_WRITE)")
        huge = thp.smaps_region("self", addr, addr + size)["AnonHugePages"]
        if huge != size >> 10:
            raise thp.ThpNotMapped(f"only {huge} of {size >> 10} kB are PMD-mapped after "
                                   f"MADV_HUGEPAGE and populate; {thp.sysfs_modes('anon_thp')}")
        t0 = time.process_time_ns()
        for i in range(rounds):
            _check(libc.mprotect(addr, size, PROT_NONE if i % 2 == 0 else PROT_RW), "mprotect")
        out = {"mprotect": (time.process_time_ns() - t0) / (rounds * units)}
        if thp.smaps_region("self", addr, addr + size)["AnonHugePages"] != size >> 10:
            raise thp.ThpNotMapped("mprotect of whole PMDs split them: the timing is not of THPs")
    except BaseException:
        libc.munmap(addr, size)
        raise
    t0 = time.process_time_ns()
    _check(libc.munmap(addr, size), "munmap")
    out["munmap"] = (time.process_time_ns() - t0) / units
    return out
