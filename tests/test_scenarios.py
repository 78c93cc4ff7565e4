"""Scenario files: the shipped library, the runner, the CLI, and bad input."""

from __future__ import annotations

import json
import os
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpoison.cli.main import main
from kvmpoison.explore import scenario_monitor
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import ScenarioError, load, load_text
from kvmpoison.scenario.ops import OPS
from kvmpoison.scenario.runner import run_scenario

LIBRARY = shipped()
RUNS = [(name, d) for name, path in LIBRARY.items() for d in load(path).designs]
# What a scenario that names no designs runs on (the shipped ones name none).
DEFAULT_DESIGNS = load_text('[scenario]\nname = "d"\n\n[[step]]\nactor = "guest:vm0"\n'
                            'op = "load"\ngpa = 0\n', "d.toml").designs


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# -- the shipped library ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "design"), RUNS, ids=[f"{n}/{d}" for n, d in RUNS])
def test_shipped_scenario_meets_its_expectations(name: str, design: str) -> None:
    sc = load(LIBRARY[name])
    # The invariants it names are checked as `kvmpoison run` checks them.
    run = run_scenario(sc, design, monitor=scenario_monitor(sc))
    failed = [(r.step.index, r.outcome.cell, r.expected, r.data_met, r.violation_met)
              for r in run.results if not r.ok]
    assert not failed, failed
    assert not run.violations, run.violations


def test_library_holds_the_seed_claims_and_twenty_edge_cases() -> None:
    seeds = [n for n in LIBRARY if n.startswith("seed-")]
    edges = [n for n in LIBRARY if n[0] == "e" and n[1:3].isdigit()]
    assert len(seeds) == 7 and len(edges) >= 20
    for wanted in ("e01", "e02", "e06", "e07", "e09", "e13", "e15", "e20", "e22", "e26", "e36",
                   "e37", "e38"):
        assert any(n.startswith(wanted + "-") for n in edges), wanted


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_shipped_scenario_documents_itself_and_covers_every_design(name: str) -> None:
    sc = load(LIBRARY[name])
    assert sc.name == name  # `kvmpoison run NAME` and the run's report agree
    assert sc.designs == DEFAULT_DESIGNS and {"baseline", "rfc-v1", "rfc-v2"} <= set(sc.designs)
    assert "Source:" in sc.comment and "Posted design" in sc.comment
    assert any(s.expect for s in sc.steps)


def test_an_expectation_is_a_real_check() -> None:
    """Flip one shipped expectation: the run must now fail."""
    text = LIBRARY["seed-4-sigbus"].read_text().replace("BUS_MCEERR_AR", "BUS_ADRERR")
    run = run_scenario(load_text(text, "flipped.toml"), "rfc-v2")
    assert not run.passed


# -- the runner's features -----------------------------------------------------------------

SAVED = """\
    [scenario]
    name = "saved"
    designs = ["rfc-v2"]

    [[step]]
    actor = "guest:vm0"
    op = "store"
    gpa = 0x5000
    data = "remember me"
    save = "written"

    [[step]]
    actor = "guest:vm0"
    op = "load"
    gpa = 0x5000
    size = 11
    expect = "ok"
    expect_data = "{want}"
"""


def test_a_saved_value_is_checked_by_a_later_step(tmp_path: Path) -> None:
    good = load(write(tmp_path, "good.toml", SAVED.format(want="$written")))
    assert run_scenario(good, "rfc-v2").passed
    bad = SAVED.format(want="$written").replace('data = "remember me"', 'data = "something"')
    assert not run_scenario(load(write(tmp_path, "bad.toml", bad)), "rfc-v2").passed


def test_addresses_as_hva_match_addresses_as_gpa(tmp_path: Path) -> None:
    sc = load(write(tmp_path, "gpa.toml", """\
        [scenario]
        name = "gpa"
        designs = ["rfc-v2"]

        [[step]]
        actor = "guest:vm0"
        op = "store"
        gpa = 0x7000
        data = "x"

        [[step]]
        actor = "vmm:vm0"
        op = "load"
        gpa = 0x7000
        expect = "sig:SIGBUS:BUS_MCEERR_AR"
    """))
    run = run_scenario(sc, "rfc-v2")
    si_addr = run.results[1].outcome.siginfo
    assert si_addr is not None
    text = Path(sc.source).read_text().replace("gpa = 0x7000\nexpect",
                                               f"hva = {si_addr.addr:#x}\nexpect")
    assert "hva = " in text
    again = run_scenario(load_text(text, "hva.toml"), "rfc-v2")
    assert again.passed and again.results[1].outcome.siginfo == si_addr


