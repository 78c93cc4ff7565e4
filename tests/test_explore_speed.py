"""The explorer's timing harness (``kvmpoison bench``'s explorer rows): what it counts."""

from __future__ import annotations

import pytest

from kvmpoison.explore.speed import time_exploration


@pytest.mark.timeout(60, method="thread")
def test_a_violation_ends_its_example_not_the_timing() -> None:
    """Baseline breaks I1 on the first guest load; the harness counts each violation once
    per example and times the steps of every example."""
    t = time_exploration("baseline", ("I1",), 300, 1)
    assert t.violations >= 2  # more than one example ran past the first violation
    assert t.steps >= 2 * t.violations  # an example's steps, not one per violation
    assert t.cpu_seconds > 0 and t.steps_per_cpu_s > 0
