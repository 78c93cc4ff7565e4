"""The scenario runner's shortcuts give the trace the long way gives."""

import itertools

import pytest

from kvmpoison.machine import Machine
from kvmpoison.scenario import runner
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import load
from kvmpoison.scenario.ops import RunCtx

SCENARIOS = [load(p) for p in shipped().values()]


def _observe(m: Machine) -> None:
    return None  # an observer turns the page-state reuse off


@pytest.mark.parametrize("design", ["rfc-v2", "gmem"])
def test_page_state_reuse_gives_the_recomputed_trace(design: str) -> None:
    reused_any = 0
    for sc in SCENARIOS:
        fast = runner.trace_records(runner.run_scenario(sc, design))
        slow = runner.trace_records(runner.run_scenario(sc, design, observe=_observe))
        assert fast == slow, sc.name
        pages = [runner._page_of(RunCtx(runner.build_machine(sc, design)), s)
                 for s in sc.steps]
        reused_any += sum(a is not None and a == b for a, b in itertools.pairwise(pages))
    assert reused_any > 50  # the shortcut is taken (same page twice in a row)
