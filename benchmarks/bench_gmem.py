"""Design gmem: the cost of bulk conversions and of guest faults from guest_memfd.

Boots one gmem VM with RAM of the given size and times:
  * KVM_SET_MEMORY_ATTRIBUTES over all of RAM, private -> shared -> private
    (a range update of the attribute store plus a vectorised EPT zap);
  * the guest's first touch of N private pages (one EPT fault each, served by
    kvm_gmem_get_pfn), then a PUNCH_HOLE of them (zap, reclaim, truncate);
  * QEMU-style conversion of one page through KVM_HC_MAP_GPA_RANGE.

    python3 benchmarks/bench_gmem.py [--ram-mib 256] [--pages 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.virt.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE

PAGE = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ram = args.ram_mib << 20
    platform = PlatformConfig(mem_bytes=ram * 2 + (64 << 20), integrity=IntegrityMode.CI)
    m = Machine(Config(design="gmem", platform=platform, vm_mem=ram))
    vm, vmm, guest = m.vm, m.vmm, m.guest
    out: dict[str, float] = {}

    t = time.perf_counter()
    assert vmm.set_memory_attributes(vm, 0, ram, 0).succeeded
    assert vmm.set_memory_attributes(vm, 0, ram, KVM_MEMORY_ATTRIBUTE_PRIVATE).succeeded
    out["set_attributes_whole_ram_x2_ms"] = (time.perf_counter() - t) * 1e3

    base = 0x100 * PAGE
    n = min(args.pages, (ram - base) // PAGE)
    t = time.perf_counter()
    for i in range(n):
        guest.store(base + i * PAGE, b"x")
    out["private_fault_us_per_page"] = (time.perf_counter() - t) / n * 1e6

    t = time.perf_counter()
    got = vmm.proc.fallocate(vmm.gmem_fd or 0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             base, n * PAGE)
    assert got.succeeded, got
    out["punch_hole_us_per_page"] = (time.perf_counter() - t) / n * 1e6

    t = time.perf_counter()
    for i in range(64):
        guest.share(0x100 + i, 1)
    out["map_gpa_range_one_page_us"] = (time.perf_counter() - t) / 64 * 1e6
    out["pages"] = n
    out["ram_mib"] = args.ram_mib

    for k, v in out.items():
        print(f"{k:36} {v:12.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
