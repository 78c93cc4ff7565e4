"""kvmpoison explore, second part: I4's refcount half and I8 on planted violations and on
clean machines, the model fixes the new rules needed (a pipe's pages on exit, a second
vfio_pin, a second VM on an exited VMM's RAM), the monitor's treatment of a panic and of
tampering, and designs picked up from the registry."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from explore_helpers import explore_ctx as _ctx
from explore_helpers import monitored_step as _step
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW, PAGE_SHIFT
from kvmpoison.designs import DESIGNS
from kvmpoison.explore import InvariantMonitor
from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.invariants import (
    check_i2,
    check_i4,
    check_i8,
    free_mask,
    free_pfns,
    intrusions,
    view_sources,
)
from kvmpoison.explore.refcount import holders
from kvmpoison.explore.statemachine import state_machine
from kvmpoison.explore.tlb import stale_tlb_entries
from kvmpoison.matrix.designs import backing_pfn
from kvmpoison.mm.gup import GUP_PIN_COUNTING_BIAS
from kvmpoison.scenario.ops import OpError, RunCtx
from kvmpoison.scenario.runner import perform

GPA = 0x30000
SHARED = 0x10 << PAGE_SHIFT  # swiotlb: shared at boot


def _vmm_pfn(ctx: RunCtx, gpa: int) -> int:
    mm = ctx.machine.vmm.proc.task.mm
    assert mm is not None
    pte = mm.pgd.get(ctx.machine.vmm.gpa_to_hva(gpa))
    assert pte
    return (pte >> PAGE_SHIFT) & ((1 << 40) - 1)


# -- I4: refcount ------------------------------------------------------------------------


def test_i4_refcount_counts_ptes_page_cache_pipes_and_pins() -> None:
    ctx = _ctx("baseline")
    mon = InvariantMonitor(("I4",))
    assert _step(ctx, mon, "vmm:vm0", "store", gpa=SHARED, data="io") == []
    pfn = _vmm_pfn(ctx, SHARED)
    assert _step(ctx, mon, "vmm:vm0", "vmsplice_buf_to_pipe", gpa=SHARED) == []
    assert _step(ctx, mon, "vmm:vm0", "vfio_pin", gpa=SHARED) == []
    h = holders(ctx.machine, ctx.pins.values())
    assert (h.ptes[pfn], h.page_cache[pfn], h.pipes[pfn], h.pins[pfn]) == \
        (1, 1, 1, GUP_PIN_COUNTING_BIAS)
    assert int(ctx.machine.kernel.core.pages._refcount[pfn]) == 3 + GUP_PIN_COUNTING_BIAS
    # A pin the scenario does not record is a reference nobody accounts for.
    assert check_i4(ctx.machine) is not None
    assert check_i4(ctx.machine, {"pins": tuple(ctx.pins.values())}) is None


def test_i4_refcount_catches_a_leaked_and_a_missing_reference() -> None:
    ctx = _ctx("rfc-v2")
    assert perform(ctx, "vmm:vm0", "store", {"gpa": SHARED, "data": "io"}).cell == "ok"
    m = ctx.machine
    assert check_i4(m) is None
    pfn = _vmm_pfn(ctx, SHARED)
    mem = m.kernel.core.pages
    mem._refcount[pfn] += 1
    assert check_i4(m) == (f"I4: pfn {pfn:#x}: refcount 3 but its holders own 2 (ptes 1, "
                           f"page cache 1) at pfn {pfn:#x}")
    mem._refcount[pfn] -= 2  # a PTE that holds no reference: a use-after-free to come
    problem = check_i4(m)
    assert problem is not None and problem.startswith(f"I4: pfn {pfn:#x}: refcount 1 but")


def test_i4_counts_memory_failures_reference_and_rfc_v2s_hwpoison_entries() -> None:
    ctx = _ctx("rfc-v2")
    mon = InvariantMonitor(("I4",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="secret") == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=GPA) == []  # no ref taken
    assert _step(ctx, mon, "vmm:vm0", "load", gpa=SHARED) == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=SHARED) == []
    pfn = ctx.machine.kernel.core.mf_reports[-1].pfn  # type: ignore[attr-defined]
    h = holders(ctx.machine)
    assert h.memory_failure[pfn] == 1 and h.hwpoison_entries[pfn] == 1


def test_i4_finds_rfc_v2s_leaked_gup_reference_on_a_poisoned_page() -> None:
    """kvm_protect_pfn refuses a page memory_failure poisoned (E14) and RFCv2's fault path
    returns before kvm_release_pfn_clean: every retry leaks one reference."""
    ctx = _ctx("rfc-v2")
    mon = InvariantMonitor(("I4",))
    assert _step(ctx, mon, "vmm:vm0", "load", gpa=GPA) == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=GPA) == []
    found = _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8)
    assert len(found) == 1 and found[0].startswith("I4: ") and "refcount 3 but its holders " \
        "own 2 (hwpoison entries 1, memory failure 1)" in found[0]


def test_the_exit_of_a_process_gives_its_pipes_pages_back() -> None:
    """Kernel.exit closes the fds: the last close of a pipe releases its buffers
    (free_pipe_info), so a vmspliced page gets its reference back."""
    ctx = _ctx("baseline")
    assert perform(ctx, "vmm:vm0", "store", {"gpa": SHARED, "data": "io"}).cell == "ok"
    pfn = _vmm_pfn(ctx, SHARED)
    assert perform(ctx, "vmm:vm0", "vmsplice_buf_to_pipe", {"gpa": SHARED}).cell == "ret:8"
    mem = ctx.machine.kernel.core.pages
    assert int(mem._refcount[pfn]) == 3  # the PTE, the page cache, the pipe buffer
    assert perform(ctx, "vmm:vm0", "exit", {}).cell == "ok"
    assert int(mem._refcount[pfn]) == 1  # the page cache's: the memfd outlives the VMM
    assert check_i4(ctx.machine) is None


def test_a_second_vfio_pin_of_a_mapped_iova_is_eexist() -> None:
    ctx = _ctx("baseline")
    assert perform(ctx, "vmm:vm0", "vfio_pin", {"gpa": SHARED}).cell == "ret:1"
    assert perform(ctx, "vmm:vm0", "vfio_pin", {"gpa": SHARED}).cell == "err:EEXIST"
    assert check_i4(ctx.machine, {"pins": tuple(ctx.pins.values())}) is None


def test_a_second_vm_on_an_exited_vmms_ram_is_refused() -> None:
    ctx = _ctx("gmem")
    assert perform(ctx, "vmm:vm0", "exit", {}).cell == "ok"
    with pytest.raises(OpError, match="has exited, its RAM file is closed"):
        perform(ctx, "host", "new_vm", {"name": "vm1", "memory": 1 << 20,
                                        "share_ram_with": "vm0"})


# -- I8: stale TLB entries ---------------------------------------------------------------


def test_i8_a_pte_changed_without_a_flush() -> None:
    ctx = _ctx("rfc-v2")
    m = ctx.machine
    assert perform(ctx, "vmm:vm0", "store", {"gpa": SHARED, "data": "io"}).cell == "ok"
    assert any(len(c.tlb) for c in m.kernel.core.cpus)  # the store cached its translation
    assert check_i8(m) is None
    mm = m.vmm.proc.task.mm
    assert mm is not None
    hva = m.vmm.gpa_to_hva(SHARED)
    pte = mm.pgd.get(hva)
    mm.pgd.set(hva, pte & ~_PAGE_RW)  # write-protected, no flush: the TLB still writes
    problem = check_i8(m)
    assert problem is not None and problem.startswith("I8: CPU ") and f"{hva:#x}" in problem
    mm.pgd.set(hva, pte | _PAGE_RW)  # a permission gained needs no flush
    assert check_i8(m) is None
    mm.pgd.set(hva, 0)  # cleared, no flush
    (stale,) = stale_tlb_entries(m)
    assert (stale.vaddr, stale.current, stale.mm) == (hva, 0, mm.ident)


def test_i8_holds_when_the_kernel_flushes() -> None:
    ctx = _ctx("rfc-v2")
    mon = InvariantMonitor(("I8",))
    for op, args in (("store", {"data": "io"}), ("mprotect", {"prot": 1}), ("load", {}),
                     ("mprotect", {"prot": 3}), ("store", {"data": "y"}),
                     ("madvise", {"advice": "dontneed"}), ("store", {"data": "x"}),
                     ("munmap", {})):
        assert _step(ctx, mon, "vmm:vm0", op, gpa=SHARED, **args) == [], op
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="private") == []
    assert _step(ctx, mon, "vmm:vm0", "exit") == []


# -- the monitor -------------------------------------------------------------------------


def test_a_panicked_host_is_checked_no_further() -> None:
    """baseline: process_vm_readv of a page with a DRAM error panics the host with the pin
    still held; no state invariant applies to what a panic leaves."""
    ctx = _ctx("baseline")
    mon = InvariantMonitor(("I4", "I5", "I8"))  # baseline maps private pages (I1) by design
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8) == []
    assert _step(ctx, mon, "hw", "inject_dram_error", vm="vm0", gpa=GPA) == []
    assert _step(ctx, mon, "host", "process_vm_readv", target="vm0", gpa=GPA) == []
    assert ctx.machine.kernel.halted is not None
    assert check_i4(ctx.machine) is not None  # the pin a panic never released


def test_tampering_is_left_to_i3_not_i2() -> None:
    ctx = _ctx("gmem")
    mon = InvariantMonitor(("I2", "I3"))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="hex:" + "ab" * 8) == []
    m = ctx.machine
    before, private = intrusions(m), view_sources(m)
    # The kernel writes through its direct map with KeyID 0: the line is reached (I2's
    # check says so) but no design can stop it, so the monitor leaves it to I3.
    assert _step(ctx, mon, "host", "kernel_write", vm="vm0", gpa=GPA, data="evil") == []
    assert check_i2(m, before, private) is not None
    assert _step(ctx, mon, "hw", "tamper", vm="vm0", gpa=GPA) == []
    # Integrity turns the damage into a machine check: the guest never reads it as data.
    out = perform(ctx, "guest:vm0", "load", {"gpa": GPA, "size": 8})
    assert not out.succeeded


# -- designs come from the registry ------------------------------------------------------


@pytest.mark.timeout(60, method="thread")
def test_a_design_added_to_the_registry_is_explored(monkeypatch: pytest.MonkeyPatch) -> None:
    clone = replace(DESIGNS["rfc-v2"], name="rfc-v2-clone")
    monkeypatch.setitem(DESIGNS, clone.name, clone)
    res = explore_seed(clone.name, 0, 100, ("I1", "I4", "I8"), shrink=False, deadline_ms=5000)
    assert res.design == clone.name and res.steps >= 50
    cls = state_machine(clone.name, ("I1", "I4", "I8"))
    assert cls.base is not None and cls.base.design.name == clone.name
    assert set(dir(cls)) >= {
        "vmm_ftruncate", "vmm_exit", "host_ksmd", "host_soft_offline", "host_second_vm",
        "hw_tamper", "host_direct_map_write", "vmm_vfio_pin", "vmm_dma_write", "guest_vm1_store"}


def test_i5s_free_test_agrees_with_the_free_lists() -> None:
    """free_mask (a head search per candidate) says free exactly where free_pfns (the buddy
    lists expanded) lists a pfn, after allocations and frees of several orders."""
    ctx = _ctx("rfc-v2")
    for op, args in (("store", {"gpa": SHARED, "data": "io"}), ("punch_hole", {"gpa": SHARED}),
                     ("fork_child_load", {"gpa": SHARED})):
        perform(ctx, "vmm:vm0", op, args)
    perform(ctx, "guest:vm0", "store", {"gpa": GPA, "data": "x"})
    m = ctx.machine
    every = np.arange(m.kernel.core.pages.nr_pages, dtype=np.int64)
    want = np.isin(every, free_pfns(m))
    assert 0 < int(want.sum()) < len(every)
    assert (free_mask(m, every) == want).all()


def test_no_step_runs_on_a_panicked_host() -> None:
    cls = state_machine("baseline", ("I4",))
    sm = cls()
    sm.guest_load(GPA)
    sm.hw_dram_error(sm.backed().index(GPA))
    sm.host_path("process_vm_readv", GPA)
    assert sm.m.kernel.halted is not None and len(sm.trace) == 3
    before = cls.steps_run
    sm.vmm_path("load", GPA)
    sm.guest_store(GPA, 7)
    assert cls.steps_run == before and len(sm.trace) == 3


def test_i4_counts_the_reference_a_hardened_marker_holds() -> None:
    """The hardened guest's boot-time unshare replaces the VMM's PTE of a page it mapped
    with a guest-private marker that keeps the PTE's reference (the explorer's seed-0 find)."""
    ctx = _ctx("hardened")
    mon = InvariantMonitor(("I4",))
    assert _step(ctx, mon, "vmm:vm0", "load", gpa=0x30000) == []
    assert _step(ctx, mon, "guest:vm0", "reboot") == []
    inst = ctx.machine.instances["vm0"]
    pfn = backing_pfn(ctx.machine, 0x30000, inst.vmm, inst.vm)
    h = holders(ctx.machine)
    assert h.guest_private_markers[pfn] == 1 and h.ptes[pfn] == 0


def test_i3_forgets_only_what_a_reboot_accepts_afresh() -> None:
    """The hardened guest's boot converts all RAM to private, accepting a gfn whose page
    the VMM punched out afresh: I3 starts that gfn anew (the explorer's seed-29 find on
    hardened). A guest whose boot converts nothing private keeps its shadow."""
    ctx = _ctx("hardened")
    mon = InvariantMonitor(("I3",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="hex:0101010101010101") == []
    assert _step(ctx, mon, "vmm:vm0", "punch_hole", gpa=GPA) == []
    assert ("vm0", GPA >> PAGE_SHIFT) in mon.shadow
    assert _step(ctx, mon, "guest:vm0", "reboot") == []
    assert ("vm0", GPA >> PAGE_SHIFT) not in mon.shadow
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8) == []
    ctx = _ctx("rfc-v2")
    mon = InvariantMonitor(("I3",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="secret") == []
    assert _step(ctx, mon, "guest:vm0", "reboot") == []
    assert ("vm0", GPA >> PAGE_SHIFT) in mon.shadow
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=6) == []


@pytest.mark.parametrize("design", ["rfc-v2", "hardened"])
def test_e45_the_refused_fault_leaks_a_reference_only_under_rfc_v2(design: str) -> None:
    """E45 (the explorer's rfc-v2 I4 find): a guest access to a page memory_failure
    poisoned is refused and retried; RFC v2's hva_to_pfn_slow returns -EHWPOISON before
    put_page, so each retry leaks GUP's reference. hardened answers KVM_PFN_ERR_HWPOISON
    before it takes one."""
    ctx = _ctx(design)
    mon = InvariantMonitor(("I4",))
    assert _step(ctx, mon, "vmm:vm0", "vfio_pin", gpa=GPA) == []
    assert _step(ctx, mon, "host", "memory_failure", vm="vm0", gpa=GPA) == []
    found = _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8)
    found += _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8)
    assert bool(found) == (design == "rfc-v2"), found
