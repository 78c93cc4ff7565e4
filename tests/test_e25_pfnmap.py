"""E25: device memory without struct page (VM_IO | VM_PFNMAP) used as a memslot."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpoison.drivers.char.mem import DEV_MEM, bar_range
from kvmpoison.machine import Machine
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.memory import pfn_valid, vm_normal_page
from kvmpoison.mm.mm_types import VM
from kvmpoison.mm.mmap import MAP_SHARED, PROT_READ, PROT_WRITE
from kvmpoison.scenario.loader import ScenarioError, load, load_text
from kvmpoison.scenario.runner import run_scenario
from kvmpoison.virt.kvm.kvm_main import is_error_pfn
from kvmpoison.virt.kvm.mem_protected import SIZEOF_STRUCT_PAGE, VMEMMAP_START

LIBRARY = Path(__file__).resolve().parent.parent / "src" / "kvmpoison" / "scenario" / "library"
SCENARIO = LIBRARY / "e25-pfnmap-device-memory.toml"


def _bar_mapping(design: str = "baseline") -> tuple[Machine, int]:
    from kvmpoison.arch.x86.integrity import IntegrityMode
    from kvmpoison.config import Config
    m = Machine(Config(design=design, integrity=IntegrityMode.OFF))
    proc = m.vmm.proc
    fd = proc.open(DEV_MEM, O_RDWR).value
    assert fd is not None
    bar, _ = bar_range(m.kernel.core)
    hva = proc.mmap(0, 0x2000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, bar).value
    assert hva is not None and hva > 0
    return m, hva


@pytest.mark.parametrize("design", ["baseline", "rfc-v1", "rfc-v2", "hardened", "gmem"])
def test_the_shipped_scenario_meets_its_expectations(design: str) -> None:
    run = run_scenario(load(SCENARIO), design)
    assert run.passed, [(r.step.index, r.outcome.cell, r.expected) for r in run.results]


def test_remap_pfn_range_maps_special_ptes_of_pfns_without_struct_page() -> None:
    m, hva = _bar_mapping()
    core = m.kernel.core
    mm = m.vmm.proc.mm
    vma = next(v for v in mm.vmas if v.vm_start == hva)
    assert vma.vm_flags & (VM.IO | VM.PFNMAP | VM.DONTEXPAND | VM.DONTDUMP) == \
        VM.IO | VM.PFNMAP | VM.DONTEXPAND | VM.DONTDUMP
    pte = mm.pgd.get(hva)
    pfn = (pte >> 12) & ((1 << 40) - 1)
    assert pfn == bar_range(core)[0] >> 12 and not pfn_valid(core, pfn)
    assert vm_normal_page(vma, pte) is None
    assert m.vmm.proc.store(hva + 8, b"bar!").succeeded
    assert m.vmm.proc.load(hva + 8, 4).data == b"bar!"
    # GUP refuses the VMA (check_vma_flags): process_vm_readv of it fails
    other = m.process("reader")
    buf = other.mmap(0, 0x1000, PROT_READ | PROT_WRITE, 0x22).value
    assert buf is not None
    assert other.process_vm_readv(m.vmm.proc, buf, hva, 8).cell == "err:EFAULT"


def test_dev_mem_refuses_ram_and_what_no_device_decodes() -> None:
    m = Machine()
    proc = m.vmm.proc
    fd = proc.open(DEV_MEM, O_RDWR).value
    assert fd is not None
    assert proc.mmap(0, 0x1000, PROT_READ, MAP_SHARED, fd, 0x30000).cell == "err:EPERM"
    bar, size = bar_range(m.kernel.core)
    assert proc.mmap(0, 0x1000, PROT_READ, MAP_SHARED, fd, bar + size).cell == "err:EPERM"


def test_hva_to_pfn_remapped_takes_no_reference_on_a_device_pfn() -> None:
    m, hva = _bar_mapping()
    vm = m.vm
    pfn = vm.hva_to_pfn(hva, write=True)
    assert not is_error_pfn(pfn) and pfn == bar_range(m.kernel.core)[0] >> 12
    ro = m.vmm.proc.mprotect(hva, 0x1000, PROT_READ)
    assert ro.succeeded
    assert is_error_pfn(vm.hva_to_pfn(hva, write=True))  # KVM_PFN_ERR_RO_FAULT


def test_the_rfc_oopses_on_the_vmemmap_slot_of_the_device_pfn() -> None:
    run = run_scenario(load(SCENARIO), "rfc-v2")
    guest = run.results[4].outcome
    pfn = 0x8000000 >> 12
    assert guest.cell == "panic"
    assert f"{VMEMMAP_START + pfn * SIZEOF_STRUCT_PAGE:#x}" in guest.detail


def test_open_of_another_path_is_one_clear_line() -> None:
    bad = '[[step]]\nactor = "vmm:vm0"\nop = "open"\npath = "/etc/passwd"\n'
    with pytest.raises(ScenarioError, match="open takes path") as err:
        run_scenario(load_text(bad, "t.toml"), "baseline")
    assert "\n" not in str(err.value)
