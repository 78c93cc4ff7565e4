"""The RFC's protection cost on the model vs the real kernel's rmap-walk unmap, same run.

    python3 benchmarks/bench_protect.py [--gib 1] [--per-page-mib 64]

Model: guest RAM is a memfd mapped (and populated) by the VMM, and for
"mappers=2" also by a second process; we protect it all with the vectorised
bulk path (``kvm_protect_range``) and page by page (``kvm_protect_pfn``, what the
RFC does on each first EPT fault). Kernel: fallocate(PUNCH_HOLE|KEEP_SIZE) over
a memfd of the same size, mapped and populated by the same number of processes,
in one call and one call per 4 KiB page. Targets (issue 4): bulk <= 2x, per-page
<= 5x at 1 GiB.
Times are CPU time (process_time), like the kernel side in realkernel.py.
"""

from __future__ import annotations

import argparse
import json
import time

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm.mmap import MAP_FIXED, MAP_POPULATE, MAP_SHARED
from kvmpoison.virt.kvm.mem_protected import kvm_protect_pfn, kvm_protect_range
from realkernel import memfd_punch

GIB = 1 << 30
PAGE = 4096


def model_setup(size: int, mappers: int) -> Machine:
    """An rfc-v2 machine whose guest RAM memfd is populated in ``mappers`` processes."""
    plat = PlatformConfig(mem_bytes=size + size // 128 + (128 << 20), integrity=IntegrityMode.OFF)
    m = Machine(Config(design="rfc-v2", vm_mem=size, platform=plat))
    vmm = m.vmm
    assert vmm.ram_fd is not None
    # Re-map guest RAM with MAP_POPULATE (v5.12 has no MADV_POPULATE_WRITE).
    vmm.proc.mmap(vmm.ram_hva, size, 3, MAP_SHARED | MAP_FIXED | MAP_POPULATE, vmm.ram_fd)
    if mappers >= 2:
        other = m.process("vhost")
        fd = other.install(vmm.proc.task.fds[vmm.ram_fd])
        other.mmap(0, size, 3, MAP_SHARED | MAP_POPULATE, fd)
    return m


def model_bulk(size: int, mappers: int) -> float:
    m = model_setup(size, mappers)
    first = 0x40  # past the guest's shared kvmclock/swiotlb pages
    n = size // PAGE - first
    t0 = time.process_time_ns()
    done = kvm_protect_range(m.vm, first, n)
    spent = time.process_time_ns() - t0
    assert done == n, (done, n)
    return spent / n


def model_per_page(size: int, mappers: int) -> float:
    m = model_setup(size, mappers)
    vmm = m.vmm
    first = 0x40
    gfns = range(first, size // PAGE)
    pfns = [pte_pfn(vmm.proc.mm.pgd.get(vmm.gpa_to_hva(g << 12))) for g in gfns]
    t0 = time.process_time_ns()
    for gfn, pfn in zip(gfns, pfns, strict=True):
        kvm_protect_pfn(m.vm, gfn, pfn)
    spent = time.process_time_ns() - t0
    return spent / len(pfns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="bulk-path size")
    ap.add_argument("--per-page-mib", type=int, default=64, help="per-page-path size")
    ap.add_argument("--json")
    args = ap.parse_args()
    bulk_size = int(args.gib * GIB)
    pp_size = args.per_page_mib << 20
    rows = {}
    print(f"{'path':10} {'size':>8} {'mappers':>7} {'model ns/pg':>12} {'kernel ns/pg':>13} "
          f"{'ratio':>7}")
    for mappers in (1, 2):
        for name, size, model_fn, per_page in (
            ("bulk", bulk_size, model_bulk, False),
            ("per-page", pp_size, model_per_page, True),
        ):
            model = model_fn(size, mappers)
            kernel = memfd_punch(size, mappers, per_page)
            ratio = model / kernel
            rows[f"{name}/mappers={mappers}"] = {"size": size, "model_ns_per_page": model,
                                                 "kernel_ns_per_page": kernel, "ratio": ratio}
            print(f"{name:10} {size >> 20:>6}Mi {mappers:>7} {model:12.1f} {kernel:13.1f} "
                  f"{ratio:7.2f}")
    print("kernel anchors (perf_anchors.md): punch whole 0.7-0.8 us/page, per page 3-4 us/page")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
