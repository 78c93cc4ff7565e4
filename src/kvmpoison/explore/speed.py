"""The explorer's speed: steps per second of one worker, with the invariants checked.

A design's state machine runs without shrinking; a step is one the model performed (a
refused draw is counted apart). A violation ends its example, as in the explorer, and
the next example starts: a design that breaks an invariant at once (baseline's I1 on the
first guest load) is timed over as many steps as the others, and no step after a
violation re-reports it. ``kvmpoison bench`` and ``benchmarks/bench_explore.py`` use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from hypothesis import reject
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test

from kvmpoison.explore.campaign import explore_settings
from kvmpoison.explore.statemachine import ExploreMachine, InvariantError, state_machine


class Counting(ExploreMachine):
    violations: ClassVar[int] = 0


def timed_machine(design: str, checked: tuple[str, ...]) -> type[Counting]:
    """``design``'s state machine, ending an example at a violation instead of the run."""
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


@dataclass
class Timing:
    steps: int = 0
    refused: int = 0
    violations: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def add(self, other: Timing) -> None:
        self.steps += other.steps
        self.refused += other.refused
        self.violations += other.violations
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds

    @property
    def steps_per_cpu_s(self) -> float:
        return self.steps / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def time_exploration(design: str, checked: tuple[str, ...], steps: int, seeds: int) -> Timing:
    """Seeds 0..seeds-1 of about ``steps`` steps each, without shrinking."""
    total = Timing()
    for seed in range(seeds):
        cls = timed_machine(design, checked)
        cls.steps_run = cls.refused = cls.violations = 0
        hypothesis_seed(seed)(cls)
        start, cpu = time.perf_counter(), time.process_time()
        run_state_machine_as_test(  # type: ignore[no-untyped-call]
            cls, settings=explore_settings(steps, shrink=False))
        total.add(Timing(cls.steps_run, cls.refused, cls.violations,
                         time.perf_counter() - start, time.process_time() - cpu))
    return total
