"""What hypothesis's stateful machinery costs a step by itself: machines whose rules do nothing.

The explorer's state machine has 28 rules (five with preconditions), each with a gfn drawn
from four (a ``sampled_from`` mapped to a gpa). This times empty machines shaped like it,
with half the rules, with no preconditions, and with the gfn drawn as a plain integer, to
show which of these the per-step cost depends on (the explorer's settings: no database,
generation only, no deadline, 50 steps an example).

    python3 benchmarks/bench_hypothesis_floor.py [--examples 60] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

GFNS = (0x30, 0x31, 0x32, 0x10)


def _machine(nrules: int, npre: int, arg: str) -> type[RuleBasedStateMachine]:
    ns: dict[str, Any] = {"steps": 0}
    for i in range(nrules):
        strat: st.SearchStrategy[int] = (
            st.sampled_from(GFNS).map(lambda g: g << 12) if arg == "mapped" else
            st.integers(0, len(GFNS) - 1))

        def body(self: Any, gpa: int) -> None:
            type(self).steps += 1

        body.__name__ = f"r{i}"
        fn: Callable[..., None] = rule(gpa=strat)(body)
        if i < npre:
            fn = precondition(lambda self: True)(fn)
        ns[f"r{i}"] = fn
    return type("Empty", (RuleBasedStateMachine,), ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    conf = settings(max_examples=args.examples, stateful_step_count=50, deadline=None,
                    database=None, phases=[Phase.generate], verbosity=Verbosity.quiet,
                    suppress_health_check=list(HealthCheck))
    shapes = [(28, 5, "mapped"), (14, 5, "mapped"), (28, 0, "mapped"), (28, 5, "integer")]
    for _ in range(args.repeat):
        for nrules, npre, arg in shapes:
            cls = _machine(nrules, npre, arg)
            hypothesis_seed(1)(cls)
            cpu = time.process_time()
            run_state_machine_as_test(cls, settings=conf)  # type: ignore[no-untyped-call]
            cpu = time.process_time() - cpu
            steps = int(cls.__dict__["steps"])
            print(f"{nrules} rules, {npre} with preconditions, {arg} gfn: {steps} steps, "
                  f"{cpu / steps * 1e6:.0f} us of CPU a step", flush=True)


if __name__ == "__main__":
    main()
