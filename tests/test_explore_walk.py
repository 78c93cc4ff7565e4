"""The monitor's short page-table read (:func:`leaf_ptes`) against the table walk it replaces."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PMD_SHIFT
from kvmpoison.arch.x86.physmem import LINE_TD
from kvmpoison.explore.invariants import _FEW_REGIONS, leaf_ptes, td_data_mask
from kvmpoison.explore.statemachine import GFNS, state_machine
from kvmpoison.mm.pagetable import PageTables

PAGE = 1 << PAGE_SHIFT


def _walk(pt: PageTables, start: int, end: int) -> tuple[npt.NDArray[np.int64],
                                                          npt.NDArray[np.uint64]]:
    addrs = [ch.addr for ch in pt.chunks(start, end)]
    raws = [pt.store.rows[ch.rows, ch.cols] for ch in pt.chunks(start, end)]
    if not addrs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    return np.concatenate(addrs), np.concatenate(raws)


def _same(pt: PageTables, start: int, end: int) -> int:
    got_a, got_r = leaf_ptes(pt, start, end)
    want_a, want_r = _walk(pt, start, end)
    assert got_a.tolist() == want_a.tolist(), (hex(start), hex(end))
    assert got_r.tolist() == want_r.tolist(), (hex(start), hex(end))
    return int((want_r != 0).sum())


@pytest.mark.parametrize("design", ["baseline", "rfc-v2", "gmem", "hardened"])
def test_leaf_ptes_reads_what_the_walk_reads(design: str) -> None:
    """Over the EPT and the VMM's page tables of a machine the explorer has stepped (two
    VMs, shared and private gfns, a fork, a punched hole): the same addresses and entries
    as the chunk walk, for the RAM range, ranges cut inside a 2 MiB region, one spanning
    more regions than the short read takes (the walk's path), and an empty one."""
    sm = state_machine(design, ())()
    for gfn in GFNS:
        sm.guest_store(gfn << PAGE_SHIFT, 7)
        sm.vmm_path("load", gfn << PAGE_SHIFT)
    sm.guest_share(GFNS[1] << PAGE_SHIFT)
    sm.vmm_fork_child_load(GFNS[0] << PAGE_SHIFT)
    sm.vmm_punch_hole(GFNS[2] << PAGE_SHIFT)
    sm.host_second_vm("vm1")
    sm.guest_vm1_store(GFNS[0] << PAGE_SHIFT, 9)
    present = 0
    for inst in sm.m.instances.values():
        mm = inst.vmm.proc.task.mm
        assert mm is not None
        size = inst.vmm.ram_size
        for pt, base in ((inst.vm.ept, 0), (mm.pgd, inst.vmm.ram_hva)):
            present += _same(pt, base, base + size)
            present += _same(pt, base + 3 * PAGE, base + size - 5 * PAGE)
            present += _same(pt, base, base)
            wide = (_FEW_REGIONS + 2) << PMD_SHIFT
            lo = max(0, base - wide // 2) & ~(PAGE - 1)
            present += _same(pt, lo, lo + wide)
    assert present > 0  # the ranges held entries to compare


@pytest.mark.parametrize("design", ["baseline", "rfc-v2", "gmem"])
def test_td_data_mask_agrees_with_each_frames_form(design: str) -> None:
    """For every pfn, and for a few out of order: TD data exactly where the frame's own form
    says so (a stored frame: a line written with LINE_TD; a zero-form frame: a TD-private
    KeyID), after guest writes, a share, a reboot and a punched hole."""
    sm = state_machine(design, ())()
    for gfn in GFNS:
        sm.guest_store(gfn << PAGE_SHIFT, 3)
    sm.guest_share(GFNS[0] << PAGE_SHIFT)
    sm.vmm_punch_hole(GFNS[1] << PAGE_SHIFT)
    sm.guest_reboot("vm0")
    sm.guest_store(GFNS[2] << PAGE_SHIFT, 4)
    m = sm.m
    hw = m.kernel.core.hw
    phys = hw.mem
    # A stored frame's zero-form state is not its state: make each one say the opposite of
    # the frame's lines, so that a mask reading it for a stored frame fails.
    private = [hw.cfg.keyids.is_private(k) for k, _ in phys.zero_states]
    assert True in private and False in private
    for pfn in np.flatnonzero(phys.slot_of):
        lines_td = bool((phys.flags[phys.slot(int(pfn))] & LINE_TD).any())
        phys.zstate[pfn] = private.index(not lines_td)

    def td(pfn: int) -> bool:
        slot = phys.slot(pfn)
        if slot >= 0:
            return bool((phys.flags[slot] & LINE_TD).any())
        return hw.cfg.keyids.is_private(phys.zero_state(pfn)[0])

    every = np.arange(m.kernel.core.pages.nr_pages, dtype=np.int64)
    want = [td(int(p)) for p in every]
    assert td_data_mask(m, every).tolist() == want
    some = every[[7, 3, len(every) - 1, 3]]
    assert td_data_mask(m, some).tolist() == [want[int(p)] for p in some]
    stored = [int(p) for p in every if phys.slot(int(p)) >= 0]
    assert stored and any(want[p] for p in stored)  # stored frames with TD data were tested
