"""Stateful exploration: hypothesis state machines over a Machine, invariants checked after
every step, shrunk violations written as replayable scenarios, campaigns on Dask."""

from kvmpoison.explore.invariants import INVARIANTS, Invariant, parse_invariants
from kvmpoison.explore.monitor import InvariantMonitor, scenario_monitor

__all__ = ["INVARIANTS", "Invariant", "InvariantMonitor", "parse_invariants",
           "scenario_monitor"]
