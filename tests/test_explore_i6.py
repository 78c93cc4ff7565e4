"""I6 counts the poison the kernel has seen: memory_failure reported on the frame while the
DRAM error was there. PG_hwpoison alone is not seeing it: the RFC designs set it to
protect a page, and a latent error nobody consumed reaches no kernel code."""

from __future__ import annotations

import pytest

from explore_helpers import explore_ctx as _ctx
from explore_helpers import monitored_step as _step
from kvmpoison.explore import InvariantMonitor

GPA = 0x30000


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_a_latent_error_under_protection_is_not_seen(design: str) -> None:
    """The guest's load protects the page (PG_hwpoison); a DRAM error nobody consumes; the
    share clears the protection's PG_hwpoison. The kernel never knew of the error."""
    ctx = _ctx(design)
    mon = InvariantMonitor(("I6",))
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8) == []
    assert _step(ctx, mon, "hw", "inject_dram_error", vm="vm0", gpa=GPA) == []
    assert _step(ctx, mon, "guest:vm0", "share", gpa=GPA) == []


def test_a_software_failure_before_the_error_is_not_seeing_it() -> None:
    """memory_failure ran on a healthy page (a software injection); the DRAM error came
    later and nobody consumed it: what the kernel saw was not this error."""
    ctx = _ctx("rfc-v1")
    mon = InvariantMonitor(("I6",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="x") == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=GPA) == []
    assert _step(ctx, mon, "hw", "inject_dram_error", vm="vm0", gpa=GPA) == []
    assert _step(ctx, mon, "guest:vm0", "share", gpa=GPA) == []


def test_e13_the_seen_error_cleared_by_the_share_is_found() -> None:
    """E13: memory_failure runs on the protected page with the error there ("already
    poisoned": it returns early); RFC v1's share then clears PG_hwpoison."""
    ctx = _ctx("rfc-v1")
    mon = InvariantMonitor(("I6",))
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8) == []
    assert _step(ctx, mon, "hw", "inject_dram_error", vm="vm0", gpa=GPA) == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=GPA) == []
    found = _step(ctx, mon, "guest:vm0", "share", gpa=GPA)
    assert len(found) == 1 and found[0].startswith("I6: PG_hwpoison of really poisoned pfn")
