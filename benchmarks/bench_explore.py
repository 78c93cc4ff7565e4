"""The explorer's speed: steps per second of one worker, every invariant checked.

Runs each design's state machine for a fixed number of steps without shrinking and
reports steps/s with all invariants on and with none (the cost of the checks), per second
of wall time and per second of this process's CPU time (the same on an idle host; on one
shared with other jobs the wall figure drops), and the cost of one ``Machine.copy()``
(every hypothesis example starts from one).

A step is one the model performed: draws it refused (no frame behind the gpa yet) are
counted apart and not in the rate. A violation does not end the run here: it is counted,
its example ends (as the explorer's would) and the next starts, so a design that breaks
an invariant at once (baseline's I1 on the first guest load) is timed over as many steps
as the others, and no step after a violation re-reports it.

    python3 benchmarks/bench_explore.py [--steps 2000] [--designs gmem,rfc-v2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, ClassVar

from hypothesis import reject
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test

from kvmpoison.designs import DESIGNS
from kvmpoison.explore.campaign import explore_settings
from kvmpoison.explore.invariants import INVARIANTS
from kvmpoison.explore.statemachine import ExploreMachine, InvariantError, state_machine


class Counting(ExploreMachine):
    violations: ClassVar[int] = 0


def timed_machine(design: str, checked: tuple[str, ...]) -> type[Counting]:
    """``design``'s state machine, counting violations instead of stopping at the first."""
    base = state_machine(design, checked)

    class Timed(base, Counting):  # type: ignore[valid-type,misc]

        def step(self, actor: str, op: str, **args: Any) -> None:
            try:
                super().step(actor, op, **args)
            except InvariantError:
                type(self).violations += 1
                reject()  # the example ends here; the next one starts afresh

    Timed.__name__ = f"Timed_{base.__name__}"
    return Timed


def run(design: str, checked: tuple[str, ...], steps: int, seed: int) -> dict[str, float]:
    cls = timed_machine(design, checked)
    cls.steps_run = cls.refused = cls.violations = 0
    hypothesis_seed(seed)(cls)
    start, cpu = time.perf_counter(), time.process_time()
    run_state_machine_as_test(cls, settings=explore_settings(steps, shrink=False))  # type: ignore[no-untyped-call]
    return {"steps": cls.steps_run, "refused": cls.refused, "violations": cls.violations,
            "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


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
            total = {"steps": 0.0, "refused": 0.0, "violations": 0.0, "seconds": 0.0,
                     "cpu": 0.0}
            for seed in range(args.seeds):
                for k, v in run(design, checked, args.steps, seed).items():
                    total[k] += v
            row[f"steps_per_s_{label}"] = round(total["steps"] / total["seconds"])
            row[f"steps_per_cpu_s_{label}"] = round(total["steps"] / total["cpu"])
            if label == "all":
                row["steps"] = int(total["steps"])
                row["refused"] = int(total["refused"])
                row["violations"] = int(total["violations"])
        plain = state_machine(design, ())
        plain()  # builds the base machine every example copies
        base = plain.base
        assert base is not None
        start = time.perf_counter()
        for _ in range(20):
            base.copy()
        row["copy_ms"] = round((time.perf_counter() - start) / 20 * 1000, 2)
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
