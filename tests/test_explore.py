"""kvmpoison explore: each invariant on a hand-made violation and on a clean machine, the
explorer finding and shrinking rfc-v1's GUP hole into a reproducer that `run` fails on,
gmem staying clean, and the command's bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from explore_helpers import explore_ctx as _ctx
from explore_helpers import monitored_step as _step
from kvmpoison.arch.x86.pgtable_types import PAGE_SHARED, PAGE_SHIFT
from kvmpoison.cli.main import main
from kvmpoison.config import Config
from kvmpoison.explore import InvariantMonitor, parse_invariants
from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.invariants import (
    check_i1,
    check_i2,
    check_i4,
    check_i5,
    check_i6,
    check_i7_shared,
    free_pfns,
    intrusions,
    seen_poison,
    view_sources,
    vmm_pfns,
)
from kvmpoison.explore.reproducer import replay
from kvmpoison.machine import Machine
from kvmpoison.mm.page_flags import PG
from kvmpoison.scenario.loader import load_text
from kvmpoison.scenario.ops import RunCtx
from kvmpoison.scenario.runner import perform, run_scenario

GPA = 0x30000


def _private_pfn(ctx: RunCtx, gpa: int = GPA) -> int:
    raw = ctx.machine.vm.ept.get(gpa)
    assert raw
    return (raw >> PAGE_SHIFT) & ((1 << 40) - 1)


def test_i1_a_user_pte_onto_a_private_page() -> None:
    ctx = _ctx("rfc-v2")
    assert perform(ctx, "guest:vm0", "store", {"gpa": GPA, "data": "secret"}).cell == "ok"
    assert check_i1(ctx.machine) is None
    pfn = _private_pfn(ctx)
    mm = ctx.machine.vmm.proc.task.mm
    assert mm is not None
    mm.pgd.set(ctx.machine.vmm.gpa_to_hva(GPA), (pfn << PAGE_SHIFT) | PAGE_SHARED)
    assert check_i1(ctx.machine) == f"I1: a host-userspace PTE maps private page(s) pfn {pfn:#x}"


def test_i2_a_shared_keyid_write_over_td_lines() -> None:
    ctx = _ctx("rfc-v2")
    perform(ctx, "guest:vm0", "store", {"gpa": GPA, "data": "secret"})
    m = ctx.machine
    before, private = intrusions(m), view_sources(m)
    assert check_i2(m, before, private) is None
    pfn = _private_pfn(ctx)
    m.kernel.core.hw.write(pfn << PAGE_SHIFT, b"host!!!!", 0)
    problem = check_i2(m, before, private)
    assert problem is not None and problem.startswith("I2:") and f"{pfn:#x}" in problem


def test_i3_guest_reads_other_than_it_wrote() -> None:
    ctx = _ctx("rfc-v2")
    mon = InvariantMonitor(("I3",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="hex:" + "ab" * 8) == []
    assert _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8) == []
    vm = ctx.machine.vm
    assert vm.td_keyid is not None
    # Someone with the TD's own key rewrites the line: integrity holds, the data does not.
    ctx.machine.kernel.core.hw.write(_private_pfn(ctx) << PAGE_SHIFT, b"\xcd" * 8, vm.td_keyid)
    found = _step(ctx, mon, "guest:vm0", "load", gpa=GPA, size=8)
    assert len(found) == 1 and found[0].startswith("I3:") and "cdcdcdcd" in found[0]


def test_i4_mapcount_against_the_page_tables() -> None:
    ctx = _ctx("rfc-v2")
    shared = 0x10 << PAGE_SHIFT
    assert perform(ctx, "vmm:vm0", "store", {"gpa": shared, "data": "io"}).cell == "ok"
    assert perform(ctx, "vmm:vm0", "mprotect", {"gpa": shared, "prot": 0}).cell == "ret:0"
    m = ctx.machine
    assert check_i4(m) is None  # PROT_NONE still maps the page (its pfn bits are inverted)
    pfn = int(vmm_pfns(m.instances["vm0"])[0x10])
    assert pfn > 0
    m.kernel.core.pages._mapcount[pfn] += 1
    assert check_i4(m) == f"I4: pfn {pfn:#x}: mapcount 2 but 1 present PTE(s) map pfn {pfn:#x}"


def test_i5_a_free_page_poisoned_or_holding_td_data() -> None:
    ctx = _ctx("rfc-v2")
    m = ctx.machine
    assert check_i5(m) is None
    free = free_pfns(m)
    mem = m.kernel.core.pages
    assert not (mem.flags[free] & np.uint32(1 << 30)).all()  # a real free list, not empty
    mem.flags[free[0]] |= np.uint32(mem.mask(PG.hwpoison))
    want = f"I5: free page(s) in the allocator: pfn {int(free[0]):#x} with PG_hwpoison"
    assert check_i5(m) == want
    mem.flags[free[0]] &= ~np.uint32(mem.mask(PG.hwpoison))
    td = m.vm.td_keyid
    assert td is not None
    m.kernel.core.hw.write(int(free[1]) << PAGE_SHIFT, b"td" * 32, td)  # a whole line
    assert check_i5(m) == f"I5: free page(s) in the allocator: pfn {int(free[1]):#x} with TD data"


def test_i6_cleared_poison_of_a_real_error() -> None:
    ctx = _ctx("baseline")  # PG_hwpoison is no protection marker here
    m = ctx.machine
    perform(ctx, "guest:vm0", "store", {"gpa": GPA, "data": "x"})
    pfn = _private_pfn(ctx)
    m.kernel.core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    assert len(seen_poison(m)) == 0  # the kernel has not seen it: nothing to keep
    mem = m.kernel.core.pages
    mem.flags[pfn] |= np.uint32(mem.mask(PG.hwpoison))
    assert len(seen_poison(m)) == 0  # PG_hwpoison alone is not the kernel seeing the error
    reports = len(m.kernel.core.mf_reports)
    assert perform(ctx, "host", "memory_failure", {"vm": "vm0", "gpa": GPA}).succeeded
    seen = seen_poison(m, reports)
    assert seen.tolist() == [pfn] and check_i6(m, seen) is None
    assert len(seen_poison(m, len(m.kernel.core.mf_reports))) == 0  # a later step's log
    mem.flags[pfn] &= ~np.uint32(mem.mask(PG.hwpoison))
    problem = check_i6(m, seen)
    assert problem is not None and problem.startswith(f"I6: PG_hwpoison of really poisoned pfn "
                                                      f"{pfn:#x} was cleared")


def test_i7_shared_gfn_the_vmm_maps_elsewhere() -> None:
    ctx = _ctx("rfc-v2")
    shared = 0x10 << PAGE_SHIFT  # swiotlb: shared at boot
    assert perform(ctx, "guest:vm0", "store", {"gpa": shared, "data": "io"}).cell == "ok"
    assert perform(ctx, "vmm:vm0", "load", {"gpa": shared}).cell == "ok"
    m = ctx.machine
    assert check_i7_shared(m) is None
    other = int(free_pfns(m)[0])
    mm = m.vmm.proc.task.mm
    assert mm is not None
    mm.pgd.set(m.vmm.gpa_to_hva(shared), (other << PAGE_SHIFT) | PAGE_SHARED)
    problem = check_i7_shared(m)
    assert problem is not None and problem.startswith("I7: shared gfn 0x10 of vm0")


@pytest.mark.parametrize(("design", "cell", "violates"),
                         [("rfc-v1", "ret:8", True), ("rfc-v2", "err:EFAULT", False)])
def test_i7_the_host_reaches_a_private_page(design: str, cell: str, violates: bool) -> None:
    ctx = _ctx(design)
    mon = InvariantMonitor(("I7",))
    assert _step(ctx, mon, "guest:vm0", "store", gpa=GPA, data="secret") == []
    args = {"target": "vm0", "gpa": GPA}
    mon.before(ctx, "host", "process_vm_readv", args)
    out = perform(ctx, "host", "process_vm_readv", args)
    assert out.cell == cell
    found = mon.after(ctx, "host", "process_vm_readv", args, out)
    assert bool(found) == violates
    if violates:
        assert found[0].startswith("I7: process_vm_readv by the host at private gfn 0x30")


def test_parse_invariants() -> None:
    assert parse_invariants("i1, I3") == ("I1", "I3")
    assert parse_invariants(None)[0] == "I1"
    with pytest.raises(ValueError, match="unknown invariant I9"):
        parse_invariants("I1,I9")


def test_a_gmem_copy_exits_to_its_own_vmm() -> None:
    base = Machine(Config(design="gmem"))
    before = list(base.vmm.conversions)
    twin = base.copy()
    assert twin.guest.share(0x30, 1) == 0
    assert len(twin.vmm.conversions) == len(before) + 1
    assert base.vmm.conversions == before  # the original VMM saw nothing


@pytest.mark.timeout(60, method="thread")
def test_exploring_rfc_v1_finds_the_gup_hole_and_run_replays_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    res = explore_seed("rfc-v1", 32, 100, ("I1", "I7"), deadline_ms=5000)
    assert res.violation in ("I1", "I7") and res.replays is True
    # Found within the 100 steps asked for; shrinking ran many more.
    assert res.found_after is not None and 0 < res.found_after <= 100 < res.steps
    assert res.reproducer is not None
    assert replay(res.reproducer, "rfc-v1")[-1][1].startswith(res.violation + ":")
    path = tmp_path / "repro.toml"
    path.write_text(res.reproducer)
    capsys.readouterr()
    assert main(["run", str(path), "--format", "json"]) == 1
    out = capsys.readouterr().out
    assert f"step {len(res.reproducer.split('[[step]]')) - 1}: {res.violation}: " in out
    assert '"passed": false' in out


@pytest.mark.timeout(60, method="thread")
def test_gmem_explores_without_violations() -> None:
    res = explore_seed("gmem", 0, 300, parse_invariants(None), deadline_ms=5000)
    assert res.violation is None, res.problems
    assert res.steps >= 250  # a draw of the exit rule that does not exit is no step


@pytest.mark.timeout(60, method="thread")
def test_the_command_writes_results_and_reproducers(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["explore", "--design", "baseline", "--steps", "300", "--invariants", "I1",
               "--out", str(tmp_path), "--format", "json"])
    assert rc == 1  # baseline maps private memory by design
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["results.json", "x-baseline-i1-seed0.toml"]
    assert '"I1": 1' in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["explore", "--design", "nope"],
    ["explore", "--design", "gmem", "--steps", "0"],
    ["explore", "--design", "gmem", "--seeds", "-1"],
    ["explore", "--design", "gmem", "--invariants", "I1,I9"],
    ["explore", "--design", "gmem", "--invariants", ","],
    ["explore", "--design", "gmem", "--workers", "0"],
    ["explore", "--design", "gmem", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
    ["explore", "--design", "gmem", "--steps", "many"],
    ["explore"],
])
def test_bad_explore_input_is_one_line_and_exit_2(args: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmpoison: error: ") and err.count("\n") == 1


def test_a_scenario_naming_an_unknown_invariant_is_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[scenario]\ninvariants = ["I42"]\n\n[[step]]\nactor = "guest:vm0"\n'
                    'op = "load"\ngpa = 0x30000\n')
    assert main(["run", str(path), "--design", "gmem"]) == 2
    assert "unknown invariant I42" in capsys.readouterr().err


FOUND = sorted((Path(__file__).parent.parent / "src/kvmpoison/explore/found").glob("*.toml"))


def test_the_found_reproducers_are_shipped() -> None:
    assert len(FOUND) >= 16


@pytest.mark.parametrize("path", FOUND, ids=lambda p: p.stem)
def test_every_found_reproducer_still_fails_naming_its_invariant(path: Path) -> None:
    """Each shipped find replays with every step's cell as found, and its last step breaks
    the invariant it names: a regression test for the model and the explorer alike."""
    sc = load_text(path.read_text(), str(path))
    (design,) = sc.designs
    (invariant,) = sc.invariants
    run = run_scenario(sc, design, monitor=InvariantMonitor(sc.invariants))
    assert [r.step.index for r in run.results if not r.ok] == []
    assert run.violations and run.violations[0][0] == len(sc.steps)
    assert run.violations[0][1].startswith(f"{invariant}: ")


def test_a_gmem_copy_zaps_its_own_ept() -> None:
    """guest_memfd's invalidate of a copied machine acts on the copy's VM, not the original's."""
    base = Machine(Config(design="gmem"))
    assert base.guest.store(GPA, b"private").cell == "ok"
    twin = base.copy()
    assert twin.guest.share(GPA >> PAGE_SHIFT, 1) == 0  # punches the private page out
    assert twin.vm.ept.get(GPA) == 0
    assert base.vm.ept.get(GPA) != 0  # the original still maps its private page
    assert base.guest.load(GPA, 7).data == b"private"


