"""The invariant checks' short cuts against the straightforward computations they replace,
on the machine states an exploration walks through (every step of a seed, violations
included: the run goes on past them) and on planted ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from explore_helpers import explore_ctx as _ctx
from kvmpoison.arch.x86.pgtable import pte_none_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_USER,
    PAGE_SHIFT,
)
from kvmpoison.arch.x86.vmx import VMX_EPT_RWX_MASK
from kvmpoison.explore import monitor as monitor_mod
from kvmpoison.explore import statemachine
from kvmpoison.explore.arrays import nonzero, pte_pfns_nonzero
from kvmpoison.explore.campaign import explore_seed
from kvmpoison.explore.invariants import (
    INVARIANTS,
    PINS,
    Cache,
    ViewSource,
    _fmt,
    check_i2,
    check_i4,
    check_i5,
    free_mask,
    guest_private_mask,
    guest_view,
    intrusions,
    leaf_ptes,
    live,
    private_mask,
    td_data_mask,
    td_pfns,
    view_of,
    view_source,
    view_sources,
    vmm_pfns,
)
from kvmpoison.explore.monitor import guest_private_one
from kvmpoison.explore.refcount import holders, refcount_mismatches, user_ptes
from kvmpoison.explore.tlb import PFN_MASK, _stale_few, _stale_gathered, stale_mask
from kvmpoison.machine import Instance, Machine
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Outcome
from kvmpoison.scenario.loader import load_text
from kvmpoison.scenario.ops import RunCtx
from kvmpoison.scenario.runner import build_machine, perform
from kvmpoison.virt.kvm.gmem_memslot import SPTE_PRIVATE
from kvmpoison.virt.kvm.kvm_main import Protection

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


# -- the straightforward computations ----------------------------------------------------


def _view(inst: Instance) -> tuple[I64, I64, npt.NDArray[np.bool_]]:
    """A VM's view the long way: the table walk, then the guest's own private test."""
    addr, raw = leaf_ptes(inst.vm.ept, 0, inst.vmm.ram_size)
    present = (raw & np.uint64(VMX_EPT_RWX_MASK)) != 0
    raw, gfns = raw[present], addr[present] >> PAGE_SHIFT
    pfns = ((raw >> np.uint64(PAGE_SHIFT)) & np.uint64((1 << 40) - 1)).astype(np.int64)
    if inst.vm.protection is Protection.GMEM:
        return gfns, pfns, (raw & np.uint64(SPTE_PRIVATE)) != 0
    return gfns, pfns, guest_private_mask(inst, gfns)


def _private(m: Machine) -> npt.NDArray[np.bool_]:
    parts = [v[1][v[2]] for v in map(_view, live(m))]
    pfns = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return np.isin(np.arange(m.kernel.core.pages.nr_pages), pfns)


def _vmm(inst: Instance) -> I64:
    out = np.full(inst.vmm.ram_size >> PAGE_SHIFT, -1, dtype=np.int64)
    mm = inst.vmm.proc.task.mm
    assert mm is not None
    addr, raw = leaf_ptes(mm.pgd, inst.vmm.ram_hva, inst.vmm.ram_hva + inst.vmm.ram_size)
    present = pte_present_array(raw)
    out[(addr[present] - inst.vmm.ram_hva) >> PAGE_SHIFT] = pte_pfn_array(raw[present])
    return out


def _stale(cached: U64, current: U64) -> npt.NDArray[np.bool_]:
    """stale_mask as the module doc says it: another pfn, or a grant the PTE lost."""
    moved = (cached ^ current) & PFN_MASK
    nx = np.uint64(_PAGE_NX)
    grant = np.uint64(_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_NX)
    lost = (cached ^ nx) & ~(current ^ nx) & grant
    return np.asarray((moved | lost) != 0, dtype=np.bool_)


def _agree(m: Machine, pins: tuple[Any, ...]) -> None:
    """Every short cut of the checks against its straightforward computation, on ``m``."""
    core = m.kernel.core
    mem = core.pages
    n = mem.nr_pages
    cache: Cache = {PINS: pins}
    for inst in live(m):
        got, want = guest_view(inst, cache), _view(inst)
        assert got.gfns.tolist() == want[0].tolist()
        assert got.pfns.tolist() == want[1].tolist()
        assert got.private.tolist() == want[2].tolist()
        assert vmm_pfns(inst, cache).tolist() == _vmm(inst).tolist()
        gfns = np.arange(inst.vmm.ram_size >> PAGE_SHIFT, dtype=np.int64)
        assert [guest_private_one(inst, int(g)) for g in gfns] == \
            guest_private_mask(inst, gfns).tolist()
        # One gfn's view (the monitor's probe of a host access), the explorer's and others.
        for gfn in (0, 0x10, 0x30, 0x31, 0x32, (inst.vmm.ram_size >> PAGE_SHIFT) - 1):
            one = view_of(view_source(inst, copy=False, gfn=gfn))
            at = want[0] == gfn
            assert one.gfns.tolist() == want[0][at].tolist()
            assert one.pfns.tolist() == want[1][at].tolist()
            assert one.private.tolist() == want[2][at].tolist()
    assert (private_mask(m, cache) == _private(m)).all()
    # Every user PTE: the scan of the non-zero ones against one of all rows.
    rows = core.ptes.rows[: core.ptes._high].reshape(-1)
    present = pte_present_array(rows)
    special = (rows & np.uint64(_PAGE_SPECIAL)) != 0
    mapped = pte_pfn_array(rows[present & ~special])
    scan = user_ptes(m)
    assert scan.pfns.tolist() == pte_pfn_array(rows[present]).tolist()
    assert scan.mapped.tolist() == mapped[mapped < n].tolist()
    assert scan.swap.tolist() == rows[~present & ~pte_none_array(rows)].tolist()
    # I4: mapcount (reported first), then refcount against every holder's own count.
    counted = np.bincount(mapped, minlength=n)[:n]
    recorded = mem._mapcount.astype(np.int64) + 1
    bad = np.flatnonzero(counted != recorded)
    bad = bad[bad != core.zero_pfn]
    h = holders(m, pins)
    bad_ref = np.flatnonzero((mem._refcount != h.expected) & ~h.uncounted)
    assert refcount_mismatches(m, pins, scan)[0].tolist() == bad_ref.tolist()
    got_i4 = check_i4(m, cache)
    if len(bad):
        p = int(bad[0])
        assert got_i4 == (f"I4: pfn {_fmt(bad)}: mapcount {int(recorded[p])} but "
                          f"{int(counted[p])} present PTE(s) map pfn {p:#x}")
    else:
        assert (got_i4 is None) == (not len(bad_ref))
    # I5: TD data of every frame, and the report.
    every = np.arange(n, dtype=np.int64)
    td = np.flatnonzero(td_data_mask(m, every))
    assert td_pfns(m).tolist() == td.tolist()
    poisoned = np.flatnonzero(mem.flags & np.uint32(mem.mask(PG.hwpoison)))
    problems = [f"pfn {_fmt(pfns[free_mask(m, pfns)])} with {what}"
                for what, pfns in (("PG_hwpoison", poisoned), ("TD data", td))
                if free_mask(m, pfns).any()]
    assert check_i5(m, cache) == \
        ("I5: free page(s) in the allocator: " + "; ".join(problems) if problems else None)
    # I8: the entries one by one and gathered.
    cpus = [c for c in core.cpus if c.tlb._entries]
    if cpus:
        assert _stale_few(m) == _stale_gathered(m, cpus, [len(c.tlb._entries) for c in cpus])


class _Agreeing(monitor_mod.InvariantMonitor):
    """Checks every invariant, compares the short cuts after every step, and never stops a
    run (a violation's state is checked too, and the run goes on)."""

    steps = 0

    def before(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any]) -> None:
        super().before(ctx, actor, op, args)
        self._sources = view_sources(ctx.machine)
        self._was = _private(ctx.machine)

    def after(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any],
              out: Outcome) -> list[str]:
        super().after(ctx, actor, op, args, out)
        m = ctx.machine
        # What was private before the step, read from the copies taken before it.
        assert (private_mask(m, sources=self._sources) == self._was).all()
        if m.kernel.halted is None:
            _agree(m, tuple(ctx.pins.values()))
        type(self).steps += 1
        return []


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("design", ["baseline", "rfc-v1", "rfc-v2", "gmem", "hardened"])
def test_the_short_cuts_agree_on_every_explored_state(design: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statemachine, "InvariantMonitor", _Agreeing)
    _Agreeing.steps = 0
    res = explore_seed(design, 3, 150, tuple(INVARIANTS), shrink=False, deadline_ms=20000)
    assert res.violation is None  # the agreeing monitor reports nothing: it compares
    assert _Agreeing.steps >= 100


