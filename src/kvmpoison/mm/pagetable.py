"""Per-process 4-level page tables whose table pages come from the page allocator.

Follows the x86-64 4-level layout (``arch/x86/include/asm/pgtable_64_types.h``,
P4D folded): PGD -> PUD -> PMD -> PTE, 512 entries each. Upper levels hold
raw entries ``pfn | _PAGE_TABLE`` naming the table page below. Every leaf
PTE table is one row of a machine-wide ``uint64[n, 512]`` store, so range
operations gather and scatter PTEs with numpy, one chunk per PUD (1 GiB).

A PMD slot holds either a PTE table (``children[i]`` is its row) or a PMD
leaf: a transparent huge page (``_PAGE_PSE``) or a non-present PMD entry,
with ``children[i] is None`` and the raw value in ``entries[i]``. The PTE
walkers (``chunks``, ``get``) see no PTEs under a leaf; asking to build a
PTE table over one is a model bug (the kernel splits the PMD first). A THP
mapping deposits a PTE table page (``pgtable_trans_huge_deposit``) that a
split withdraws; it counts in ``nr_ptes`` as in the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SHIFT,
    PMD_SHIFT,
    PTRS_PER_PTE,
    PUD_SHIFT,
)
from kvmpoison.arch.x86.physmem import lazy_zeros
from kvmpoison.mm.page_alloc import BuddyAllocator
from kvmpoison.mm.page_flags import PG_PGTABLE_BIT

PGDIR_SHIFT = 39
ADDRESS_BITS = PGDIR_SHIFT + 9  # what a 4-level table translates: 48 bits (256 TiB)
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
TASK_SIZE = 1 << 47
_PGTABLE = np.uint32(1 << PG_PGTABLE_BIT)

U64Array = npt.NDArray[np.uint64]
IntArray = npt.NDArray[np.int64]


class AddressWidthError(AssertionError):
    """A walk beyond what a 4-level table translates: a bug of the caller, never wrapped."""


def _check_width(start: int, end: int) -> None:
    if start < 0 or end > 1 << ADDRESS_BITS:
        raise AddressWidthError(f"page-table walk [{start:#x}, {end:#x}) is beyond the "
                                f"{ADDRESS_BITS}-bit range a 4-level table translates")


class PteStore:
    """Every leaf page-table page of the machine, one ``uint64[512]`` row each."""

    def __init__(self, capacity: int = 64) -> None:
        # An anonymous mapping: rows never used cost no memory, so reserve generously.
        self.rows: U64Array = lazy_zeros((capacity, PTRS_PER_PTE), np.uint64)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._high = 0  # rows at or above this were never handed out (still zero)

    def __deepcopy__(self, memo: dict[int, object]) -> PteStore:
        """A copy sharing nothing; only rows ever handed out are copied (the rest is calloc)."""
        new = PteStore.__new__(PteStore)
        memo[id(self)] = new
        new.rows = lazy_zeros(self.rows.shape, np.uint64)
        new.rows[: self._high] = self.rows[: self._high]
        new._free = list(self._free)
        new._high = self._high
        return new

    def alloc_row(self) -> int:
        if not self._free:
            old = len(self.rows)
            grown = lazy_zeros((old * 2, PTRS_PER_PTE), np.uint64)
            grown[:old] = self.rows
            self.rows = grown
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self._high = max(self._high, row + 1)
        return row

    def free_row(self, row: int) -> None:
        self.rows[row] = 0
        self._free.append(row)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


def _next_table(children: list[_Table | int | None], i: int) -> int:
    """The first slot after ``i`` holding a table (PTRS_PER_PTE: none): the tables in use
    are usually all below, so the empty tail is told by one ``count``."""
    rest = children[i + 1 :]
    if rest.count(None) == len(rest):
        return PTRS_PER_PTE
    return next(j for j in range(i + 1, PTRS_PER_PTE) if children[j] is not None)


class _Table:
    """A PGD, PUD or PMD page: raw entries plus the model's link to the level below."""

    __slots__ = ("children", "entries", "pfn")

    def __init__(self, pfn: int):
        self.pfn = pfn
        self.entries: U64Array = np.zeros(PTRS_PER_PTE, dtype=np.uint64)
        self.children: list[_Table | int | None] = [None] * PTRS_PER_PTE

    def __deepcopy__(self, memo: dict[int, object]) -> _Table:
        new = _Table.__new__(_Table)
        memo[id(self)] = new
        new.pfn = self.pfn
        new.entries = self.entries.copy()
        new.children = list(self.children)
        for i in np.flatnonzero(self.entries).tolist():  # only present entries hold tables
            child = new.children[i]
            if isinstance(child, _Table):
                new.children[i] = child.__deepcopy__(memo)
        return new


