"""GPA page-state maps: every guest page of a VM, step by step through a scenario.

One state per guest frame number, read in bulk (numpy over the page cache, the
EPT's and the VMM's leaf tables, and the struct page flags):

* ``unmapped``: no frame backs the page yet (not in the RAM file's page cache,
  not in the EPT, not present in the VMM);
* ``shared``: the guest uses the page as shared (bounce buffers, kvmclock);
* ``private``: guest-private, and the host can still map the frame;
* ``poisoned``: the frame's struct page has PG_hwpoison: the RFC's protection,
  or a memory error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import _PAGE_PRESENT, PAGE_SHIFT, PMD_SHIFT, PTE_PFN_MASK
from kvmpoison.arch.x86.vmx import VMX_EPT_RWX_MASK
from kvmpoison.machine import Instance, Machine
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.pagetable import PageTables
from kvmpoison.scenario.loader import Scenario
from kvmpoison.scenario.runner import ScenarioRun, run_scenario

UNMAPPED, SHARED, PRIVATE, POISONED = range(4)
STATES = ("unmapped", "shared", "private", "poisoned")
COLOURS = ("#e8e8e8", "#4e9a06", "#3465a4", "#cc0000")

StateRow = npt.NDArray[np.int8]


def _leaf_values(pt: PageTables, start: int, size: int) -> tuple[npt.NDArray[np.int64],
                                                                  npt.NDArray[np.uint64]]:
    """(page index from ``start``, raw entry) for every leaf slot that exists in the range;
    a 2 MiB leaf (a THP's huge PMD, a 2M SPTE) counts as its 512 pages, each entry naming
    its own subpage's pfn."""
    idx, raw = [], []
    for chunk in pt.chunks(start, start + size):
        idx.append((chunk.addr - start) >> PAGE_SHIFT)
        raw.append(pt.store.rows[chunk.rows, chunk.cols].astype(np.uint64))
    sub = np.arange(1 << (PMD_SHIFT - PAGE_SHIFT), dtype=np.int64)
    for addr, leaf in pt.pmd_leaves(start, start + size):
        pages = ((addr - start) >> PAGE_SHIFT) + sub
        inside = (pages >= 0) & (pages < size >> PAGE_SHIFT)
        idx.append(pages[inside])
        raw.append(np.uint64(leaf) + (sub[inside] << PAGE_SHIFT).astype(np.uint64))
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return np.concatenate(idx).astype(np.int64), np.concatenate(raw)


def page_states(m: Machine, inst: Instance) -> StateRow:
    """The state of every guest page of one VM, as an int8 array indexed by gfn."""
    vmm, vm = inst.vmm, inst.vm
    n = vmm.ram_size >> PAGE_SHIFT
    pfn = np.full(n, -1, dtype=np.int64)
    mm = vmm.proc.task.mm
    if mm is not None:  # a present VMM PTE names the frame (anonymous RAM)
        i, raw = _leaf_values(mm.pgd, vmm.ram_hva, vmm.ram_size)
        present = (raw & np.uint64(_PAGE_PRESENT)) != 0
        pfn[i[present]] = ((raw[present] & np.uint64(PTE_PFN_MASK)) >> PAGE_SHIFT).astype(np.int64)
    i, raw = _leaf_values(vm.ept, 0, vmm.ram_size)  # the EPT, over the VMM's view
    present = (raw & np.uint64(VMX_EPT_RWX_MASK)) != 0
    pfn[i[present]] = ((raw[present] & np.uint64(PTE_PFN_MASK)) >> PAGE_SHIFT).astype(np.int64)
    mapping = (vmm.proc.task.fds[vmm.ram_fd].f_mapping
               if vmm.ram_fd is not None and mm is not None else None)
    if mapping is not None:  # the RAM file's page cache wins
        cached = np.asarray(mapping.lookup_range(0, n), dtype=np.int64)
        pfn = np.where(cached >= 0, cached, pfn)
    states = np.full(n, UNMAPPED, dtype=np.int8)
    backed = pfn >= 0
    states[backed] = PRIVATE
    # Shared as the guest uses it, or as KVM records it (the RFC's shared_ranges, at most 32).
    shared = np.zeros(n, dtype=bool)
    for first, last in [*inst.guest.shared, *vm.shared_ranges]:
        shared[max(first, 0):max(min(last, n), 0)] = True
    states[shared & backed] = SHARED
    pages = m.kernel.core.pages
    flags = pages.flags[pfn[backed]]
    poisoned = np.zeros(n, dtype=bool)
    poisoned[backed] = (flags & pages.mask(PG.hwpoison)) != 0
    states[poisoned] = POISONED
    return states


@dataclass
class GpaTrace:
    """Page states of one VM over a scenario run: row 0 before the first step."""

    scenario: str
    design: str
    vm: str
    steps: list[str] = field(default_factory=list)
    rows: list[StateRow] = field(default_factory=list)
    run: ScenarioRun | None = None

    @property
    def grid(self) -> npt.NDArray[np.int8]:
        """steps x gfns (a VM that is gone leaves its last row repeated)."""
        return np.stack(self.rows)


def trace_scenario(sc: Scenario, design: str, vm: str | None = None) -> GpaTrace:
    name = vm or sc.vms[0].name
    trace = GpaTrace(sc.name, design, name)

    def observe(m: Machine) -> None:
        inst = m.instances.get(name)
        if inst is None:  # not created yet (a new_vm step comes later)
            return
        trace.rows.append(page_states(m, inst))

    trace.run = run_scenario(sc, design, observe=observe)
    trace.steps = ["boot"] + [f"{r.step.index} {r.step.op}" for r in trace.run.results]
    return trace


def shown_gfns(traces: Sequence[GpaTrace]) -> npt.NDArray[np.int64]:
    """The gfns some design ever backs (all of them if none is)."""
    width = min(t.grid.shape[1] for t in traces)
    touched = np.zeros(width, dtype=bool)
    for t in traces:
        touched |= (t.grid[:, :width] != UNMAPPED).any(axis=0)
    return np.flatnonzero(touched) if touched.any() else np.arange(width)


def plot_traces(traces: Sequence[GpaTrace], out: Path, title: str) -> Path:
    """One panel per design: step on x, gfn on y, colour = page state. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cmap = ListedColormap(COLOURS)
    gfns = shown_gfns(traces)
    fig, axes = plt.subplots(1, len(traces), figsize=(3.2 * len(traces) + 1.4, 4.6),
                             sharey=True, squeeze=False)
    for ax, t in zip(axes[0], traces, strict=True):
        grid = t.grid[:, gfns]
        ax.imshow(grid.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0,
                  vmax=len(STATES) - 1, origin="lower")
        ax.set_title(t.design, fontsize=10)
        ax.set_xlabel("after step (0: boot)")
        every = max(1, grid.shape[0] // 12)
        ax.set_xticks(list(range(0, grid.shape[0], every)))
        ax.tick_params(labelsize=7)
    every = max(1, len(gfns) // 16)
    axes[0][0].set_yticks(list(range(0, len(gfns), every)))
    axes[0][0].set_yticklabels([f"{g:#x}" for g in gfns[::every]])
    axes[0][0].set_ylabel("gfn (pages never backed are left out)" if len(gfns) < t.grid.shape[1]
                          else "gfn")
    fig.legend(handles=[Patch(color=c, label=s) for c, s in zip(COLOURS, STATES, strict=True)],
               loc="lower center", ncol=len(STATES), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
