"""``expect_violation``: a scenario step that breaks a named invariant on a design."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvmpoison.cli.main import main
from kvmpoison.explore import InvariantMonitor, scenario_monitor
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import Scenario, ScenarioError, load, load_text
from kvmpoison.scenario.runner import ScenarioRun, run_scenario, trace_records

HEAD = """
[scenario]
name = "t"
invariants = ["I4"]

[machine]
memory = 16777216

[[vm]]
name = "vm0"
memory = 1048576
"""
STORE = """
[[step]]
actor = "guest:vm0"
op = "store"
gpa = 0x30000
data = "private"
"""
READV = """
[[step]]
actor = "host"
op = "process_vm_readv"
target = "vm0"
gpa = 0x30000
"""


def run(sc: Scenario, design: str) -> ScenarioRun:
    return run_scenario(sc, design, monitor=InvariantMonitor(sc.invariants))


def test_an_expected_violation_passes_and_is_reported_apart() -> None:
    sc = load_text(HEAD + STORE + READV + 'expect_violation = { rfc-v1 = "I4" }\n', "t.toml")
    r = run(sc, "rfc-v1")  # E44: v1's read unpins 1024 from a bare get_page
    assert r.passed and not r.violations
    assert [i for i, _ in r.expected_violations] == [2]
    assert r.expected_violations[0][1].startswith("I4: pfn")
    assert r.results[1].violation_met is True


def test_without_the_expectation_the_same_violation_fails_the_run() -> None:
    r = run(load_text(HEAD + STORE + READV, "t.toml"), "rfc-v1")
    assert not r.passed and [i for i, _ in r.violations] == [2]


def test_an_expected_violation_that_does_not_happen_fails_the_run() -> None:
    sc = load_text(HEAD + STORE + READV + 'expect_violation = "I4"\n', "t.toml")
    r = run(sc, "rfc-v2")  # v2 refuses the read: the counts hold
    assert not r.passed and r.results[1].violation_met is False
    assert not r.violations and not r.expected_violations


def test_another_invariant_than_the_expected_one_still_fails() -> None:
    head = HEAD.replace('["I4"]', '["I4", "I7"]')
    sc = load_text(head + STORE + READV + 'expect_violation = { rfc-v1 = "I4" }\n', "t.toml")
    r = run(sc, "rfc-v1")  # E1 too: the read reaches the private page (I7)
    assert not r.passed
    assert [v.partition(":")[0] for _, v in r.violations] == ["I7"]
    assert [v.partition(":")[0] for _, v in r.expected_violations] == ["I4"]


@pytest.mark.parametrize(("body", "message"), [
    ('expect_violation = { rfc-v1 = "I7" }\n', "names no invariant of [scenario] invariants (I4)"),
    ('expect_violation = { rfc-v1 = "I7: pfn" }\n', "names no invariant of [scenario] invariants"),
    ('expect_violation = { nodesign = "I4" }\n', "names unknown design"),
    ("expect_violation = 4\n", "must be a string or a table of designs"),
    ("expect_violation = {}\n", "expect_violation names no design"),
    ('designs = "rfc-v2"\nexpect_violation = { rfc-v1 = "I4" }\n',
     "names rfc-v1, which the step does not run on (rfc-v2)"),
])
def test_a_bad_expect_violation_is_a_clear_error(body: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_text(HEAD + STORE + READV + body, "t.toml")


def test_a_problem_prefix_must_match_the_problem_the_step_reports() -> None:
    right = 'expect_violation = { rfc-v1 = "I4: pfn 0x17: refcount -1021" }\n'
    assert run(load_text(HEAD + STORE + READV + right, "t.toml"), "rfc-v1").passed
    wrong = 'expect_violation = { rfc-v1 = "I4: pfn 0x17: refcount -1020" }\n'
    r = run(load_text(HEAD + STORE + READV + wrong, "t.toml"), "rfc-v1")
    assert not r.passed and r.results[1].violation_met is False
    assert [i for i, _ in r.violations] == [2]  # reported, as no expectation names it


def test_e45s_reboot_is_checked_for_the_frame_it_adds_to_the_leak() -> None:
    """The I4 problem once the reboot leaks the swiotlb frame names both pfns; a step that
    leaks nothing more (ksmd in its place) does not meet the reboot's expectation."""
    text = shipped()["e45-kvm-gup-leaks-poisoned-page"].read_text()
    assert run(load_text(text, "e45.toml"), "rfc-v2").passed
    swapped = text.replace('actor = "guest:vm0"\nop = "reboot"', 'actor = "host"\nop = "ksmd"')
    assert swapped != text
    r = run(load_text(swapped, "e45.toml"), "rfc-v2")
    assert not r.passed and r.results[-1].violation_met is False


def test_the_cli_marks_a_step_whose_only_expectation_held(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.toml"
    path.write_text(HEAD + STORE + READV + 'expect_violation = "I4"\n')
    assert main(["run", str(path), "--design", "rfc-v2", "--format", "md"]) == 1
    out = capsys.readouterr().out
    assert "| 2 | host | process_vm_readv | `err:EFAULT` |  | FAIL |" in out
    assert "- step 2: I4 was expected to break here, and it held" in out


def test_the_trace_records_the_expected_violation() -> None:
    sc = load_text(HEAD + STORE + READV + 'expect_violation = "I4"\n', "t.toml")
    rec = trace_records(run(sc, "rfc-v1"))[1]
    assert (rec["expect_violation"], rec["violation_met"]) == ("I4", True)
    assert "violation_met" not in trace_records(run(sc, "rfc-v1"))[0]


def test_the_scenario_monitor_checks_what_the_scenario_names() -> None:
    sc = load_text(HEAD + STORE + READV, "t.toml")
    mon = scenario_monitor(sc)
    assert mon is not None and mon.names == ("I4",)
    assert scenario_monitor(load_text(HEAD.replace('invariants = ["I4"]\n', "") + STORE,
                                      "t.toml")) is None
    with pytest.raises(ScenarioError, match="unknown invariant I9"):
        scenario_monitor(load_text(HEAD.replace('["I4"]', '["I9"]') + STORE, "t.toml"))


@pytest.mark.parametrize(("name", "design", "breaks"), [
    ("e44-v1-pins-protected-page", "rfc-v1", [2, 3, 4]),
    ("e44-v1-pins-protected-page", "rfc-v2", []),
    ("e45-kvm-gup-leaks-poisoned-page", "rfc-v2", [3, 4, 5, 6, 7]),
    ("e45-kvm-gup-leaks-poisoned-page", "gmem", []),
])
def test_the_library_shows_e44_and_e45_where_they_happen(name: str, design: str,
                                                         breaks: list[int]) -> None:
    r = run(load(shipped()[name]), design)
    assert r.passed, (r.violations, [x.violation_met for x in r.results])
    assert [i for i, _ in r.expected_violations] == breaks


@pytest.mark.kvm
def test_the_live_run_reports_the_model_runs_checks(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "e44-v1-pins-protected-page", "--design", "rfc-v1", "--live",
                 "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    run_ = doc["runs"][0]
    assert [v.split(":")[0] for v in run_["expected_violations"]] == ["step 2", "step 3",
                                                                       "step 4"]
    assert run_["violations"] == [] and run_["held"] == []
