"""Step deletion after hypothesis's shrink: a reproducer no step of which can be left out.

Hypothesis shrinks the choices that made a violation, not the steps: a swarm flag drawn
lazily moves when a step before it is deleted, so a shrunk run can keep steps that play no
part (a reboot, a load). :func:`minimise_steps` replays the steps on the explored machine
with one left out at a time, keeps every deletion after which the same invariant still
breaks, and repeats until no single deletion does: the result is 1-minimal.
"""

from __future__ import annotations

from typing import Any

from kvmpoison.explore.invariants import INVARIANTS
from kvmpoison.explore.monitor import InvariantMonitor
from kvmpoison.explore.statemachine import Recorded, state_machine
from kvmpoison.scenario.ops import OpError, RunCtx
from kvmpoison.scenario.runner import perform

Step = tuple[str, str, dict[str, Any]]  # actor, op, args

# Replays one minimisation may run: passes of one deletion per step, until one finds none
# (a hypothesis-shrunk run has a few dozen steps at most, so this bound is never reached).
MAX_REPLAYS = 2000

def first_violation(design: str, steps: list[Step], invariant: str) -> \
        tuple[list[Recorded], list[str]] | None:
    """Replay ``steps`` on the explored machine, checking ``invariant`` around each: the
    steps up to the first that breaks it (with the cells they gave) and its problems, or
    None if none does, or if the model refuses a step (it would not replay)."""
    m = state_machine(design, ()).base_machine().copy()
    ctx = RunCtx(m)
    monitor = InvariantMonitor((invariant,))
    done: list[Recorded] = []
    for actor, op, args in steps:
        if m.kernel.halted is not None:
            return None  # the explorer performs nothing after a panic
        monitor.before(ctx, actor, op, args)
        try:
            out = perform(ctx, actor, op, args)
        except (OpError, ValueError, MemoryError):
            return None
        except Exception:  # a model bug on a candidate: not this violation (the find stands)
            return None
        done.append((actor, op, args, out.cell))
        problems = [p for p in monitor.after(ctx, actor, op, args, out)
                    if p.startswith(invariant + ":")]
        if problems:
            return done, problems
    return None


def minimise_steps(design: str, steps: list[Recorded], invariant: str) -> \
        tuple[list[Recorded], list[str]] | None:
    """The steps with every step left out that the violation of ``invariant`` does not
    need, and the problems the last one reports; None if the steps do not break it on
    replay (a MODEL error, or an invariant this cannot check)."""
    if invariant not in INVARIANTS:
        return None
    found = first_violation(design, [s[:3] for s in steps], invariant)
    if found is None:
        return None
    replays = 1
    shrunk = True
    while shrunk and replays < MAX_REPLAYS:
        shrunk = False
        # From the last step back: a later step is more often one the end does not need,
        # and a deletion there leaves the indices of the steps still to try unchanged.
        i = len(found[0]) - 1
        while i >= 0 and replays < MAX_REPLAYS:
            candidate = [s[:3] for j, s in enumerate(found[0]) if j != i]
            replays += 1
            shorter = first_violation(design, candidate, invariant) if candidate else None
            if shorter is not None:
                # The steps before i are kept and broke nothing, so the new first violation
                # is at i or later: the indices still to try are the same steps.
                found, shrunk = shorter, True
            i -= 1
    return found
