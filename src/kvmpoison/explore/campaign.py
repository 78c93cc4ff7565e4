"""One exploration (a design, a seed, a step budget) and campaigns of many seeds on Dask."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky, HypothesisDeprecationWarning
from hypothesis.stateful import run_state_machine_as_test

from kvmpoison.explore.minimise import minimise_steps
from kvmpoison.explore.reproducer import replay, reproducer_toml
from kvmpoison.explore.statemachine import InvariantError, state_machine

STEPS_PER_EXAMPLE = 50


@dataclass
class SeedResult:
    design: str
    seed: int
    invariants: list[str]
    steps: int
    seconds: float
    violation: str | None = None  # the invariant's name
    problems: list[str] = field(default_factory=list)
    reproducer: str | None = None  # the scenario TOML
    replays: bool | None = None  # the reproducer fails the same way under `run`
    found_after: int | None = None  # steps run when the violation was first seen (no shrinking)
    cpu_seconds: float = 0.0  # this process's CPU time: the rate on a host shared with others
    refused: int = 0  # draws the model refused (no page behind the gpa yet): not in ``steps``
    shrunk_steps: int | None = None  # the violation's steps after hypothesis's shrink (if on)
    reproducer_steps: int | None = None  # ... and after step deletion (the reproducer's)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps_per_s"] = round(self.steps_per_s, 1)
        out["steps_per_cpu_s"] = round(self.steps / self.cpu_seconds, 1) if self.cpu_seconds \
            else 0.0
        return out


def explore_settings(steps: int, shrink: bool = True,
                     deadline_ms: int | None = None) -> settings:
    """Hypothesis's settings for about ``steps`` steps: examples of up to STEPS_PER_EXAMPLE
    steps, no database, one violation (the first)."""
    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max(1, math.ceil(steps / STEPS_PER_EXAMPLE)),
                    stateful_step_count=min(steps, STEPS_PER_EXAMPLE), deadline=deadline_ms,
                    database=None, phases=phases, verbosity=Verbosity.quiet,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    report_multiple_bugs=False)


def explore_seed(design: str, seed: int, steps: int, invariants: tuple[str, ...],
                 shrink: bool = True, deadline_ms: int | None = None) -> SeedResult:
    """Run about ``steps`` steps of ``design``'s state machine from ``seed``; shrink the first
    violation (hypothesis, then :func:`minimise_steps`) and check that its reproducer
    replays it. ``deadline_ms`` bounds one example
    (up to STEPS_PER_EXAMPLE steps); campaigns leave it off, tests set it."""
    cls = state_machine(design, invariants)
    cls.steps_run = 0
    cls.refused = 0
    cls.found_at = None
    conf = explore_settings(steps, shrink, deadline_ms)
    hypothesis_seed(seed)(cls)
    start, cpu = time.perf_counter(), time.process_time()
    found: InvariantError | None = None
    try:
        with warnings.catch_warnings():
            # In a Dask worker, distributed's own threads use the global random module while
            # hypothesis draws, and hypothesis takes that for the strategy's; ours never do.
            warnings.filterwarnings("ignore", "Do not use the `random` module",
                                    HypothesisDeprecationWarning)
            run_state_machine_as_test(cls, settings=conf)  # type: ignore[no-untyped-call]
    except InvariantError as exc:
        found = exc
    except Flaky as exc:  # should not happen: the machine is deterministic
        raise RuntimeError(f"{design} seed {seed}: a violation did not reproduce: {exc}") from exc
    res = SeedResult(design, seed, list(invariants), cls.steps_run,
                     time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
                     refused=cls.refused)
    if found is not None:
        name = f"x-{design}-{found.invariant.lower()}-seed{seed}"
        res.violation = found.invariant
        res.found_after = cls.found_at
        trace, res.problems = found.steps, found.problems
        shrunk_by = "hypothesis"
        if shrink:
            minimal = minimise_steps(design, trace, found.invariant)
            if minimal is not None:
                trace, res.problems = minimal
                shrunk_by = "hypothesis, then by step deletion"
        res.shrunk_steps = len(found.steps) if shrink else None
        res.reproducer_steps = len(trace)
        res.reproducer = reproducer_toml(design, name, res.problems, trace,
                                         f"kvmpoison explore --design {design} --seed {seed}",
                                         shrunk_by)
        try:
            got = replay(res.reproducer, design, name)
        except Exception as exc:  # a MODEL error replays as the same exception
            res.replays = found.invariant == "MODEL" and \
                f"{type(exc).__name__}: {exc}" in found.problems[0]
        else:
            res.replays = any(v.startswith(found.invariant + ":") for _, v in got)
    return res


def seeds_of(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def run_campaign(design: str, seeds: list[int], steps: int, invariants: tuple[str, ...],
                 workers: int, scheduler: str | None,
                 on_result: Callable[[SeedResult], None]) -> list[SeedResult]:
    """Every seed on Dask: a LocalCluster of ``workers`` processes, or ``scheduler``'s cluster.

    One worker and no scheduler runs in this process (no cluster to start).
    """
    results: list[SeedResult] = []
    if workers <= 1 and scheduler is None:
        for s in seeds:
            r = explore_seed(design, s, steps, invariants)
            on_result(r)
            results.append(r)
        return results
    for r in _dask(design, seeds, steps, invariants, workers, scheduler):
        on_result(r)
        results.append(r)
    return sorted(results, key=lambda r: r.seed)


def _dask(design: str, seeds: list[int], steps: int, invariants: tuple[str, ...],
          workers: int, scheduler: str | None) -> Iterator[SeedResult]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None if scheduler else LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with Client(scheduler or cluster, timeout="30s") as client:  # type: ignore[no-untyped-call]
            futures = [client.submit(explore_seed, design, s, steps, invariants, pure=False)
                       for s in seeds]
            for fut in as_completed(futures):  # type: ignore[no-untyped-call]
                yield fut.result()
    finally:
        if cluster is not None:
            cluster.close()
