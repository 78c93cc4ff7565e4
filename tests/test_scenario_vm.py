"""``run --live --kernel debian-6.1``: what the VM guest is sent, and how it is judged.

No boot here: the boot itself is in tests/test_vmkernel.py (marked vmkernel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmpoison.backends.kvm.live import CORRUPT_PFN, hwpoison_inject, run_live
from kvmpoison.backends.vmkernel import qemu, session
from kvmpoison.backends.vmkernel.cache import KernelFiles
from kvmpoison.backends.vmkernel.session import parse
from kvmpoison.cli.main import main
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.report import scenario_vm
from kvmpoison.report.scenario_live import (
    DRAM_STAND_IN,
    LOAD_STAND_IN,
    NO_KVM,
    SIMULATED,
    STAND_IN,
    judge,
    live_step,
    plan,
)
from kvmpoison.scenario.loader import load_text

HEAD = '[scenario]\ndesigns = "baseline"\n[machine]\nintegrity = "off"\n'
V61 = KernelConfig(version=KernelVersion.V6_1, memory_failure=True)


def step(actor: str, op: str, **fields: object) -> str:
    body = "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                   for k, v in fields.items())
    return f'[[step]]\nactor = "{actor}"\nop = "{op}"\n{body}'


def test_in_the_vm_hwpoison_steps_are_sent_and_kvm_steps_are_not() -> None:
    sc = load_text(HEAD + step("vmm:vm0", "madvise", gpa=0, advice="hwpoison")
                   + step("host", "memory_failure", vm="vm0", gpa=0x1000)
                   + step("host", "unpoison", vm="vm0", gpa=0x1000)
                   + step("guest:vm0", "hypercall", nr=12)
                   + step("host", "set_memory_region", vm="vm0", slot=1,
                          guest_phys_addr=0x100000, size=0x1000, alias_gpa=0)
                   + step("guest:vm0", "store", gpa=0x2000, data="ab"), "t.toml")
    plans = [live_step(s, swap=False, in_vm=True) for s in sc.steps]
    hw, mf, unp, hc, slot, store = plans
    assert hw[0] is not None and hw[0]["args"]["advice"] == 100  # MADV_HWPOISON
    assert mf[0] is not None and mf[0]["op"] == "memory_failure" and \
        mf[0]["args"] == {"vm": "vm0", "gpa": 0x1000}
    assert unp[0] is not None and unp[0]["op"] == "unpoison"
    assert hc == (None, NO_KVM) and slot == (None, NO_KVM)
    assert store[0] is not None and store[0]["stand_in"] and store[1] == STAND_IN
    assert (store[0]["kind"], store[0]["op"], store[0]["args"]) == \
        ("vmm", "store", {"gpa": 0x2000, "data": b"ab".hex()})
    for s in sc.steps[:3]:  # on the host none of them is sent
        assert live_step(s, swap=False)[0] is None


def test_a_dram_error_stands_in_only_when_memory_failure_of_its_page_follows() -> None:
    sc = load_text(HEAD + step("vmm:vm0", "store", gpa=0x30000, data="x")
                   + step("hw", "inject_dram_error", vm="vm0", gpa=0x30008)
                   + step("host", "memory_failure", vm="vm0", gpa=0x30000)
                   + step("hw", "inject_dram_error", vm="vm0", gpa=0x31000)
                   + step("host", "memory_failure", vm="vm0", gpa=0x30000)
                   + step("host", "unpoison", vm="vm0", gpa=0x30000), "t.toml")
    p = plan(sc, V61, swap=False, in_vm=True)
    first, other_page, unpoison = p.plans[2], p.plans[4], p.plans[6]
    assert first[0] is not None and first[0]["op"] == "nothing" and first[1] == DRAM_STAND_IN
    assert other_page[0] is None  # another page: the error would wait in DRAM, not modelled live
    assert unpoison == (None, SIMULATED)


def test_a_replayed_guest_store_keeps_refereeing_only_when_both_sides_did_it() -> None:
    sc = load_text(HEAD + step("guest:vm0", "store", gpa=0x30000, data="x")
                   + step("vmm:vm0", "load", gpa=0x30000, size=1), "t.toml")
    p = plan(sc, V61, swap=False, in_vm=True)
    run = judge(p, {1: {"cell": "ok"}, 2: {"cell": "ok", "data": b"x".hex()}})
    assert [s.verdict for s in run.steps] == ["not refereed", "agree"]
    p = plan(sc, V61, swap=False, in_vm=True)
    run = judge(p, {1: {"cell": "sig:SIGBUS:BUS_MCEERR_AR"}, 2: {"cell": "ok", "data": "78"}})
    assert [s.verdict for s in run.steps] == ["not refereed", "not refereed"]
    assert "could only replay" in run.steps[1].reason


def test_the_host_never_injects_hwpoison() -> None:
    with pytest.raises(PermissionError, match="only inside the kvmpoison VM guest"):
        hwpoison_inject(CORRUPT_PFN, 0x1000)
    vms = [{"name": "vm0", "memory": 1 << 16, "backing": "anon", "share_ram_with": None}]
    got = run_live(vms, [
        {"index": 1, "kind": "vmm", "who": "vm0", "op": "store",
         "args": {"gpa": 0, "data": b"hi".hex()}},
        {"index": 2, "kind": "vmm", "who": "vm0", "op": "madvise",
         "args": {"gpa": 0, "size": 4096, "advice": 100}},
        {"index": 3, "kind": "host", "who": "", "op": "memory_failure",
         "args": {"vm": "vm0", "gpa": 0}},
        {"index": 4, "kind": "vmm", "who": "vm0", "op": "load", "args": {"gpa": 0, "size": 2}},
        {"index": 5, "kind": "guest", "who": "vm0", "op": "load", "args": {"gpa": 0}},
    ], use_kvm=False)
    assert got[1] == {"cell": "ok"}
    assert "PermissionError" in got[2]["error"] and "PermissionError" in got[3]["error"]
    assert got[4] == {"cell": "ok", "data": b"hi".hex()}  # the page is still in service
    assert "no /dev/kvm" in got[5]["error"]


def test_scenario_lines_on_the_console_become_results(tmp_path: Path) -> None:
    console = "\n".join([
        "KVMPOISON-STAGE chroot 3.5",
        'KVMPOISON-INFO {"release": "6.1.0-57-amd64", "hwpoison_inject": true}',
        'KVMPOISON-SCENARIO {"i": 0, "results": {"1": {"cell": "ret:0"}}}',
        'KVMPOISON-SCENARIO {"i": 1, "error": "LiveError: boom"}',
        'KVMPOISON-SCENARIO {"i": 2, "resu',  # cut by a kernel message
        'KVMPOISON-END {"seconds": 0.5}',
    ])
    run = parse(KernelFiles(tmp_path), qemu.Boot(console, 7.0, "tcg"))
    assert run.scenarios == {0: {"results": {"1": {"cell": "ret:0"}}},
                             1: {"error": "LiveError: boom"}}


def fake_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
              answer: dict[int, dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A cached kernel with MEMORY_FAILURE=y, and a boot that answers every sent step."""
    (tmp_path / "config").write_text("CONFIG_MEMORY_FAILURE=y\n")
    (tmp_path / "release").write_text("6.1.0-57-amd64\n")
    sent: list[list[dict[str, Any]]] = []

    def run_scenarios(jobs: list[dict[str, Any]], accel: str = "auto", timeout: float = 0,
                      kernel: KernelFiles | None = None) -> session.VmRun:
        sent.extend(j["steps"] for j in jobs)
        scen: dict[int, dict[str, object]] = {
            i: {"results": {str(s["index"]): answer.get(s["index"], {"cell": "ok"})
                            for s in j["steps"]}} for i, j in enumerate(jobs)}
        return session.VmRun(KernelFiles(tmp_path), "tcg", 20.0, 1.0, 5.0,
                             {"release": "6.1.0-57-amd64", "hwpoison_inject": True},
                             scenarios=scen)

    monkeypatch.setattr(session, "prepare", lambda: KernelFiles(tmp_path))
    monkeypatch.setattr(session, "run_scenarios", run_scenarios)
    return sent


