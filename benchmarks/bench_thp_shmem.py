"""shmem/memfd THP per 2 MiB in the model: fault-in, punching one 4 KiB page (a split),
munmap and truncate.

    python3 benchmarks/bench_thp_shmem.py [--mib 64,512] [--json out.json]

The model runs 6.18 with shmem_enabled=advise (a model setting: the host's sysfs is
never touched). A memfd of the size is mapped at a 2 MiB-aligned address and
MADV_HUGEPAGE'd, faulted in with MADV_POPULATE_WRITE (one shmem THP per 2 MiB, a PMD
each), then one page of each THP is punched (each THP splits into 512 cached pages),
and the range is unmapped and the file truncated to 0. There is no kernel column:
this machine's shmem_enabled is never, so its kernel would give 4 KiB pages.
Times are CPU time (process_time), ns per 2 MiB.
"""

from __future__ import annotations

import argparse
import json
import time

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.huge_memory import ThpSettings
from kvmpoison.mm.madvise import MADV_HUGEPAGE, MADV_POPULATE_WRITE
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED
from kvmpoison.mm.shmem_huge import meminfo_shmem_thp

HPAGE = 2 << 20
PAGE = 4096
MIB = 1 << 20
RW = 0x3
OPS = ("fault-in", "punch-split", "munmap", "truncate")


def model_shmem_thp(size: int) -> dict[str, float]:
    """ns per 2 MiB for each step of :data:`OPS`."""
    mem = size + size // 256 + (64 << 20)
    kernel = Kernel.boot(THIS_MACHINE, PlatformConfig(mem_bytes=mem,
                                                      integrity=IntegrityMode.OFF))
    kernel.core.thp = ThpSettings(shmem_enabled="advise")
    p = Process.spawn(kernel, "bench")
    base = p.mmap(0, size + HPAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS).value
    fd = p.memfd_create("bench").value
    assert base is not None and fd is not None
    addr = (base + HPAGE - 1) & ~(HPAGE - 1)
    assert p.ftruncate(fd, size).succeeded
    assert p.mmap(addr, size, RW, MAP_SHARED | MAP_FIXED, fd).succeeded
    assert p.madvise(addr, size, MADV_HUGEPAGE).succeeded
    n = size // HPAGE
    out = {}
    t0 = time.process_time_ns()
    assert p.madvise(addr, size, MADV_POPULATE_WRITE).succeeded
    out["fault-in"] = (time.process_time_ns() - t0) / n
    assert meminfo_shmem_thp(kernel.core)["ShmemPmdMapped"] == size >> 10
    t0 = time.process_time_ns()
    for i in range(n):  # one punch per THP: the operation measured is per 2 MiB
        assert p.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                           i * HPAGE + 7 * PAGE, PAGE).succeeded
    out["punch-split"] = (time.process_time_ns() - t0) / n
    assert meminfo_shmem_thp(kernel.core)["ShmemHugePages"] == 0
    t0 = time.process_time_ns()
    assert p.munmap(addr, size).succeeded
    out["munmap"] = (time.process_time_ns() - t0) / n
    t0 = time.process_time_ns()
    assert p.ftruncate(fd, 0).succeeded
    out["truncate"] = (time.process_time_ns() - t0) / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", default="64,512", help="sizes in MiB, comma-separated")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.mib.split(",")]
    except ValueError:
        parser.error(f"--mib {args.mib!r}: give sizes in MiB, e.g. 64,512")
    if any(s < 2 or s % 2 for s in sizes):
        parser.error("--mib: each size must be a positive multiple of 2")
    rows = {}
    for mib in sizes:
        rows[mib] = model_shmem_thp(mib * MIB)
        cells = "  ".join(f"{op} {rows[mib][op] / 1000:8.1f} us" for op in OPS)
        print(f"{mib:5d} MiB  per 2 MiB:  {cells}")
    if args.json:
        with open(args.json, "w", encoding="ascii") as f:
            json.dump({str(k): v for k, v in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
