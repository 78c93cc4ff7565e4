"""E27: with shadow paging (kvm_intel ept=0) the RFC's fault path never protects a page."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpoison.machine import Machine
from kvmpoison.mm.page import PageHWPoison
from kvmpoison.scenario.loader import ScenarioError, load, load_text
from kvmpoison.scenario.runner import build_machine, run_scenario
from kvmpoison.virt.kvm.x86.paging_tmpl import (
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    make_shadow_spte,
)

LIBRARY = Path(__file__).resolve().parent.parent / "src" / "kvmpoison" / "scenario" / "library"
SCENARIO = LIBRARY / "e27-shadow-paging.toml"

TEXT = """\
[machine]
integrity = "off"
tdp = {tdp}

[[step]]
actor = "guest:vm0"
op = "store"
gpa = 0x30000
data = "secret"

[[step]]
actor = "vmm:vm0"
op = "load"
gpa = 0x30000
size = 6
"""


@pytest.mark.parametrize("design", ["baseline", "rfc-v1", "rfc-v2", "hardened", "gmem"])
def test_the_shipped_scenario_meets_its_expectations(design: str) -> None:
    run = run_scenario(load(SCENARIO), design)
    assert run.passed, [(r.step.index, r.outcome.cell, r.expected) for r in run.results]


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_the_rfc_protects_on_tdp_but_not_on_shadow_paging(design: str) -> None:
    tdp = run_scenario(load_text(TEXT.format(tdp="true"), "t.toml"), design)
    assert tdp.results[1].outcome.cell == "sig:SIGBUS:BUS_MCEERR_AR"
    seen: list[Machine] = []
    shadow = run_scenario(load_text(TEXT.format(tdp="false"), "t.toml"), design,
                          observe=seen.append)
    assert shadow.results[1].outcome.cell == "ok"
    assert shadow.results[1].outcome.data == b"secret"
    m = seen[-1]
    inst = m.instances["vm0"]
    spte = inst.vm.ept.get(0x30000)
    pfn = spte >> 12 & ((1 << 40) - 1)
    assert not PageHWPoison(m.kernel.core.pages[pfn])  # kvm_protect_pfn never ran
    assert inst.vm.mem_protected  # the guest did enable protection


def test_a_shadow_spte_is_an_x86_pte_not_an_ept_entry() -> None:
    spte = make_shadow_spte(0x1234, writable=True)
    assert spte & PT_PRESENT_MASK and spte & PT_WRITABLE_MASK and spte & PT_USER_MASK
    assert spte >> 12 == 0x1234 | (0 << 40)  # no EPT memtype/IPAT bits above the pfn
    assert spte & 0x38 == 0x20  # accessed (bit 5) only: no EPT memory type in bits 3-5
    assert not make_shadow_spte(0x1234, writable=False) & PT_WRITABLE_MASK


def test_hardened_stays_closed_on_shadow_paging() -> None:
    run = run_scenario(load_text(TEXT.format(tdp="false"), "t.toml"), "hardened")
    assert run.results[1].outcome.cell == "sig:SIGBUS:BUS_ADRERR"


def test_gmem_cannot_create_its_vm_and_a_td_needs_ept() -> None:
    sc = load_text(TEXT.format(tdp="false"), "t.toml")
    run = run_scenario(sc, "gmem")
    assert run.results[0].outcome.cell == "err:EINVAL"  # KVM_CREATE_VM refused: no vCPU
    assert run.results[1].outcome.data == bytes(6)  # the VMM's memfd never saw the guest
    assert run_scenario(load_text(TEXT.format(tdp="true"), "t.toml"), "gmem"
                        ).results[0].outcome.cell == "ok"
    ci = load_text(TEXT.format(tdp="false").replace('"off"', '"ci"'), "t.toml")
    with pytest.raises(ScenarioError, match="TDX requires") as err:
        run_scenario(ci, "rfc-v2")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="TDX requires"):
        build_machine(ci, "rfc-v2")


def test_a_bad_tdp_value_is_one_clear_line() -> None:
    with pytest.raises(ScenarioError, match="tdp must be true or false"):
        load_text(TEXT.format(tdp='"no"'), "t.toml")


def test_the_live_referee_takes_the_hosts_paging_mode(tmp_path: Path) -> None:
    from kvmpoison.kconfig import THIS_MACHINE
    from kvmpoison.report.scenario_live import host_tdp_enabled, referee_scenario

    ept, npt = tmp_path / "ept", tmp_path / "npt"
    assert not host_tdp_enabled((str(ept), str(npt)))  # neither module: shadow (kvm_pvm)
    ept.write_text("N\n")
    assert not host_tdp_enabled((str(ept), str(npt)))
    ept.write_text("Y\n")
    assert host_tdp_enabled((str(ept), str(npt)))
    sc = referee_scenario(load(SCENARIO), THIS_MACHINE)
    assert sc.machine.tdp is host_tdp_enabled()
