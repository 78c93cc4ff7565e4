"""THP bulk operations per 2 MiB: the model vs this machine's kernel (same run).

    python3 benchmarks/bench_thp.py [--mib 512,4096] [--json out.json]

For each size both sides map an anonymous range, MADV_HUGEPAGE it, fault it in with
MADV_POPULATE_WRITE (one THP per 2 MiB), then mprotect(PROT_NONE) and munmap it.
Reports ns per 2 MiB and model/kernel ratios. The kernel side checks that the range
really was PMD-mapped (AnonHugePages in /proc/self/smaps_rollup grew by its size)
and reports the case as not THP-backed otherwise (THP enabled=never, or no free
huge pages); it never changes a sysfs setting. Times are CPU time (process_time).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    libc,
    mmap,
)
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.huge_memory import thp_pmd_mapping
from kvmpoison.mm.madvise import MADV_HUGEPAGE, MADV_POPULATE_WRITE
from kvmpoison.mm.mmap import MAP_NORESERVE

HPAGE = 2 << 20
MIB = 1 << 20
OPS = ("fault-in", "mprotect", "munmap")


def model_thp(size: int) -> dict[str, float]:
    """ns per 2 MiB on the model (6.18, THP madvise mode, MADV_HUGEPAGE)."""
    mem = size + size // 256 + (64 << 20)
    kernel = Kernel.boot(THIS_MACHINE, PlatformConfig(mem_bytes=mem,
                                                      integrity=IntegrityMode.OFF))
    p = Process.spawn(kernel, "bench")
    base = p.mmap(0, size + HPAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE).value
    assert base is not None
    addr = (base + HPAGE - 1) & ~(HPAGE - 1)
    assert p.madvise(addr, size, MADV_HUGEPAGE).cell == "ret:0"
    n = size // HPAGE
    out = {}
    t0 = time.process_time_ns()
    assert p.madvise(addr, size, MADV_POPULATE_WRITE).cell == "ret:0"
    out["fault-in"] = (time.process_time_ns() - t0) / n
    assert p.mm.pgd.nr_pmd_leaves == n and thp_pmd_mapping(p.mm, addr) is not None
    t0 = time.process_time_ns()
    assert p.mprotect(addr, size, PROT_NONE).cell == "ret:0"
    out["mprotect"] = (time.process_time_ns() - t0) / n
    t0 = time.process_time_ns()
    assert p.munmap(addr, size).cell == "ret:0"
    out["munmap"] = (time.process_time_ns() - t0) / n
    return out


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise OSError(ctypes.get_errno(), what)


def kernel_thp(size: int) -> dict[str, float] | None:
    """ns per 2 MiB on this machine's kernel; None when the range did not get THPs."""
    base = mmap(None, size + HPAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    addr = (base + HPAGE - 1) & ~(HPAGE - 1)
    n = size // HPAGE
    try:
        _check(libc.madvise(addr, size, MADV_HUGEPAGE), "madvise(HUGEPAGE)")
        before = _anon_huge_kib()
        t0 = time.process_time_ns()
        _check(libc.madvise(addr, size, MADV_POPULATE_WRITE), "madvise(POPULATE_WRITE)")
        fault = (time.process_time_ns() - t0) / n
        if _anon_huge_kib() - before < size // 1024:
            return None
        t0 = time.process_time_ns()
        _check(libc.mprotect(addr, size, PROT_NONE), "mprotect")
        prot = (time.process_time_ns() - t0) / n
        t0 = time.process_time_ns()
        _check(libc.munmap(addr, size), "munmap")
        unmap = (time.process_time_ns() - t0) / n
        return {"fault-in": fault, "mprotect": prot, "munmap": unmap}
    finally:
        libc.munmap(base, size + HPAGE)  # whatever is left (a no-op after the timed munmap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="512,4096", help="sizes in MiB, comma-separated")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    results: dict[str, object] = {}
    print(f"{'size':>8} {'operation':10} {'model ns/2M':>12} {'kernel ns/2M':>13} {'ratio':>7}")
    for mib in (int(x) for x in args.mib.split(",")):
        size = mib * MIB
        model = model_thp(size)
        real = kernel_thp(size)
        for op in OPS:
            if real is None:
                print(f"{mib:>6}Mi {op:10} {model[op]:12.0f} {'(no THP)':>13}")
                results[f"{mib}MiB/{op}"] = {"model_ns_per_2mib": model[op], "kernel": None}
                continue
            ratio = model[op] / real[op]
            print(f"{mib:>6}Mi {op:10} {model[op]:12.0f} {real[op]:13.0f} {ratio:7.2f}")
            results[f"{mib}MiB/{op}"] = {"model_ns_per_2mib": model[op],
                                         "kernel_ns_per_2mib": real[op], "ratio": ratio}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
