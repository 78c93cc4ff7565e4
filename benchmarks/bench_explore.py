"""The explorer's speed: steps per second of one worker, every invariant checked.

Runs each design's state machine for a fixed number of steps without shrinking
(:mod:`kvmpoison.explore.speed`: a step is one the model performed, and a violation ends
its example) and reports steps/s with all invariants on and with none (the cost of the
checks), per second of wall time and per second of this process's CPU time (the same on
an idle host; on one shared with other jobs the wall figure drops), and the cost of one
``Machine.copy()`` (every hypothesis example starts from one).

    python3 benchmarks/bench_explore.py [--steps 2000] [--seeds 3] [--designs gmem,rfc-v2]
"""

from __future__ import annotations

import argparse
import json
import time

from kvmpoison.designs import DESIGNS
from kvmpoison.explore.invariants import INVARIANTS
from kvmpoison.explore.speed import time_exploration
from kvmpoison.explore.statemachine import state_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for design in args.designs.split(","):
        row: dict[str, object] = {"design": design}
        for label, checked in (("all", tuple(INVARIANTS)), ("none", ())):
            t = time_exploration(design, checked, args.steps, args.seeds)
            row[f"steps_per_s_{label}"] = round(t.steps_per_s)
            row[f"steps_per_cpu_s_{label}"] = round(t.steps_per_cpu_s)
            if label == "all":
                row.update(steps=t.steps, refused=t.refused, violations=t.violations)
        base = state_machine(design, ()).base_machine()  # what every example copies
        start = time.process_time()
        for _ in range(20):
            base.copy()
        row["copy_ms"] = round((time.process_time() - start) / 20 * 1000, 2)
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
