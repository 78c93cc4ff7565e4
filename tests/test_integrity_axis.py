"""Integrity is a machine setting: every design runs on the same hardware."""

import json

import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.main import main
from kvmpoison.config import DEFAULT_INTEGRITY, Config
from kvmpoison.designs import DESIGNS
from kvmpoison.machine import Machine
from kvmpoison.matrix.designs import GUEST_DATA, run_design_cell
from kvmpoison.scenario.loader import load_text
from kvmpoison.scenario.runner import build_machine


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_design_runs_on_the_same_tdx_hardware_by_default() -> None:
    assert DEFAULT_INTEGRITY is IntegrityMode.CI
    for name, d in DESIGNS.items():
        assert not hasattr(d, "integrity"), name  # a design carries no hardware setting
        m = Machine(Config(design=name))
        assert m.platform.integrity is IntegrityMode.CI
        assert m.vm.td_keyid is not None  # every design's VM is a TD


@pytest.mark.parametrize("mode", list(IntegrityMode))
def test_the_integrity_setting_applies_to_every_design(mode: IntegrityMode) -> None:
    for name in DESIGNS:
        m = Machine(Config(design=name, integrity=mode))
        assert m.platform.integrity is mode
        assert (m.vm.td_keyid is None) is (mode is IntegrityMode.OFF)


@pytest.mark.parametrize(("mode", "data"), [(IntegrityMode.CI, bytes(8)),
                                            (IntegrityMode.OFF, GUEST_DATA[:8])])
def test_ptrace_peek_reads_the_same_on_baseline_and_rfc_v1(mode: IntegrityMode,
                                                            data: bytes) -> None:
    # The example: with integrity per design, baseline read zeros and rfc-v1 plaintext.
    got = {d: run_design_cell(d, "private", "ptrace_peek",
                              lambda d: Config(design=d, integrity=mode)).outcome
           for d in ("baseline", "rfc-v1")}
    assert {o.cell for o in got.values()} == {"ok"}
    assert got["baseline"].data == got["rfc-v1"].data == data


SCENARIO = """
[scenario]
name = "li"
[machine]
integrity = "li"
[[step]]
actor = "guest:vm0"
op = "store"
gpa = 0x30000
data = "x"
"""


def test_scenario_machine_integrity_is_for_every_design_and_the_cli_overrides_it() -> None:
    sc = load_text(SCENARIO, "li.toml")
    for name in DESIGNS:
        assert build_machine(sc, name).platform.integrity is IntegrityMode.LI
        assert build_machine(sc, name, IntegrityMode.OFF).platform.integrity is IntegrityMode.OFF
    plain = load_text(SCENARIO.replace('integrity = "li"', ""), "plain.toml")
    assert build_machine(plain, "rfc-v1").platform.integrity is DEFAULT_INTEGRITY


def test_matrix_designs_integrity_option(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("matrix", "--designs", "baseline,rfc-v2", "--states", "private",
            "--paths", "guest_load_after_vmm_store", "--format", "json")
    rc, out, _ = cli(capsys, *args)
    doc = json.loads(out)
    assert rc == 0 and doc["integrity"] == "ci"
    assert doc["cells"]["guest_load_after_vmm_store"] == {"baseline/private": "mce:td-fatal",
                                                          "rfc-v2/private": "ok"}
    rc, out, _ = cli(capsys, *args, "--integrity", "off")
    doc = json.loads(out)
    assert rc == 0 and doc["integrity"] == "off"
    # No TD bit, no MAC: the VMM's write is simply read back on baseline.
    assert doc["cells"]["guest_load_after_vmm_store"]["baseline/private"] == "ok"


def test_run_integrity_option_overrides_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "run", "e30-kvm-emulated-access", "--format", "json")
    assert rc == 0
    runs = json.loads(out)
    # hardened: KVM never reads a TD's private page (-EFAULT, audited), so no bytes at all
    assert {r["steps"][1]["data"] for r in runs if r["design"] != "hardened"} == {bytes(7).hex()}
    assert {r["steps"][1]["cell"] for r in runs if r["design"] == "hardened"} == {"err:EFAULT"}
    rc, out, _ = cli(capsys, "run", "e30-kvm-emulated-access", "--format", "json",
                     "--integrity", "off")
    runs = json.loads(out)
    # Plain KVM: KVM reads the plaintext on every design, and no #MC follows its write,
    # so the TDX expectation of step 4 fails (exit 1).
    assert rc == 1 and {r["design"] for r in runs} == set(DESIGNS)
    assert {r["steps"][1]["data"] for r in runs if r["design"] != "gmem"} == {b"private".hex()}
    # gmem: KVM reads the memslot's userspace_addr, the shared page, never guest_memfd
    assert {r["steps"][1]["data"] for r in runs if r["design"] == "gmem"} == {bytes(7).hex()}
    assert {r["steps"][3]["cell"] for r in runs} == {"ok"}


def test_demo_integrity_option(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "demo", "--design", "baseline", "--format", "json",
                     "--integrity", "off")
    doc = json.loads(out)
    assert rc == 0 and doc["integrity"] == "off"
    last = doc["stories"]["baseline"][-1]
    # Without integrity the guest reads back what the VMM wrote into its page.
    assert last["cell"] == "ok" and last["data"].startswith("VMM!")


def test_matrix_integrity_without_designs_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "matrix", "--integrity", "off")
    assert rc == 2 and out == "" and "--integrity goes with --designs" in err


@pytest.mark.parametrize("cmd", [["demo"], ["matrix", "--designs", "rfc-v2"],
                                 ["run", "e30-kvm-emulated-access"]])
def test_bad_integrity_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                              cmd: list[str]) -> None:
    rc, _, err = cli(capsys, *cmd, "--integrity", "full")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--integrity" in lines[0]


def test_scenario_integrity_value_is_checked() -> None:
    from kvmpoison.scenario.loader import ScenarioError

    assert load_text(SCENARIO.replace('"li"', '"CI"'), "ci.toml").machine.integrity is (
        IntegrityMode.CI)
    with pytest.raises(ScenarioError, match=r"integrity mode 'full' \(known: off, li, ci\)"):
        load_text(SCENARIO.replace('"li"', '"full"'), "bad.toml")
