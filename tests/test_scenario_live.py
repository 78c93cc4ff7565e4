"""``run --live``: scenarios refereed step by step by the running kernel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmpoison.cli.main import main
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.report import scenario_live
from kvmpoison.report.scenario_live import LiveRun, live_step, referee
from kvmpoison.scenario.loader import load_text

HEAD = '[scenario]\ndesigns = "baseline"\n[machine]\nintegrity = "off"\n'


def step(actor: str, op: str, **fields: object) -> str:
    body = "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                   for k, v in fields.items())
    return f'[[step]]\nactor = "{actor}"\nop = "{op}"\n{body}'


def live_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["run", *args, "--live", "--format", "json"])
    return rc, json.loads(capsys.readouterr().out)


def verdicts(run: LiveRun) -> list[str]:
    return [s.verdict for s in run.steps]


# -- without /dev/kvm: what is sent, what is refereed ------------------------------------------


def test_steps_without_a_live_counterpart_are_not_sent() -> None:
    sc = load_text(HEAD + step("hw", "inject_dram_error", vm="vm0", gpa=0x30000)
                   + step("guest:vm0", "hypercall", nr=12)
                   + step("vmm:vm0", "madvise", gpa=0, advice="hwpoison")
                   + step("host", "memory_failure", vm="vm0", gpa=0), "t.toml")
    for s in sc.steps:
        plan, why = live_step(s)
        assert plan is None and why


def test_every_library_op_has_a_plan_or_a_reason() -> None:
    from kvmpoison.scenario.library import shipped
    from kvmpoison.scenario.loader import load

    for path in shipped().values():
        for s in load(path).steps:
            plan, why = live_step(s)
            assert (plan is None) == bool(why), (path.name, s.index)


def fake_live(answers: dict[int, dict[str, Any]]) -> Any:
    def run_live(vms: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[int, Any]:
        return {s["index"]: answers.get(s["index"], {"cell": "ok"}) for s in steps}
    return run_live


def test_a_not_refereed_step_that_changes_state_ends_refereeing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenario_live, "run_live", fake_live({}))
    sc = load_text(HEAD + step("vmm:vm0", "store", gpa=0x30000, data="x")
                   + step("host", "kvm_read", vm="vm0", gpa=0x30000)
                   + step("vmm:vm0", "load", gpa=0x30000, size=1)
                   + step("hw", "inject_dram_error", vm="vm0", gpa=0x30000)
                   + step("vmm:vm0", "load", gpa=0x30000), "t.toml")
    run = referee(sc, THIS_MACHINE)
    assert verdicts(run) == ["agree", "not refereed", "agree", "not refereed", "not refereed"]
    assert "follows step 4" in run.steps[4].reason
    assert (run.refereed, run.not_refereed) == (2, 3)


def test_a_different_cell_or_different_data_is_a_disagreement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenario_live, "run_live", fake_live({
        1: {"cell": "err:EFAULT"}, 3: {"cell": "ok", "data": "00"}, 4: {"error": "boom"}}))
    sc = load_text(HEAD + step("vmm:vm0", "store", gpa=0, data="a")
                   + step("vmm:vm0", "store", gpa=0, data="b")
                   + step("vmm:vm0", "load", gpa=0, size=1)
                   + step("vmm:vm0", "load", gpa=0, size=1), "t.toml")
    run = referee(sc, THIS_MACHINE)
    assert verdicts(run) == ["DISAGREE", "agree", "DISAGREE", "DISAGREE"]
    assert "different data" in run.steps[2].reason and run.steps[3].live == "error"


def test_the_cli_exits_1_on_a_disagreement(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    monkeypatch.setattr(scenario_live, "run_live", fake_live({1: {"cell": "ret:7"}}))
    monkeypatch.setattr("kvmpoison.backends.kvm.host.kvm_status", lambda: None)
    path = tmp_path / "t.toml"
    path.write_text(HEAD + step("vmm:vm0", "store", gpa=0, data="a"))
    rc, doc = live_json(capsys, str(path))
    assert rc == 1 and doc["disagreements"] == 1 and doc["runs"][0]["passed"]


def test_live_without_kvm_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("kvmpoison.backends.kvm.host.kvm_status", lambda: "missing (test)")
    rc = main(["run", "gmem-file-abi", "--live"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--live needs /dev/kvm" in err[0]


# -- on the running kernel -------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize(("name", "refereed"), [("gmem-file-abi", 24), ("memslot2", 22)])
def test_shipped_file_and_memslot_scenarios_agree_live(
        capsys: pytest.CaptureFixture[str], name: str, refereed: int) -> None:
    rc, doc = live_json(capsys, name)
    assert rc == 0 and doc["disagreements"] == 0
    assert doc["refereed"] == refereed


@pytest.mark.kvm
def test_the_kernel_selftest_scenarios_agree_live(capsys: pytest.CaptureFixture[str]) -> None:
    """Every selftest-* scenario (guest_memfd_test.c, set_memory_region_test.c) passes its own
    expectations on the model and agrees with the running kernel on every refereed step."""
    from kvmpoison.scenario.library import shipped

    names = sorted(n for n in shipped() if n.startswith("selftest-"))
    assert len(names) >= 3
    rc, doc = live_json(capsys, *names)
    assert rc == 0 and doc["disagreements"] == 0
    assert doc["refereed"] > 0
    refereed = {r["scenario"]: sum(s["verdict"] == "agree" for s in r["steps"])
                for r in doc["live"]}
    assert all(refereed[n] > 0 for n in names), refereed


@pytest.mark.kvm
def test_a_guest_access_the_emulator_cannot_serve_is_not_refereed(
        capsys: pytest.CaptureFixture[str]) -> None:
    _, doc = live_json(capsys, "memslot2")
    last = doc["live"][0]["steps"][-1]
    assert last["verdict"] == "not refereed" and "KVM_EXIT_MMIO" in last["reason"]


@pytest.mark.kvm
def test_a_vmm_fault_is_a_cell_and_the_scenario_goes_on() -> None:
    """Loads beyond the truncated guest-RAM file: SIGBUS, read by the tracer; the VMM, which
    handles SIGBUS, goes on in the same process, and later steps see its memory."""
    sc = load_text(HEAD + step("vmm:vm0", "store", gpa=0x10000, data="kept")
                   + step("vmm:vm0", "ftruncate", size=0x20000)
                   + step("vmm:vm0", "load", gpa=0x30000)
                   + step("vmm:vm0", "store", gpa=0x30000, data="x")
                   + step("vmm:vm0", "load", gpa=0x10000, size=4)
                   + step("host", "process_vm_readv", target="vm0", gpa=0x10000)
                   + step("host", "process_vm_readv", target="vm0", gpa=0x30000), "t.toml")
    run = referee(sc)
    assert [s.live for s in run.steps] == ["ok", "ret:0", "sig:SIGBUS:BUS_ADRERR",
                                           "sig:SIGBUS:BUS_ADRERR", "ok", "ret:8", "err:EFAULT"]
    assert verdicts(run) == ["agree"] * 7


@pytest.mark.kvm
def test_guest_stores_on_a_real_vcpu_reach_the_vmm() -> None:
    sc = load_text(HEAD + step("guest:vm0", "store", gpa=0x1ff000 - 3, data="across")
                   + step("vmm:vm0", "load", gpa=0x1ff000 - 3, size=6)
                   + step("vmm:vm0", "store", gpa=0x3ff000, data="vmm")
                   + step("guest:vm0", "load", gpa=0x3ff000, size=3), "t.toml")
    run = referee(sc)
    assert verdicts(run) == ["agree"] * 4
    assert [s.live for s in run.steps] == ["ok"] * 4


@pytest.mark.kvm
def test_a_broken_live_run_is_an_error_not_a_partial_result() -> None:
    from kvmpoison.backends.kvm.live import LiveError, run_live

    vm = {"name": "vm0", "memory": 1 << 20, "backing": "memfd", "share_ram_with": None}
    ok = {"index": 1, "kind": "vmm", "who": "vm0", "op": "store", "save": None,
          "args": {"gpa": 0, "data": "41"}}
    assert run_live([vm], [ok]) == {1: {"cell": "ok"}}
    broken = {**ok, "index": 2, "args": {"gpa": None, "data": "41"}}
    with pytest.raises(LiveError, match="TypeError"):
        run_live([vm], [ok, broken])