def test_the_cli_referees_in_one_boot_and_counts(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    sent = fake_boot(monkeypatch, tmp_path, {2: {"cell": "ret:0"},
                                             3: {"cell": "sig:SIGBUS:BUS_MCEERR_AR"}})
    path = tmp_path / "t.toml"
    path.write_text(HEAD + step("vmm:vm0", "store", gpa=0, data="a")
                    + step("host", "memory_failure", vm="vm0", gpa=0)
                    + step("vmm:vm0", "load", gpa=0))
    rc = main(["run", str(path), str(path), "--live", "--kernel", "debian-6.1",
               "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert len(sent) == 2  # both scenarios, one boot
    assert "6.1.0-57-amd64 under QEMU" in doc["against"]
    assert (rc, doc["refereed"], doc["not_refereed"], doc["disagreements"]) == (0, 6, 0, 0)
    assert [s["model"] for s in doc["live"][0]["steps"]] == \
        ["ok", "ret:0", "sig:SIGBUS:BUS_MCEERR_AR"]


def test_a_vm_disagreement_exits_1(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake_boot(monkeypatch, tmp_path, {2: {"cell": "err:EBUSY"}})
    path = tmp_path / "t.toml"
    path.write_text(HEAD + step("vmm:vm0", "store", gpa=0, data="a")
                    + step("host", "memory_failure", vm="vm0", gpa=0))
    rc = main(["run", str(path), "--live", "--kernel", "debian-6.1", "--format", "json"])
    assert rc == 1 and json.loads(capsys.readouterr().out)["disagreements"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel", "debian-6.1"], "give it with --live"),
    (["--live", "--kernel", "debian-5.10"], "unknown VM kernel"),
    (["--live", "--kernel", "debian-6.1", "--accel", "hvf"], "unknown accelerator"),
])
def test_bad_vm_options_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                args: list[str], message: str) -> None:
    rc = main(["run", "seed-4-sigbus", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_a_kernel_without_memory_failure_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    fake_boot(monkeypatch, tmp_path, {})
    (tmp_path / "config").write_text("# CONFIG_MEMORY_FAILURE is not set\n")
    rc = main(["run", "seed-4-sigbus", "--live", "--kernel", "debian-6.1"])
    assert rc == 2 and "no CONFIG_MEMORY_FAILURE" in capsys.readouterr().err
    assert scenario_vm.GUEST_SWAP is False


def test_oracle_points_vm_scenarios_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["oracle", "--kernel", "debian-6.1", "--scenarios"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "run --all --live --kernel debian-6.1" in err[0]


def test_a_read_that_faults_a_page_in_ends_the_refereeing_after_it() -> None:
    """On this host KVM's own read has no live counterpart, and on the model it faults the
    VMM's page in: the steps after it start from memory the live kernel does not have."""
    sc = load_text(HEAD + step("host", "kvm_read", vm="vm0", gpa=0x30000)
                   + step("vmm:vm0", "load", gpa=0x30000, size=1), "t.toml")
    p = plan(sc, V61, swap=False)
    assert p.plans[1][0] is None
    run = judge(p, {2: {"cell": "ok", "data": "00"}})
    assert [s.verdict for s in run.steps] == ["not refereed", "not refereed"]
    assert "changed state the live kernel did not see" in run.steps[1].reason


def test_a_read_that_changes_nothing_keeps_the_refereeing() -> None:
    sc = load_text(HEAD + step("vmm:vm0", "store", gpa=0x30000, data="x")
                   + step("host", "kvm_read", vm="vm0", gpa=0x30000)
                   + step("vmm:vm0", "load", gpa=0x30000, size=1), "t.toml")
    p = plan(sc, V61, swap=False)
    run = judge(p, {1: {"cell": "ok"}, 3: {"cell": "ok", "data": b"x".hex()}})
    assert [s.verdict for s in run.steps] == ["agree", "not refereed", "agree"]


@pytest.mark.parametrize("first", [step("host", "kvm_read", vm="vm0", gpa=0x30000),
                                   step("guest:vm0", "load", gpa=0x30000, size=8)])
def test_in_the_vm_a_faulting_read_is_replayed_as_the_vmms_load(first: str) -> None:
    """The 6.1 guest has no /dev/kvm: KVM's read and a guest load are replayed as the VMM's
    load of the address, so a memory_failure of that page after them stays refereed (it had
    no page behind it live, a false DISAGREE)."""
    sc = load_text(HEAD + first + step("host", "memory_failure", vm="vm0", gpa=0x30000),
                   "t.toml")
    p = plan(sc, V61, swap=False, in_vm=True)
    sent, why = p.plans[1]
    assert sent is not None and sent["stand_in"] and why == LOAD_STAND_IN
    assert (sent["kind"], sent["who"], sent["op"], sent["args"]) == \
        ("vmm", "vm0", "load", {"gpa": 0x30000, "size": 8})
    run = judge(p, {1: {"cell": "ok", "data": "00" * 8}, 2: {"cell": "ret:0"}})
    assert [s.verdict for s in run.steps] == ["not refereed", "agree"]
    p = plan(sc, V61, swap=False, in_vm=True)  # judge fills the plan's run
    run = judge(p, {1: {"cell": "sig:SIGBUS:BUS_ADRERR"}, 2: {"cell": "ret:0"}})
    assert [s.verdict for s in run.steps] == ["not refereed", "not refereed"]
    assert "could only replay" in run.steps[1].reason
