"""The hardened design in the scenario machinery and its docs: the E-case table is generated
from the model, every E-case scenario states its verdict, steps may be limited to designs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmpoison.kconfig import KernelVersion
from kvmpoison.scenario.loader import ScenarioError, load, load_text
from kvmpoison.scenario.runner import build_machine, run_scenario

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "src" / "kvmpoison" / "scenario" / "library"


def test_the_e_case_table_in_docs_is_current() -> None:
    script = ROOT / "docs" / "gen_hardened_table.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", sorted(LIBRARY.glob("e[0-9][0-9]-*.toml")), ids=lambda p: p.stem)
def test_every_e_case_scenario_says_what_hardened_does(path: Path) -> None:
    sc = load(path)
    verdicts = [line for line in sc.comment.splitlines() if line.startswith("hardened (")]
    assert len(verdicts) == 1 and verdicts[0].split(")")[0][10:] in ("closed", "refused", "open")


def test_every_shipped_scenario_names_a_hardened_expectation() -> None:
    for path in sorted(LIBRARY.glob("*.toml")):
        sc = load(path)
        if "hardened" not in sc.designs:
            continue
        tables = [s for s in sc.steps if len(s.expect) > 1 or "*" not in s.expect]
        assert all("hardened" in s.expect for s in tables if s.expect and s.runs_on("hardened")
                   ), path.stem


STEP_DESIGNS = """\
[scenario]
name = "t"

[[step]]
actor = "guest:vm0"
op = "store"
gpa = 0x30000
data = "x"
designs = ["rfc-v2"]
expect = "ok"

[[step]]
actor = "vmm:vm0"
op = "load"
gpa = 0x30000
expect = { rfc-v2 = "sig:SIGBUS:BUS_MCEERR_AR", "*" = "ok" }
"""


def test_a_step_runs_only_on_its_designs() -> None:
    sc = load_text(STEP_DESIGNS, "t.toml")
    assert sc.steps[0].designs == ("rfc-v2",)
    assert [r.step.index for r in run_scenario(sc, "rfc-v2").results] == [1, 2]
    hardened = run_scenario(sc, "hardened")
    assert [r.step.index for r in hardened.results] == [2] and hardened.results[0].ok
    with pytest.raises(ScenarioError, match="unknown design 'nope'"):
        load_text(STEP_DESIGNS.replace('["rfc-v2"]', '["nope"]'), "t.toml")
    with pytest.raises(ScenarioError, match="is empty"):
        load_text(STEP_DESIGNS.replace('["rfc-v2"]', "[]"), "t.toml")


def test_an_older_kernel_is_raised_to_the_design_floor() -> None:
    sc = load(LIBRARY / "e43-punch-hole-keeps-hwpoison-entry.toml")  # [machine] kernel = "5.12"
    assert build_machine(sc, "hardened").kernel.kcfg.version is KernelVersion.V6_1
    assert build_machine(sc, "rfc-v2").kernel.kcfg.version is KernelVersion.V5_12


@pytest.mark.timeout(60, method="thread")
def test_the_explorer_finds_no_violation_in_hardened() -> None:
    from kvmpoison.explore.campaign import explore_seed
    from kvmpoison.explore.invariants import parse_invariants
    res = explore_seed("hardened", 0, 300, parse_invariants(None), deadline_ms=5000)
    assert res.violation is None, res.problems
    assert res.steps >= 300


def test_a_trace_shows_the_page_flag_and_binding() -> None:
    sc = load_text('[scenario]\nname = "t"\n\n[[step]]\nactor = "guest:vm0"\nop = "store"\n'
                   'gpa = 0x30000\ndata = "x"\n', "t.toml")
    changed = run_scenario(sc, "hardened").results[0].changed
    assert "PG_guest_private" in changed["flags"]["after"]
    assert "PG_hwpoison" not in changed["flags"]["after"]
    assert changed["owner"]["after"] == 1 and changed["vmm_pte_kind"]["after"] == "pte_marker"
