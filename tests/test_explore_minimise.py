"""Step deletion after hypothesis's shrink: reproducers no step of which can be left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpoison.explore import campaign
from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.minimise import Step, first_violation, minimise_steps
from kvmpoison.explore.statemachine import Recorded
from kvmpoison.scenario.loader import load_text

FOUND = Path(__file__).resolve().parents[1] / "src" / "kvmpoison" / "explore" / "found"
LOAD: Step = ("guest:vm0", "load", {"gpa": 0x30000, "size": 8})
WRITEV: Step = ("host", "process_vm_writev", {"target": "vm0", "gpa": 0x30000})


def shipped() -> list[Path]:
    return sorted(FOUND.glob("*.toml"))


def steps_of(path: Path) -> tuple[str, str, list[Step]]:
    sc = load_text(path.read_text(), str(path))
    steps: list[Step] = [(s.actor, s.op, dict(s.args)) for s in sc.steps]
    return sc.designs[0], sc.invariants[0], steps


def recorded(steps: list[Step]) -> list[Recorded]:
    return [(actor, op, args, "") for actor, op, args in steps]


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_every_shipped_reproducer_is_one_minimal(path: Path) -> None:
    design, invariant, steps = steps_of(path)
    whole = first_violation(design, steps, invariant)
    assert whole is not None and len(whole[0]) == len(steps), "it must break at its last step"
    for i in range(len(steps)):
        without = steps[:i] + steps[i + 1:]
        assert first_violation(design, without, invariant) is None, \
            f"{path.stem} still breaks {invariant} without step {i} ({steps[i][1]})"


def test_minimise_drops_the_steps_a_violation_does_not_need() -> None:
    # What hypothesis shipped for rfc-v1's E1 (I2): three loads where one makes the page
    # private, then the write v1's GUP lets through.
    steps, problems = minimise_steps("rfc-v1", recorded([LOAD, LOAD, LOAD, WRITEV]), "I2") \
        or ([], [])
    assert [(a, op) for a, op, _, _ in steps] == [("guest:vm0", "load"),
                                                  ("host", "process_vm_writev")]
    assert [cell for *_, cell in steps] == ["ok", "ret:8"]  # the cells the replay gave
    assert problems and problems[0].startswith("I2: ")


def test_minimise_cuts_the_steps_after_the_first_violation() -> None:
    got = minimise_steps("rfc-v1", recorded([LOAD, WRITEV, LOAD, WRITEV]), "I2")
    assert got is not None and [op for _, op, _, _ in got[0]] == ["load", "process_vm_writev"]


def test_steps_that_break_nothing_give_none() -> None:
    assert minimise_steps("rfc-v1", recorded([LOAD, LOAD]), "I2") is None
    assert minimise_steps("rfc-v2", recorded([LOAD, WRITEV]), "I2") is None  # v2 refuses it
    assert minimise_steps("rfc-v1", recorded([LOAD, WRITEV]), "MODEL") is None


def test_a_step_the_model_refuses_is_no_replay() -> None:
    dma: Step = ("vmm:vm0", "dma_write", {"gpa": 0x30000, "data": "hex:01"})  # nothing pinned
    assert first_violation("rfc-v1", [LOAD, dma, WRITEV], "I2") is None


def test_the_explorer_writes_the_minimised_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """explore_seed hands hypothesis's steps to minimise_steps and writes what it returns.
    The spy pads them with a load the violation does not need, which deletion must drop."""
    seen: list[list[Recorded]] = []

    def padded(design: str, steps: list[Recorded], invariant: str
               ) -> tuple[list[Recorded], list[str]] | None:
        seen.append(steps)
        return minimise_steps(design, [(*LOAD, ""), *steps], invariant)

    monkeypatch.setattr(campaign, "minimise_steps", padded)
    res = explore_seed("rfc-v1", 2, 400, ("I4",), deadline_ms=60_000)
    assert res.violation == "I4" and res.replays and res.reproducer is not None
    assert len(seen) == 1 and len(seen[0]) == res.shrunk_steps
    assert "then by step deletion" in res.reproducer
    sc = load_text(res.reproducer, "<reproducer>")
    steps: list[Step] = [(s.actor, s.op, dict(s.args)) for s in sc.steps]
    assert steps == [s[:3] for s in seen[0]]  # the padding went, nothing else did
    assert len(steps) == res.reproducer_steps
    for i in range(len(steps)):
        assert first_violation("rfc-v1", steps[:i] + steps[i + 1:], "I4") is None
