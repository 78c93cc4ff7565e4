"""I8: no CPU keeps a cached translation that allows more than the PTE it came from now does.

Each CPU's TLB (:mod:`kvmpoison.arch.x86.tlb`) caches whole leaf PTEs per (mm, page). An
entry is stale when the current PTE would not give the same access: it is no longer
present to the hardware (none, a swap or hwpoison entry, PROT_NONE), it names another
pfn, or it lost a permission the entry still grants (write, user, execute). A lost
Accessed or Dirty bit is not stale: x86 clears Accessed without a flush
(``ptep_clear_flush_young`` only flushes on other architectures) and the walker sets
Dirty again on a write through a clean entry. A permission the PTE gained needs no flush
(the access faults, the walk finds the new PTE). Entries of an mm that no longer exists
are left out: its ident is never reused, so nothing translates through them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SHIFT,
    PMD_SHIFT,
    PTRS_PER_PTE,
)
from kvmpoison.machine import Machine

U64 = npt.NDArray[np.uint64]
PFN_MASK = np.uint64(((1 << 40) - 1) << PAGE_SHIFT)
_REGION_BITS = 48 - PMD_SHIFT  # a 2 MiB region's number in a 48-bit address space
_NX = np.uint64(_PAGE_NX)
_GRANT = np.uint64(_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_NX)


@dataclass(frozen=True)
class StaleEntry:
    cpu: int
    mm: int  # the mm's ident (the TLB's address-space tag)
    vaddr: int
    cached: int
    current: int


def stale_mask(cached: U64, current: U64) -> npt.NDArray[np.bool_]:
    """Which cached PTEs grant an access their current PTE does not (see the module doc):
    another pfn, or a grant (present, write, user; execute is NX clear) the PTE lost."""
    moved = (cached ^ current) & PFN_MASK
    lost = (cached ^ _NX) & ~(current ^ _NX) & _GRANT
    return np.asarray((moved | lost) != 0, dtype=np.bool_)


def stale_tlb_entries(m: Machine) -> list[StaleEntry]:
    """Every stale entry of every CPU, compared with the page tables in one gather: one
    table walk per (mm, 2 MiB region) the entries fall in, never one per entry."""
    core = m.kernel.core
    cpus = [c for c in core.cpus if len(c.tlb)]
    if not cpus:
        return []
    sizes = [len(c.tlb) for c in cpus]
    n = sum(sizes)
    keys = np.fromiter(chain.from_iterable(chain.from_iterable(c.tlb._entries.keys()
                                                               for c in cpus)),
                       dtype=np.int64, count=2 * n).reshape(n, 2)
    cached = np.fromiter(chain.from_iterable(c.tlb._entries.values() for c in cpus),
                         dtype=np.uint64, count=n)
    vpns = keys[:, 1]
    shift = PMD_SHIFT - PAGE_SHIFT
    group = (keys[:, 0] << _REGION_BITS) | (vpns >> shift)
    uniq = np.unique(group)
    which = np.searchsorted(uniq, group)
    rows = np.full(len(uniq), -1, dtype=np.int64)  # -1: no leaf table, -2: the mm is gone
    for k, g in enumerate(uniq.tolist()):
        mm = core.mms.get(g >> _REGION_BITS)
        if mm is None:
            rows[k] = -2
            continue
        slot = mm.pgd.pte_slot((g & ((1 << _REGION_BITS) - 1)) << PMD_SHIFT)
        if slot is not None:
            rows[k] = slot[0]
    row = rows[which]
    current = np.where(row >= 0, core.ptes.rows[np.maximum(row, 0), vpns & (PTRS_PER_PTE - 1)],
                       np.uint64(0))
    bad = np.flatnonzero((row != -2) & stale_mask(cached, current))
    if not len(bad):
        return []
    cpu_ids = np.repeat(np.array([c.cpu_id for c in cpus], dtype=np.int64), sizes)
    return [StaleEntry(int(cpu_ids[i]), int(keys[i, 0]), int(vpns[i]) << PAGE_SHIFT,
                       int(cached[i]), int(current[i])) for i in bad]
