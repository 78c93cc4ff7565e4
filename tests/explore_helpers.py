"""Builders shared by the explorer's tests: a machine as the explorer starts it, and one
step with the invariant monitor around it."""

from __future__ import annotations

from kvmpoison.explore import InvariantMonitor
from kvmpoison.explore.statemachine import base_scenario
from kvmpoison.scenario.ops import RunCtx
from kvmpoison.scenario.runner import build_machine, perform


def explore_ctx(design: str) -> RunCtx:
    """A fresh machine of ``design``, as the explorer's base (guest booted)."""
    return RunCtx(build_machine(base_scenario(design), design))


def monitored_step(ctx: RunCtx, mon: InvariantMonitor, actor: str, op: str,
                   **args: object) -> list[str]:
    """One scenario step, checked by ``mon``: the problems it reports."""
    mon.before(ctx, actor, op, args)
    return mon.after(ctx, actor, op, args, perform(ctx, actor, op, args))