def test_machine_config_switch_changes_the_outcome(tmp_path: Path) -> None:
    body = """\
        [scenario]
        name = "mf"
        designs = ["baseline"]

        [machine]
        integrity = "off"
        memory_failure = {mf}

        [[step]]
        actor = "vmm:vm0"
        op = "store"
        gpa = 0x3000

        [[step]]
        actor = "host"
        op = "memory_failure"
        vm = "vm0"
        gpa = 0x3000
    """
    on = run_scenario(load(write(tmp_path, "on.toml", body.format(mf="true"))), "baseline")
    off = run_scenario(load(write(tmp_path, "off.toml", body.format(mf="false"))), "baseline")
    assert on.results[1].outcome.cell == "ret:0"
    assert off.results[1].outcome.cell != "ret:0"


# -- the CLI ---------------------------------------------------------------------------------


def test_list_names_every_shipped_scenario_first(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "run", "--list")
    names = [line.split()[0] for line in out.splitlines()]
    assert rc == 0 and names == sorted(LIBRARY)


def test_run_by_name_from_any_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, _ = cli(capsys, "run", "seed-4-sigbus", "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and {r["design"] for r in doc} == set(DEFAULT_DESIGNS)
    assert all(r["passed"] for r in doc)


def test_failed_expectation_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "wrong.toml", SAVED.format(want="not what was written"))
    rc, out, _ = cli(capsys, "run", str(path))
    assert rc == 1 and "FAIL" in out


def test_trace_has_one_object_per_step_with_what_changed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rc, _, _ = cli(capsys, "run", "seed-3-poison-and-unmap", "--design", "rfc-v2",
                   "--trace", str(trace))
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = load(LIBRARY["seed-3-poison-and-unmap"]).steps
    assert rc == 0 and [r["step"] for r in records] == [s.index for s in steps]
    assert all("changed" in r for r in records)
    kinds = [r["changed"]["vmm_pte_kind"]["after"] for r in records
             if "vmm_pte_kind" in r["changed"]]
    assert "hwpoison" in kinds  # going private replaced the VMM's PTE