# -- planted states ----------------------------------------------------------------------


def test_stale_entries_one_by_one_and_gathered() -> None:
    """Stale and fresh TLB entries in several mms, one whose PTE table is gone and one of an
    mm that exited: both paths find the same entries, in the same order."""
    ctx = _ctx("rfc-v2")
    m = ctx.machine
    shared = 0x10 << PAGE_SHIFT
    for op, args in (("store", {"data": "io"}), ("fork_child_load", {})):
        perform(ctx, "vmm:vm0", op, {"gpa": shared, **args})
    core = m.kernel.core
    mm = m.vmm.proc.task.mm
    assert mm is not None
    hva = m.vmm.gpa_to_hva(shared)
    pte = mm.pgd.get(hva)
    mm.pgd.set(hva, pte & ~_PAGE_RW)  # a lost grant, no flush
    cpu = core.cpus[0]
    cpu.tlb.fill(mm.ident, hva + (1 << 30), pte)  # no PTE table there
    cpu.tlb.fill(max(core.mms) + 1000, hva, pte)  # an mm that is gone
    for i in range(3):
        cpu.tlb.fill(mm.ident, hva + ((i + 1) << PAGE_SHIFT), pte)
    cpus = [c for c in core.cpus if c.tlb._entries]
    few = _stale_few(m)
    assert few == _stale_gathered(m, cpus, [len(c.tlb._entries) for c in cpus])
    assert {e.vaddr for e in few} >= {hva, hva + (1 << 30)}
    assert all(e.mm in core.mms for e in few)


