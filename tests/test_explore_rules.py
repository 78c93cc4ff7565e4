"""The explorer's rules: what hypothesis draws first, what counts as a step, when an
example ends, and which gpas the host's and the hardware's frame steps pick."""

from __future__ import annotations

import pytest
from hypothesis.stateful import RuleBasedStateMachine

from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.statemachine import GPAS, VM, ExploreMachine, state_machine

GPA = GPAS[0]


def _hypothesis_order(cls: type[RuleBasedStateMachine]) -> list[str]:
    """The order hypothesis's rule strategy sorts the rules in: bundles written, number of
    arguments, name (hypothesis.stateful.RuleStrategy._setup_for)."""
    rules = cls.setup_state().rules  # type: ignore[no-untyped-call]
    rules = sorted(rules, key=lambda r: (sorted(r.targets), len(r.arguments),
                                         r.function.__name__))
    return [r.function.__name__ for r in rules]


def test_the_rule_hypothesis_favours_is_the_guests_load() -> None:
    """Hypothesis's choices favour the first rule; a reboot there undid most examples."""
    order = _hypothesis_order(state_machine("rfc-v2", ()))
    assert order[0] == "guest_load"
    assert len(order) == 28


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("design", ["rfc-v2", "hardened"])
def test_the_favoured_step_is_a_load_not_a_reboot(design: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ops: list[str] = []
    orig = ExploreMachine.step

    def step(self: ExploreMachine, actor: str, op: str, **args: object) -> None:
        ops.append(op)
        orig(self, actor, op, **args)

    monkeypatch.setattr(ExploreMachine, "step", step)
    for seed in range(2):
        explore_seed(design, seed, 600, (), shrink=False, deadline_ms=5000)
    assert max(set(ops), key=ops.count) == "load"
    assert ops.count("reboot") / len(ops) < 0.1


def test_a_refused_draw_is_no_step() -> None:
    cls = state_machine("rfc-v2", ())
    cls.steps_run = cls.refused = 0
    sm = cls()
    sm.vmm_dma_read(GPA)  # nothing pinned: the model refuses it
    assert (cls.steps_run, cls.refused, sm.trace) == (0, 1, [])
    sm.guest_load(GPA)
    assert (cls.steps_run, cls.refused, len(sm.trace)) == (1, 1, 1)


@pytest.mark.timeout(60, method="thread")
def test_results_count_steps_and_refusals_apart() -> None:
    res = explore_seed("hardened", 0, 300, (), shrink=False, deadline_ms=5000)
    assert res.steps >= 250 and res.refused >= 0
    assert res.as_json()["refused"] == res.refused


def test_frame_steps_pick_among_the_gpas_a_frame_backs() -> None:
    sm = state_machine("rfc-v2", ())()
    before = sm.backed()
    assert GPA not in before  # the explored gfns start untouched (the swiotlb page is)
    sm.guest_load(GPA)
    assert GPA in sm.backed()
    sm.hw_tamper(sm.backed().index(GPA))
    assert sm.trace[-1][1:3] == ("tamper", {"vm": VM, "gpa": GPA})


def test_preconditions_follow_the_vms() -> None:
    sm = state_machine("hardened", ())()
    assert sm.usable(VM) and not sm.usable("vm1")
    sm.host_second_vm("vm1")
    # hardened refuses a second VM's memslot on bound RAM: its guest has nothing to run on
    assert "vm1" in sm.m.instances and not sm.usable("vm1")
    sm.vmm_exit(0)
    assert not sm.usable(VM)
    assert not any(sm.usable(name) for name in sm.m.instances)
