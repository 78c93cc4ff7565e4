"""What the explorer finds in the RFC designs, one invariant at a time.

For each design and invariant, seeds run from 0 (``--steps`` steps each, shrinking on)
until one violates the invariant or ``--budget`` steps have run. A row gives the steps
run before the violation was first seen (earlier seeds' steps plus ``found_after``), the
length of the reproducer (and of hypothesis's shrunk run, before step deletion), and its
last problem. The pairs run on a Dask
LocalCluster of ``--workers`` processes. This is a campaign, not a test: it takes minutes.

    python3 benchmarks/explore_finds.py [--designs baseline,rfc-v1,rfc-v2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.invariants import INVARIANTS


def hunt(design: str, invariant: str, steps: int, budget: int) -> dict[str, Any]:
    """Seeds from 0 until ``invariant`` breaks or ``budget`` steps ran."""
    ran = cpu = 0.0
    seed = 0
    while ran < budget:
        r = explore_seed(design, seed, steps, (invariant,))
        cpu += r.cpu_seconds
        if r.violation is not None:
            assert r.found_after is not None and r.reproducer is not None
            return {"design": design, "invariant": invariant, "seed": seed,
                    "after": int(ran) + r.found_after, "cpu_seconds": round(cpu, 1),
                    "steps": r.reproducer.count("[[step]]"), "shrunk_steps": r.shrunk_steps,
                    "replays": r.replays,
                    "problem": r.problems[0], "reproducer": r.reproducer}
        ran += r.steps
        seed += 1
    return {"design": design, "invariant": invariant, "seed": None, "after": int(ran),
            "cpu_seconds": round(cpu, 1), "steps": None, "replays": None, "problem": None,
            "reproducer": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", default="baseline,rfc-v1,rfc-v2")
    ap.add_argument("--invariants", default=",".join(INVARIANTS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--budget", type=int, default=11000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("finds"))
    args = ap.parse_args()
    from dask.distributed import Client, LocalCluster, as_completed

    pairs = [(d, i) for d in args.designs.split(",") for i in args.invariants.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1,  # type: ignore[no-untyped-call]
                      processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # type: ignore[no-untyped-call]
        futures = [client.submit(hunt, d, i, args.steps, args.budget, pure=False)
                   for d, i in pairs]
        for fut in as_completed(futures):  # type: ignore[no-untyped-call]
            row = fut.result()
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "reproducer"}
            print(json.dumps(shown), flush=True)
            if row["reproducer"] is not None:
                name = f"x-{row['design']}-{row['invariant'].lower()}-seed{row['seed']}.toml"
                (args.out / name).write_text(row["reproducer"])
    rows.sort(key=lambda r: (r["design"], int(r["invariant"][1:])))
    (args.out / "finds.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