def test_stale_mask_and_the_pfn_short_cut_on_random_entries() -> None:
    rng = np.random.default_rng(7)
    bits = np.uint64(_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_NX | _PAGE_PROTNONE
                     | _PAGE_SPECIAL) | PFN_MASK
    a = rng.integers(0, 1 << 63, 4000, dtype=np.uint64) & bits
    b = np.where(rng.random(4000) < 0.5, a, rng.integers(0, 1 << 63, 4000, dtype=np.uint64)
                 & bits)
    b = b ^ (rng.integers(0, 1 << 63, 4000, dtype=np.uint64) & np.uint64(0b111) *
             (rng.random(4000) < 0.3))  # flip only a few grant bits of some
    assert (stale_mask(a, b) == _stale(a, b)).all()
    assert stale_mask(a, b).any() and not stale_mask(a, b).all()
    nz = a[a != 0]
    assert pte_pfns_nonzero(nz).tolist() == pte_pfn_array(nz).tolist()
    assert ((nz & np.uint64(_PAGE_PRESENT)) == 0).any()  # PROT_NONE-like entries were tested
    for arr in (a & np.uint64(_PAGE_RW), a != 0, np.zeros(5, dtype=np.uint32)):
        assert nonzero(arr).tolist() == np.flatnonzero(arr).tolist()


def test_i5_reports_poison_and_td_data_together() -> None:
    """Both kinds of free page at once, more of one than of the other: each listed under
    its own name."""
    ctx = _ctx("rfc-v2")
    perform(ctx, "guest:vm0", "store", {"gpa": 0x30 << PAGE_SHIFT, "data": "in use"})
    m = ctx.machine
    mem = m.kernel.core.pages
    assert len(td_pfns(m)) and not free_mask(m, td_pfns(m)).all()  # TD data, not free
    free = np.flatnonzero(free_mask(m, np.arange(mem.nr_pages, dtype=np.int64)))
    for i in (3, 5, 6):
        mem.flags[free[i]] |= np.uint32(mem.mask(PG.hwpoison))
    td = m.vm.td_keyid
    assert td is not None
    m.kernel.core.hw.write(int(free[1]) << PAGE_SHIFT, b"td" * 32, td)
    assert check_i5(m) == (f"I5: free page(s) in the allocator: pfn {int(free[3]):#x}, "
                           f"{int(free[5]):#x}, {int(free[6]):#x} with PG_hwpoison; "
                           f"pfn {int(free[1]):#x} with TD data")


