"""Bulk mm operations on the model vs the real kernel (same run), and the model's memory cost.

    python3 benchmarks/bench_mm.py [--sizes 1,16] [--real-max-gib 16] [--memory-gib 64]

For each size: the model faults in (MADV_POPULATE_WRITE), mprotect(PROT_NONE)s and
munmaps an anonymous range of 4 KiB pages; the real kernel does the same on a mapping
of the same size (THP off). Reports ns/page and model/kernel ratios (target <= 2).
``--memory-gib`` maps and faults in that much (no data written) in a fresh process
and reports peak RSS per 4 KiB page (target <= 48 bytes).
Times are CPU time (process_time), like the kernel side in realkernel.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.madvise import MADV_POPULATE_WRITE
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_NORESERVE, MAP_PRIVATE
from kvmpoison.report.bench import model_anon_bulk

GIB = 1 << 30
PAGE = 4096
RW = 3


def model_machine(size: int) -> Process:
    # Room for the range, its page tables (1/512) and some slack.
    mem = size + size // 256 + (64 << 20)
    kernel = Kernel.boot(THIS_MACHINE, PlatformConfig(mem_bytes=mem, integrity=IntegrityMode.OFF))
    return Process.spawn(kernel, "bench")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(gib: int) -> None:
    """Runs in a fresh interpreter: fault in ``gib`` GiB, print peak RSS per page."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM: a forked child starts with its parent's peak
    base = _status_kib("VmRSS")
    size = gib * GIB
    p = model_machine(size)
    addr = p.mmap(0, size, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE).value
    assert addr is not None
    assert p.madvise(addr, size, MADV_POPULATE_WRITE).cell == "ret:0"
    assert p.mm.rss_anon == size // PAGE
    peak = _status_kib("VmHWM")
    print(json.dumps({"gib": gib, "peak_rss_kib": peak, "baseline_kib": base,
                      "bytes_per_page": (peak - base) * 1024 / (size // PAGE)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16", help="GiB sizes, comma-separated")
    ap.add_argument("--real-max-gib", type=int, default=16,
                    help="largest size the real kernel is asked to populate")
    ap.add_argument("--memory-gib", type=int, default=64, help="0 skips the memory run")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    from realkernel import anon_bulk

    anchors = {"fault-in": "1.2-1.6 us", "mprotect": "~60 ns", "munmap": "~250 ns"}
    results: dict[str, object] = {}
    print(f"{'size':>6} {'operation':10} {'model ns/pg':>12} {'kernel ns/pg':>13} {'ratio':>7}"
          "   (kernel anchor)")
    for gib in (int(x) for x in args.sizes.split(",")):
        size = gib * GIB
        model = model_anon_bulk(size)
        real_size = min(size, args.real_max_gib * GIB)
        real = anon_bulk(real_size)
        for op in ("fault-in", "mprotect", "munmap"):
            ratio = model[op] / real[op]
            print(f"{gib:>4}Gi {op:10} {model[op]:12.1f} {real[op]:13.1f} {ratio:7.2f}"
                  f"   ({anchors[op]}; kernel at {real_size // GIB} GiB)")
            results[f"{gib}GiB/{op}"] = {"model_ns_per_page": model[op],
                                         "kernel_ns_per_page": real[op], "ratio": ratio}
    if args.memory_gib:
        child = subprocess.run([sys.executable, __file__, "--memory-child", str(args.memory_gib)],
                               capture_output=True, text=True, check=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"memory: {mem['gib']} GiB faulted in, no data written: peak RSS "
              f"{mem['peak_rss_kib'] / 1024:.0f} MiB, {mem['bytes_per_page']:.1f} bytes per 4 KiB "
              "page (target <= 48)")
        results["memory"] = mem
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