@dataclass(frozen=True, slots=True)
class PteChunk:
    """Leaf PTE slots of a range, at most one PUD (1 GiB) wide.

    ``addr``/``rows``/``cols`` are parallel arrays, one element per page whose
    PTE table exists; pages without a table are left out.
    """

    addr: IntArray
    rows: IntArray
    cols: IntArray


_NONE = np.empty(0, dtype=np.int64)
_NONE.flags.writeable = False
_NO_PTES = PteChunk(_NONE, _NONE, _NONE)  # a PMD table with no PTE table below it


class PageTables:
    """One mm's page tables."""

    def __init__(self, store: PteStore, alloc: BuddyAllocator, table_flags: int = _PAGE_TABLE):
        self.store = store
        self.alloc = alloc
        self.table_flags = table_flags  # what a non-leaf entry carries beside the pfn
        self._rows: dict[int, int] = {}  # addr >> PMD_SHIFT -> leaf row (a walk cache)
        self.nr_ptes = 0  # leaf tables, like mm->pgtables_bytes / PAGE_SIZE
        self.nr_pmd_leaves = 0  # PMD leaves (THP or non-present); 0 keeps every walk PTE-only
        self.deposited: dict[int, int] = {}  # addr >> PMD_SHIFT -> deposited PTE table pfn
        self.pgd = _Table(self._alloc_table_page())

    def _alloc_table_page(self) -> int:
        page = self.alloc.alloc_pages(0)
        if page is None:
            raise MemoryError("out of memory for page tables")
        self.alloc.mem.flags[page.pfn] |= _PGTABLE
        return page.pfn

    def _free_table_pages(self, pfns: list[int]) -> None:
        if not pfns:
            return
        mem = self.alloc.mem
        arr = np.array(pfns, dtype=np.int64)
        mem.flags[arr] &= ~_PGTABLE
        mem._refcount[arr] = 0
        self.alloc.free_pages_bulk(arr)

    @staticmethod
    def _index(addr: int, shift: int) -> int:
        return (addr >> shift) & (PTRS_PER_PTE - 1)

    def _pmd_table(self, addr: int, alloc: bool) -> _Table | None:
        _check_width(addr, addr + 1)
        table = self.pgd
        for shift in (PGDIR_SHIFT, PUD_SHIFT):
            i = self._index(addr, shift)
            child = table.children[i]
            if child is None:
                if not alloc:
                    return None
                child = _Table(self._alloc_table_page())
                table.children[i] = child
                table.entries[i] = np.uint64((child.pfn << PAGE_SHIFT) | self.table_flags)
            assert isinstance(child, _Table)
            table = child
        return table

    def pte_slot(self, addr: int, alloc: bool = False) -> tuple[int, int] | None:
        """(row, column) of the PTE for ``addr``; ``alloc`` builds missing tables.

        An address the four levels cannot translate (at or above 2^48) raises
        :class:`AddressWidthError`: asking for it is a bug in the caller.
        """
        cached = self._rows.get(addr >> PMD_SHIFT)
        if cached is not None:
            return cached, (addr >> PAGE_SHIFT) & (PTRS_PER_PTE - 1)
        pmd = self._pmd_table(addr, alloc)
        if pmd is None:
            return None
        i = self._index(addr, PMD_SHIFT)
        row = pmd.children[i]
        if row is None:
            if not alloc:
                return None
            if pmd.entries[i]:
                raise AssertionError(f"PTE table wanted under the PMD leaf at {addr:#x} "
                                     "(split_huge_pmd first)")
            row = self.store.alloc_row()
            pfn = self._alloc_table_page()
            pmd.children[i] = row
            pmd.entries[i] = np.uint64((pfn << PAGE_SHIFT) | self.table_flags)
            self.nr_ptes += 1
        assert isinstance(row, int)
        self._rows[addr >> PMD_SHIFT] = row
        return row, self._index(addr, PAGE_SHIFT)

    def pmd_entry(self, addr: int) -> int:
        pmd = self._pmd_table(addr, False)
        return 0 if pmd is None else int(pmd.entries[self._index(addr, PMD_SHIFT)])

    # -- PMD leaves (transparent huge pages) -------------------------------------

    def pmd_leaf(self, addr: int) -> int:
        """The raw PMD leaf for ``addr``: 0 when the slot is none or holds a PTE table."""
        if not self.nr_pmd_leaves:
            return 0
        pmd = self._pmd_table(addr, False)
        if pmd is None:
            return 0
        i = self._index(addr, PMD_SHIFT)
        return 0 if pmd.children[i] is not None else int(pmd.entries[i])

    def pmd_none(self, addr: int) -> bool:
        """``pmd_none`` (arch/x86/include/asm/pgtable.h, v5.12, 6.1): no PTE table and no
        leaf in the slot of ``addr``."""
        return self.pmd_entry(addr) == 0

    def set_pmd(self, addr: int, value: int) -> None:
        """``set_pmd_at`` of a leaf (huge or non-present) into a slot without a PTE table."""
        pmd = self._pmd_table(addr, True)
        assert pmd is not None
        i = self._index(addr, PMD_SHIFT)
        if pmd.children[i] is not None:
            raise AssertionError(f"PMD leaf over the PTE table at {addr:#x}")
        self.nr_pmd_leaves += int(value != 0) - int(pmd.entries[i] != 0)
        pmd.entries[i] = np.uint64(value)

    def pmdp_huge_get_and_clear(self, addr: int) -> int:
        """``pmdp_huge_get_and_clear`` (arch/x86/include/asm/pgtable.h, v5.12, 6.1): clear
        the leaf of ``addr``'s slot, return it."""
        old = self.pmd_leaf(addr)
        if old:
            self.set_pmd(addr, 0)
        return old

    def pmd_leaf_slots(self, start: int, end: int) -> Iterator[tuple[_Table, IntArray, IntArray]]:
        """Per PMD table overlapping [start, end): (table, slot indices, 2 MiB-aligned
        addresses) of its PMD leaves, as arrays, for the vectorised THP range paths."""
        if not self.nr_pmd_leaves or start >= end:
            return
        _check_width(start, end)
        addr = start & ~((1 << PMD_SHIFT) - 1)
        while addr < end:
            pud_end = ((addr >> PUD_SHIFT) + 1) << PUD_SHIFT
            pmd = self._pmd_table(addr, False)
            if pmd is not None:
                first = self._index(addr, PMD_SHIFT)
                last = self._index(min(pud_end, end) - 1, PMD_SHIFT)
                idx = first + np.flatnonzero(self._leaf_mask(pmd, first, last))
                if len(idx):
                    base = (addr >> PUD_SHIFT) << PUD_SHIFT
                    yield pmd, idx, base + (idx << PMD_SHIFT)
            addr = pud_end

    def pmd_table_spans(self, start: int, end: int) -> list[tuple[_Table, int, int]]:
        """(PMD table, first slot, last slot) for each PMD table that covers part of
        [start, end), for range paths that read whole spans of PMD entries (a huge
        PMD is the entry with PSE: no table pointer of this mm carries it)."""
        if start >= end:
            return []
        _check_width(start, end)
        assert not self.table_flags & _PAGE_PSE
        out = []
        addr = start
        while addr < end:
            pud_end = min(((addr >> PUD_SHIFT) + 1) << PUD_SHIFT, end)
            pmd = self._pmd_table(addr, False)
            if pmd is not None:
                out.append((pmd, self._index(addr, PMD_SHIFT),
                            self._index(pud_end - 1, PMD_SHIFT)))
            addr = pud_end
        return out

    def _table_mask(self, pmd: _Table, first: int, last: int) -> npt.NDArray[np.bool_]:
        """Which PMD slots first..last point to a PTE table (see :meth:`_leaf_mask`)."""
        vals = pmd.entries[first : last + 1]
        if not self.nr_pmd_leaves:
            return np.asarray(vals != 0, dtype=bool)
        if self.table_flags & _PAGE_PRESENT and not self.table_flags & _PAGE_PSE:
            kind = vals & np.uint64(_PAGE_PSE | _PAGE_PRESENT)
            return np.asarray(kind == np.uint64(_PAGE_PRESENT), dtype=bool)
        return np.asarray((vals != 0) & ~self._leaf_mask(pmd, first, last), dtype=bool)

    def _leaf_mask(self, pmd: _Table, first: int, last: int) -> npt.NDArray[np.bool_]:
        """Which PMD slots first..last hold a leaf, from the entries alone: a table
        pointer is present without PSE (the x86 and EPT rule for a PMD entry), so a
        non-zero entry with PSE set or PRESENT clear is a leaf. Tables whose pointer
        flags would not fit that rule are asked slot by slot."""
        vals = pmd.entries[first : last + 1]
        if self.table_flags & _PAGE_PRESENT and not self.table_flags & _PAGE_PSE:
            kind = vals & np.uint64(_PAGE_PSE | _PAGE_PRESENT)
            return np.asarray((vals != 0) & (kind != np.uint64(_PAGE_PRESENT)), dtype=bool)
        return np.fromiter((bool(v) and c is None for v, c in
                            zip(vals.tolist(), pmd.children[first : last + 1], strict=True)),
                           dtype=bool, count=len(vals))

    def pmd_leaves(self, start: int, end: int) -> list[tuple[int, int]]:
        """(PMD-aligned address, raw leaf) of every PMD leaf overlapping [start, end)."""
        return [(int(a), int(table.entries[i])) for table, idx, addrs in
                self.pmd_leaf_slots(start, end) for i, a in zip(idx, addrs, strict=True)]

    def clear_pmd_leaves(self, groups: list[tuple[_Table, IntArray, IntArray]]) -> None:
        """``pmdp_huge_get_and_clear`` + ``zap_deposited_table`` for many leaves, given as
        (PMD table, slot indices, addresses) per table: the entries go and all their
        deposited tables are freed in one batch."""
        pfns: list[int] = []
        for table, idx, addrs in groups:
            table.entries[idx] = 0
            self.nr_pmd_leaves -= len(idx)
            # dict.pop mapped over the keys: a C loop, no bytecode per PMD
            pfns += map(self.deposited.pop, (addrs >> PMD_SHIFT).tolist())
        self._free_table_pages(pfns)
        self.nr_ptes -= len(pfns)

    def lookup_address(self, addr: int) -> tuple[int, int]:
        """arch/x86/mm/pat/set_memory.c ``lookup_address_in_pgd`` for a user address:
        (raw entry, level) with level 2 (PG_LEVEL_2M) for a PMD leaf, else the PTE
        and level 1 (PG_LEVEL_4K); (0, 0) when no table reaches ``addr``.
        """
        leaf = self.pmd_leaf(addr)
        if leaf:
            return leaf, 2
        slot = self.pte_slot(addr)
        return (0, 0) if slot is None else (int(self.store.rows[slot]), 1)

    def pgtable_trans_huge_deposit(self, addr: int) -> None:
        """mm/pgtable-generic.c ``pgtable_trans_huge_deposit`` (v5.12, 6.1; with
        ``pte_alloc_one`` and ``mm_inc_nr_ptes``): a PTE table page kept for a later split
        of this PMD."""
        key = addr >> PMD_SHIFT
        assert key not in self.deposited, f"a table is already deposited at {addr:#x}"
        self.deposited[key] = self._alloc_table_page()
        self.nr_ptes += 1

    def zap_deposited_table(self, addr: int) -> None:
        """mm/huge_memory.c ``zap_deposited_table`` (v5.12, 6.1): withdraw, free,
        ``mm_dec_nr_ptes``."""
        pfn = self.deposited.pop(addr >> PMD_SHIFT)
        self._free_table_pages([pfn])
        self.nr_ptes -= 1

    def pmd_populate_withdrawn(self, addr: int, ptes: U64Array) -> None:
        """``pgtable_trans_huge_withdraw`` + ``pmd_populate`` + the 512 ``set_pte_at`` of
        a split: the deposited table becomes the slot's PTE table, filled with ``ptes``.
        The caller cleared the leaf first."""
        pmd = self._pmd_table(addr, False)
        assert pmd is not None
        i = self._index(addr, PMD_SHIFT)
        assert pmd.children[i] is None and not pmd.entries[i]
        pfn = self.deposited.pop(addr >> PMD_SHIFT)
        row = self.store.alloc_row()
        self.store.rows[row] = ptes
        pmd.children[i] = row
        pmd.entries[i] = np.uint64((pfn << PAGE_SHIFT) | self.table_flags)
        self._rows[addr >> PMD_SHIFT] = row

    def pmd_install_leaf_over_table(self, addr: int) -> None:
        """khugepaged's ``pmdp_collapse_flush`` + ``pgtable_trans_huge_deposit``: detach
        the PTE table of ``addr``'s slot and deposit its page (it stays counted in
        ``nr_ptes``); the slot is none until the caller sets the huge PMD."""
        pmd = self._pmd_table(addr, False)
        assert pmd is not None
        i = self._index(addr, PMD_SHIFT)
        row = pmd.children[i]
        assert isinstance(row, int)
        pfn = int(pmd.entries[i]) >> PAGE_SHIFT & ((1 << 40) - 1)
        pmd.children[i] = None
        pmd.entries[i] = 0
        self._rows.pop(addr >> PMD_SHIFT, None)
        self.store.free_row(row)
        self.deposited[addr >> PMD_SHIFT] = pfn

    def get(self, addr: int) -> int:
        """The raw PTE for ``addr`` (0 where no table exists)."""
        slot = self.pte_slot(addr)
        return 0 if slot is None else int(self.store.rows[slot])

    def set(self, addr: int, value: int) -> None:
        """``set_pte_at``; builds tables as needed."""
        slot = self.pte_slot(addr, alloc=True)
        assert slot is not None
        self.store.rows[slot] = np.uint64(value)

    def chunks(self, start: int, end: int, alloc: bool = False) -> Iterator[PteChunk]:
        """Leaf PTE slots of [start, end), one PUD-sized chunk at a time.

        Without ``alloc``, regions with no PUD or PMD table are skipped whole,
        so a walk costs what is mapped, not the size of the range. A range
        beyond ``ADDRESS_BITS`` raises :class:`AddressWidthError`: the table
        index would wrap around the 512-entry PGD.
        """
        _check_width(start, end)
        addr = start
        while addr < end:
            pud_end = min(((addr >> PUD_SHIFT) + 1) << PUD_SHIFT, end)
            if not alloc:
                g = self._index(addr, PGDIR_SHIFT)
                pud = self.pgd.children[g]
                if pud is None:  # on to the next 512 GiB that has a PUD table
                    addr = min(_next_table(self.pgd.children, g) << PGDIR_SHIFT, end)
                    continue
                assert isinstance(pud, _Table)
                i = self._index(addr, PUD_SHIFT)
                if pud.children[i] is None:  # on to the next GiB that has a PMD table
                    nxt = _next_table(pud.children, i)
                    addr = min(((addr >> PGDIR_SHIFT) << PGDIR_SHIFT) + (nxt << PUD_SHIFT), end)
                    continue
            pmd = self._pmd_table(addr, alloc)
            if pmd is not None:
                chunk = self._chunk(pmd, addr, pud_end, alloc)
                if len(chunk.addr):
                    yield chunk
            addr = pud_end

    def _chunk(self, pmd: _Table, start: int, end: int, alloc: bool) -> PteChunk:
        first = self._index(start, PMD_SHIFT)
        last = self._index(end - 1, PMD_SHIFT)
        if alloc:
            for i in range(first, last + 1):
                if pmd.children[i] is None:
                    self.pte_slot((start & ~((1 << PUD_SHIFT) - 1)) | (i << PMD_SHIFT), alloc)
        # Only the PMD ranges that have a PTE table: the cost is what is mapped, and no
        # temporary spans the whole (up to 1 GiB) range. Slots that are none or PMD
        # leaves (THP) are skipped by their entries, without a look at each child.
        present = np.flatnonzero(self._table_mask(pmd, first, last))
        if not len(present):
            return _NO_PTES
        rows = np.fromiter(map(pmd.children.__getitem__, (first + present).tolist()),
                           dtype=np.int64, count=len(present))
        pud_page = (start >> PUD_SHIFT) << (PUD_SHIFT - PAGE_SHIFT)
        pmd_no = first + present
        lo = np.maximum(pud_page + pmd_no * PTRS_PER_PTE, start >> PAGE_SHIFT)
        hi = np.minimum(pud_page + (pmd_no + 1) * PTRS_PER_PTE, end >> PAGE_SHIFT)
        counts = hi - lo
        starts = np.cumsum(counts) - counts
        pages = np.repeat(lo - starts, counts) + np.arange(int(counts.sum()), dtype=np.int64)
        page_rows = np.repeat(rows, counts)
        return PteChunk(pages << PAGE_SHIFT, page_rows, pages & (PTRS_PER_PTE - 1))

    def free_empty_tables(self, start: int, end: int) -> int:
        """``free_pgd_range``: free the empty leaf tables of the PMD ranges [start, end) touches.

        The caller passes a range no VMA uses any more (floor/ceiling applied).
        """
        freed: list[int] = []
        addr = (start >> PMD_SHIFT) << PMD_SHIFT
        stop = ((end + (1 << PMD_SHIFT) - 1) >> PMD_SHIFT) << PMD_SHIFT
        while addr < stop:  # one PMD table (1 GiB) at a time; its PTE tables by their entries
            pud_end = min(((addr >> PUD_SHIFT) + 1) << PUD_SHIFT, stop)
            if self.pgd.children[self._index(addr, PGDIR_SHIFT)] is None:
                addr = min(((addr >> PGDIR_SHIFT) + 1) << PGDIR_SHIFT, stop)
                continue
            pmd = self._pmd_table(addr, False)
            if pmd is not None:
                first = self._index(addr, PMD_SHIFT)
                last = self._index(pud_end - 1, PMD_SHIFT)
                slots = first + np.flatnonzero(self._table_mask(pmd, first, last))
                if len(slots):
                    rows = np.fromiter(map(pmd.children.__getitem__, slots.tolist()),
                                       dtype=np.int64, count=len(slots))
                    empty = ~self.store.rows[rows].any(axis=1)
                    base = (addr >> PUD_SHIFT) << (PUD_SHIFT - PMD_SHIFT)
                    for i, row in zip(slots[empty].tolist(), rows[empty].tolist(), strict=True):
                        pfn = int(pmd.entries[i]) >> PAGE_SHIFT & ((1 << 40) - 1)
                        pmd.children[i] = None
                        pmd.entries[i] = 0
                        self._rows.pop(base + i, None)
                        self.store.free_row(row)
                        freed.append(pfn)
                        self.nr_ptes -= 1
            addr = pud_end
        self._free_table_pages(freed)
        return len(freed)

    def all_table_pfns(self) -> list[int]:
        out = [self.pgd.pfn]
        for pud in self.pgd.children:
            if isinstance(pud, _Table):
                out.append(pud.pfn)
                for pmd in pud.children:
                    if isinstance(pmd, _Table):
                        out.append(pmd.pfn)
                        out.extend(int(e) >> PAGE_SHIFT & ((1 << 40) - 1)
                                   for e, c in zip(pmd.entries, pmd.children, strict=True)
                                   if c is not None)
        return out

    def destroy(self) -> None:
        """Free every table page (exit_mmap); leaf tables must be empty by now."""
        self._rows.clear()
        pfns: list[int] = []
        for pud in self.pgd.children:
            if not isinstance(pud, _Table):
                continue
            for pmd in pud.children:
                if not isinstance(pmd, _Table):
                    continue
                for i, row in enumerate(pmd.children):
                    if isinstance(row, int):
                        self.store.free_row(row)
                        pfns.append(int(pmd.entries[i]) >> PAGE_SHIFT & ((1 << 40) - 1))
                pfns.append(pmd.pfn)
            pfns.append(pud.pfn)
        pfns.append(self.pgd.pfn)
        pfns.extend(self.deposited.values())
        self.deposited.clear()
        self._free_table_pages(pfns)
        self.nr_ptes = 0
        self.nr_pmd_leaves = 0