def test_a_pte_beyond_memory_is_no_page_of_i4() -> None:
    """A present PTE naming a pfn past the end of memory has no struct page: I4 leaves it
    out of both counts, as the straightforward scan does."""
    ctx = _ctx("rfc-v2")
    m = ctx.machine
    mm = m.vmm.proc.task.mm
    assert mm is not None
    n = m.kernel.core.pages.nr_pages
    hva = m.vmm.gpa_to_hva(0x31 << PAGE_SHIFT)
    assert mm.pgd.get(hva) == 0  # nothing mapped there yet
    mm.pgd.set(hva, ((n + 5) << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER)
    assert n + 5 in user_ptes(m).pfns.tolist()
    assert n + 5 not in user_ptes(m).mapped.tolist()
    assert check_i4(m) is None
    _agree(m, ())


def test_view_sources_keep_the_state_before_a_change() -> None:
    """A copy taken before a share and a punch keeps what was private then."""
    ctx = _ctx("rfc-v2")
    gpa = 0x30 << PAGE_SHIFT
    perform(ctx, "guest:vm0", "store", {"gpa": gpa, "data": "secret"})
    m = ctx.machine
    before, sources = _private(m), view_sources(m)
    assert before.any()
    perform(ctx, "guest:vm0", "share", {"gpa": gpa})
    perform(ctx, "vmm:vm0", "punch_hole", {"gpa": gpa})
    assert not (_private(m) == before).all()  # the step changed what is private
    assert (private_mask(m, sources=sources) == before).all()


def test_i2_asks_whether_the_frame_was_private_before_the_step() -> None:
    """A frame the step made the TD's is not one a host write could reach while it was
    private: I2 reads the private pages of before the step from its copies."""
    ctx = _ctx("rfc-v2")
    m = ctx.machine
    gpa = 0x30 << PAGE_SHIFT
    before, sources = intrusions(m), view_sources(m)
    perform(ctx, "guest:vm0", "store", {"gpa": gpa, "data": "secret"})
    pfn = int(np.flatnonzero(private_mask(m) & ~_private_of(sources, m))[0])
    m.kernel.core.hw.write(pfn << PAGE_SHIFT, b"host!!!!", 0)
    assert check_i2(m, before, sources) is None
    problem = check_i2(m, before, view_sources(m))
    assert problem is not None and f"{pfn:#x}" in problem


def _private_of(sources: list[ViewSource], m: Machine) -> npt.NDArray[np.bool_]:
    return private_mask(m, sources=sources)


@pytest.mark.parametrize("design", ["rfc-v2", "gmem"])
def test_a_guest_larger_than_one_pte_table_is_read_by_the_walk(design: str) -> None:
    """A 6 MiB guest spans three PTE tables: its view and the VMM's pfns come from the table
    walk (the short read covers one), and agree with the straightforward ones."""
    text = (f"[scenario]\nname = \"big\"\ndesigns = [\"{design}\"]\n\n[machine]\n"
            f"memory = {32 << 20}\nseed = 0\n\n[[vm]]\nname = \"vm0\"\nmemory = {6 << 20}\n"
            "\n[[step]]\nactor = \"guest:vm0\"\nop = \"reboot\"\n")
    ctx = RunCtx(build_machine(load_text(text, "<big>"), design))
    far = (5 << 20) + (7 << PAGE_SHIFT)  # in the third PTE table
    for gpa in (0x30 << PAGE_SHIFT, far):  # the second table stays out: a hole in the walk
        perform(ctx, "guest:vm0", "store", {"gpa": gpa, "data": "x"})
    perform(ctx, "guest:vm0", "share", {"gpa": far})
    perform(ctx, "guest:vm0", "store", {"gpa": far, "data": "io"})
    perform(ctx, "vmm:vm0", "load", {"gpa": far})
    (inst,) = live(ctx.machine)
    view = guest_view(inst)
    assert inst.vm.ept.pte_slot(2 << 20) is None  # no table for the middle 2 MiB
    assert (view.gfns >= 1024).any() and view.private.any() and not view.private.all()
    _agree(ctx.machine, ())