def test_a_copy_faults_file_pages_into_its_own_page_cache() -> None:
    base = Machine(Config(design="baseline", backing="file"))
    twin = base.copy()
    assert twin.vmm.load(GPA).succeeded

    def cached(m: Machine) -> int | None:
        fd = m.vmm.ram_fd
        assert fd is not None
        mapping = m.vmm.proc.task.fds[fd].f_mapping
        assert mapping is not None
        return mapping.lookup(GPA >> PAGE_SHIFT)

    assert cached(twin) is not None
    assert cached(base) is None


# A sequence a random walk found: it used to end in ``get_page`` on a "free" page. It is
# RFCv1's pin bug: process_vm_writev pins the poisoned page with a bare get_page and unpins
# GUP_PIN_COUNTING_BIAS, so the count goes below zero; the kernel (without DEBUG_VM) keeps
# counting from there, and a later fault-around takes the page again.
RFC_V1_PIN_UNDERFLOW = """
[scenario]
name = "rfc-v1-pin-underflow"
designs = ["rfc-v1"]

[machine]
memory = 16777216

[[vm]]
name = "vm0"
memory = 1048576

[[step]]
actor = "host"
op = "process_vm_writev"
target = "vm0"
gpa = 0x30000
expect = { rfc-v1 = "ret:8" }

[[step]]
actor = "vmm:vm0"
op = "punch_hole"
gpa = 0x30000
expect = { rfc-v1 = "ret:0" }

[[step]]
actor = "vmm:vm0"
op = "fork_child_load"
gpa = 0x31000
expect = { rfc-v1 = "ok" }

[[step]]
actor = "guest:vm0"
op = "load"
gpa = 0x30000
size = 8
expect = { rfc-v1 = "ok" }

[[step]]
actor = "host"
op = "process_vm_writev"
target = "vm0"
gpa = 0x30000
expect = { rfc-v1 = "ret:8" }

[[step]]
actor = "guest:vm0"
op = "share"
gpa = 0x30000
expect = { rfc-v1 = "ret:0" }

[[step]]
actor = "vmm:vm0"
op = "fork_child_load"
gpa = 0x30000

"""


def test_rfc_v1_pin_underflow_keeps_counting_below_zero() -> None:
    sc = load_text(RFC_V1_PIN_UNDERFLOW, "rfc-v1-pin-underflow")
    seen: list[Machine] = []
    run = run_scenario(sc, "rfc-v1", observe=seen.append)
    assert all(r.ok for r in run.results), [(r.step.index, r.outcome.cell) for r in run.results]
    assert (seen[-1].kernel.core.pages._refcount < 0).any()  # what the RFC's pin leaves


def test_i3_forgets_every_gfn_a_large_share_makes_shared() -> None:
    """A share of more than 1024 pages used to keep the shadow of the gfns beyond them."""
    ctx = RunCtx(Machine(Config(design="rfc-v2", vm_mem=16 << 20)))
    mon = InvariantMonitor(("I3",))
    far = GPA + (1100 << PAGE_SHIFT)
    assert _step(ctx, mon, "guest:vm0", "store", gpa=far, data="hex:" + "ab" * 8) == []
    gfn = GPA >> PAGE_SHIFT
    assert _step(ctx, mon, "guest:vm0", "share", gpa=GPA, npages=1200) == []
    assert all(not (gfn <= g < gfn + 1200) for _, g in mon.shadow)
