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
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.explore.arrays import nonzero
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
    another pfn, or a grant (present, write, user; execute is NX clear) the PTE lost.

    With ``c = cached ^ NX`` and ``p = current ^ NX`` (a grant as a set bit), a lost grant
    is ``c & ~p``, which is ``c & (c ^ p)``, and ``c ^ p`` is ``cached ^ current``: one
    difference serves both tests."""
    diff = cached ^ current
    grants = ((cached ^ _NX) & _GRANT) | PFN_MASK
    return np.asarray((diff & grants) != 0, dtype=np.bool_)


# Up to this many entries are compared one by one: below it a Python pass over the few
# entries costs less than the two dozen numpy calls of the gather (about 1 us each).
_FEW_ENTRIES = 64


def stale_tlb_entries(m: Machine) -> list[StaleEntry]:
    """Every stale entry of every CPU. Many entries are compared with the page tables in one
    gather (one PTE-table look-up per (mm, 2 MiB region) they fall in, never one per
    entry); a few, one by one (the explorer's TLBs hold a handful)."""
    core = m.kernel.core
    cpus = [c for c in core.cpus if c.tlb._entries]
    if not cpus:
        return []
    sizes = [len(c.tlb._entries) for c in cpus]
    if sum(sizes) <= _FEW_ENTRIES:
        return _stale_few(m)
    return _stale_gathered(m, cpus, sizes)


def _pte_row(m: Machine, mm_id: int, region: int) -> int:
    """The PTE table's row of ``region`` (a 2 MiB region's number) of an mm; -1: no PTE
    table there, -2: the mm is gone."""
    mm = m.kernel.core.mms.get(mm_id)
    if mm is None:
        return -2
    slot = mm.pgd.pte_slot(region << PMD_SHIFT)
    return -1 if slot is None else slot[0]


def _stale_few(m: Machine) -> list[StaleEntry]:
    """:func:`stale_mask` per entry, in Python integers."""
    core = m.kernel.core
    table = core.ptes.rows
    rows: dict[tuple[int, int], int] = {}
    out = []
    pfn_mask, nx, grant = int(PFN_MASK), int(_NX), int(_GRANT)
    shift = PMD_SHIFT - PAGE_SHIFT
    for cpu in core.cpus:
        for (mm_id, vpn), pte in cpu.tlb._entries.items():
            cached = int(pte)
            key = (mm_id, vpn >> shift)
            row = rows.get(key)
            if row is None:
                row = rows[key] = _pte_row(m, mm_id, vpn >> shift)
            if row == -2:
                continue
            current = int(table[row, vpn & (PTRS_PER_PTE - 1)]) if row >= 0 else 0
            if (cached ^ current) & (((cached ^ nx) & grant) | pfn_mask):
                out.append(StaleEntry(cpu.cpu_id, mm_id, vpn << PAGE_SHIFT, cached, current))
    return out


def _stale_gathered(m: Machine, cpus: list[Cpu], sizes: list[int]) -> list[StaleEntry]:
    core = m.kernel.core
    n = sum(sizes)
    keys = np.fromiter(chain.from_iterable(chain.from_iterable(c.tlb._entries.keys()
                                                               for c in cpus)),
                       dtype=np.int64, count=2 * n).reshape(n, 2)
    cached = np.fromiter(chain.from_iterable(c.tlb._entries.values() for c in cpus),
                         dtype=np.uint64, count=n)
    vpns = keys[:, 1]
    group = (keys[:, 0] << _REGION_BITS) | (vpns >> (PMD_SHIFT - PAGE_SHIFT))
    uniq = np.unique(group)
    look = np.array([_pte_row(m, g >> _REGION_BITS, g & ((1 << _REGION_BITS) - 1))
                     for g in uniq.tolist()], dtype=np.int64)
    row = look[np.searchsorted(uniq, group)]
    current = core.ptes.rows[np.maximum(row, 0), vpns & (PTRS_PER_PTE - 1)]
    current[row < 0] = 0
    bad = nonzero(stale_mask(cached, current) & (row != -2))
    cpu_ids = np.repeat(np.array([c.cpu_id for c in cpus], dtype=np.int64), sizes)
    return [StaleEntry(int(cpu_ids[i]), int(keys[i, 0]), int(vpns[i]) << PAGE_SHIFT,
                       int(cached[i]), int(current[i])) for i in bad]