def test_all_designs_overrides_the_scenario_list(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    path = write(tmp_path, "one.toml", SAVED.format(want="$written"))
    rc, out, _ = cli(capsys, "run", str(path), "--all-designs", "--format", "json")
    assert {r["design"] for r in json.loads(out)} == {"baseline", "rfc-v1", "rfc-v2", "gmem",
                                                      "hardened"}
    assert rc == 0  # the guest reads back its own bytes on every design


# -- bad input: one line naming the file and the step, exit 2 ------------------------------

ONE_STEP = """\
    [scenario]
    name = "broken"

    [[step]]
    {step}
"""

BROKEN = {
    "malformed": ("[scenario\nname = 1\n", "not valid TOML", None),
    "unknown-op": (ONE_STEP.format(step='actor = "guest:vm0"\n    op = "teleport"'),
                   "unknown operation 'teleport'", 1),
    "unknown-actor": (ONE_STEP.format(step='actor = "bios"\n    op = "load"'),
                      "unknown actor 'bios'", 1),
    "actor-no-vm": (ONE_STEP.format(step='actor = "guest:nobody"\n    op = "load"\n    gpa = 0'),
                    "names no [[vm]]", 1),
    "gpa-outside-ram": (ONE_STEP.format(
        step='actor = "vmm:vm0"\n    op = "load"\n    gpa = 0x40000000'), "outside guest RAM", 1),
    "hva-unmapped": (ONE_STEP.format(step='actor = "vmm:vm0"\n    op = "load"\n    hva = 0x1000'),
                     "outside every mapping", 1),
    "not-a-cell": (ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0\n    expect = "fine"'),
        "is not a cell", 1),
    "unknown-design": (ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0\n'
             '    expect = { rfc-v9 = "ok" }'), "unknown design 'rfc-v9'", 1),
    "missing-arg": (ONE_STEP.format(step='actor = "guest:vm0"\n    op = "store"\n    gpa = 0'),
                    "store needs data", 1),
    "bad-hex": (ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0\n    expect_data = "hex:zz"'),
        "not valid hex", 1),
    "unsaved-value": (ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0\n    expect_data = "$nothing"'),
        "names no value", 1),
    "bad-size": ('[machine]\nmemory = "lots"\n' + ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0'), "memory", None),
    "config-not-bool": ('[machine]\nmigration = "yes"\n' + ONE_STEP.format(
        step='actor = "guest:vm0"\n    op = "load"\n    gpa = 0'), "CONFIG switch", None),
    "no-steps": ('[scenario]\nname = "x"\n', "at least one [[step]]", None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_is_one_line_exit_2(case: str, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    body, message, step = BROKEN[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(textwrap.dedent(body) if body.startswith("    ") else body)
    rc, out, err = cli(capsys, "run", str(path))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert str(path) in lines[0] and message in lines[0], lines[0]
    if step is not None:
        assert f"step {step}" in lines[0]
    assert "Traceback" not in out + err


def test_missing_file_and_unknown_name_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "run", "no-such-scenario")
    assert rc == 2 and "no-such-scenario" in err and "--list" in err


# -- fuzz: any step table gives a result or a ScenarioError, never another exception ------

_VALUES = st.one_of(st.integers(-2, 1 << 48), st.integers(0, 0x3FFFFF),
                    st.sampled_from(["", "hex:00", "x", "pageout", "vm0", "vmm:vm0"]),
                    st.booleans())

_TYPED = {"gpa": st.integers(0, 0x3FFFFF), "size": st.integers(0, 0x3000),
          "data": st.text(alphabet="abc", min_size=1, max_size=80), "vm": st.just("vm0"),
          "target": st.just("vm0"), "nr": st.integers(0, 16), "gfn": st.integers(0, 0x400),
          "npages": st.integers(0, 40), "advice": st.sampled_from(["dontneed", "pageout"]),
          "prot": st.integers(0, 7)}


FUZZ_EXAMPLES = int(os.environ.get("KVMPOISON_FUZZ_EXAMPLES", "200"))


# A real deadline per example, and a thread-method timeout for the whole test: a step that
# loops (a share of 2^40 pages once did) fails fast instead of blocking the run.
@pytest.mark.timeout(180, method="thread")
@settings(max_examples=FUZZ_EXAMPLES, deadline=timedelta(seconds=5),
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), design=st.sampled_from(["baseline", "rfc-v1", "rfc-v2"]))
def test_fuzzed_steps_never_escape_as_tracebacks(data: st.DataObject, design: str) -> None:
    """Steps with the right argument names and arbitrary values: a result or a ScenarioError."""
    steps = []
    for kind, op in data.draw(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=5)):
        spec = OPS[(kind, op)]
        optional = data.draw(st.lists(st.sampled_from(spec.optional), unique=True)) \
            if spec.optional else []
        chosen = [*spec.required, *optional]
        if "gpa" in spec.optional and not {"gpa", "hva"} & set(chosen):
            chosen.append("gpa")  # an address op without an address only tests the loader
        fields = {n: data.draw(st.one_of(_TYPED.get(n, _VALUES), _TYPED.get(n, _VALUES),
                                         _VALUES)) for n in chosen}
        actor = kind if kind in ("host", "hw") else f"{kind}:vm0"
        body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
        steps.append(f'[[step]]\nactor = "{actor}"\nop = "{op}"\n{body}\n')
    text = '[scenario]\nname = "fuzz"\n\n' + "\n".join(steps)
    message = ""
    try:
        run_scenario(load_text(text, "fuzz.toml"), design)
    except ScenarioError as exc:
        message = str(exc)
    assert message == "" or message.startswith("fuzz.toml")


def test_readme_example_is_a_passing_scenario() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    sc = load_text('[scenario]\nname = "readme"\n' + example, "README.md")
    assert all(run_scenario(sc, d).passed for d in sc.designs)


def test_prefetch_maps_neighbours_only_when_memory_is_not_protected() -> None:
    """E28: the neighbour's own fault sets its SPTE under the RFC; baseline prefetched it."""
    sc = load(LIBRARY["e28-prefetch"])
    store_neighbour = 2  # results index of the guest's store to 0x30000
    baseline = run_scenario(sc, "baseline").results[store_neighbour]
    rfc = run_scenario(sc, "rfc-v2").results[store_neighbour]
    assert baseline.step.args["gpa"] == rfc.step.args["gpa"] == 0x30000
    assert "ept" not in baseline.changed  # already mapped by direct_pte_prefetch
    assert rfc.changed["ept"]["before"] == "0x0000000000000000"
