"""MAC throughput over 1 GiB of 64-byte lines, next to plain hashlib SHA3-256 (same run).

Reports lines/s and ns/line for:
  * hashlib.sha3_256(line).digest() per line          (the baseline)
  * the model's faithful MAC, HMAC-SHA3-256 over ct||tweak||td, truncated to mac_bits
  * the model's mix64 stand-in (vectorised; not cryptographic)
and the machine's memory-copy bandwidth as the ceiling. An HMAC hashes twice per line
(inner and outer), so the target (issue 11) is the faithful MAC <= 1.2x two hashlib calls
per line; ``kvmpoison bench`` measures exactly that row.

    python3 benchmarks/bench_mac.py [--gib 1.0] [--mac-bits 28] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mac import LineMac, MacAlgo
from kvmpoison.arch.x86.mktme import LINE_SIZE, TWEAK_SIZE
from kvmpoison.report.progress import progress

U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

CHUNK_LINES = 1 << 16  # 4 MiB of lines per chunk


def chunks(total_lines: int, seed: int = 1) -> Iterator[tuple[U8, U8, Bools]]:
    rng = np.random.default_rng(seed)
    done = 0
    while done < total_lines:
        n = min(CHUNK_LINES, total_lines - done)
        ct = rng.integers(0, 256, size=(n, LINE_SIZE), dtype=np.uint8)
        tweak = rng.integers(0, 256, size=(n, TWEAK_SIZE), dtype=np.uint8)
        yield ct, tweak, np.ones(n, dtype=bool)
        done += n


def timed(fn: Callable[[U8, U8, Bools], object], total_lines: int,
          tick: Callable[[], None] | None = None) -> float:
    """Seconds spent in fn(chunk) over all chunks (data generation and the bar excluded)."""
    spent = 0.0
    for ct, tweak, td in chunks(total_lines):
        t0 = time.perf_counter()
        fn(ct, tweak, td)
        spent += time.perf_counter() - t0
        if tick is not None:
            tick()
    return spent


def hashlib_baseline(ct: U8, tweak: U8, td: Bools) -> None:
    view = memoryview(ct.tobytes())
    sha3 = hashlib.sha3_256
    for i in range(0, len(view), LINE_SIZE):
        sha3(view[i : i + LINE_SIZE]).digest()


def copy_bandwidth(nbytes: int = 256 << 20, runs: int = 5) -> float:
    src = np.full(nbytes, 0x5A, dtype=np.uint8)
    dst = np.empty_like(src)
    best = min(_time_copy(src, dst) for _ in range(runs))
    return nbytes / best


def _time_copy(src: U8, dst: U8) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="amount of line data (GiB)")
    ap.add_argument("--mac-bits", type=int, default=28)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    total = int(args.gib * (1 << 30)) // LINE_SIZE
    key = bytes(range(16))
    faithful = LineMac(key, args.mac_bits, MacAlgo.HMAC_SHA3_256)
    stand_in = LineMac(key, min(args.mac_bits, 64), MacAlgo.MIX64)

    # A bar on stderr (only on a terminal): three passes over the data.
    nchunks = -(-total // CHUNK_LINES)
    with progress(3 * nchunks, "MAC lines") as tick:
        rows = {
            "hashlib sha3_256 per line": timed(hashlib_baseline, total, tick),
            f"HMAC-SHA3-256/{args.mac_bits} (faithful, default)":
                timed(faithful.compute, total, tick),
            f"mix64/{min(args.mac_bits, 64)} (stand-in)": timed(stand_in.compute, total, tick),
        }
    bw = copy_bandwidth()
    base = rows["hashlib sha3_256 per line"]
    print(f"{total:,} lines ({args.gib:g} GiB), mac_bits={args.mac_bits}")
    print(f"{'what':44s} {'lines/s':>14s} {'ns/line':>9s} {'x hashlib':>9s}")
    figures = {}
    for name, secs in rows.items():
        figures[name] = {"lines_per_s": total / secs, "ns_per_line": secs / total * 1e9,
                         "ratio_to_hashlib": secs / base}
        print(f"{name:44s} {total / secs:14,.0f} {secs / total * 1e9:9.1f} {secs / base:9.2f}")
    ceiling = bw / LINE_SIZE
    print(f"{'memory copy ceiling (np.copyto)':44s} {ceiling:14,.0f} {1e9 / ceiling:9.2f}"
          f"   ({bw / 1e9:.1f} GB/s)")
    figures["copy_ceiling"] = {"lines_per_s": ceiling, "bytes_per_s": bw}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
