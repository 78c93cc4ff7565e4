"""mprotect and munmap per 2 MiB of anonymous THP: the kernel against the model, same run.

    python3 benchmarks/bench_thp.py [--sizes-mib 64,256,1024] [--rounds 200]

The kernel side (``timing.thp_bulk``) checks that its region is PMD-mapped before it
times anything; the model side (``report.bench.model_thp_bulk``) reports its own
AnonHugePages (``model_pmd_mapped``). The anchor for the kernel's mprotect is about
100-200 ns per 2 MiB. Prints one JSON line per size; docs/bench.md has the figures.
"""

from __future__ import annotations

import argparse
import json

from kvmpoison.report.bench import model_thp_bulk
from realkernel import thp_bulk

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="64,256,1024")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--model-rounds", type=int, default=40)
    args = ap.parse_args()
    for mib in (int(x) for x in args.sizes_mib.split(",")):
        kern = thp_bulk(mib * MIB, args.rounds)
        model, huge = model_thp_bulk(mib * MIB, args.model_rounds)
        print(json.dumps({
            "mib": mib, "kernel_ns_per_2mib": kern, "model_ns_per_2mib": model,
            "model_anon_huge_kb": huge, "model_pmd_mapped": huge == mib * 1024,
            "ratio": {k: model[k] / kern[k] for k in kern}}))


if __name__ == "__main__":
    main()
