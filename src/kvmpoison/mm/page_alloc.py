"""The buddy page allocator, orders 0 to MAX_ORDER-1 (10).

Follows ``mm/page_alloc.c`` (v5.12): ``__free_one_page`` merges a block with
its buddy while the buddy is free at the same order; ``free_pages_prepare``
runs the free-time hooks and keeps hwpoisoned pages out of the free lists
("leaks" them deliberately). Simplifications: one zone, no per-CPU lists,
no migratetypes or watermarks.

Free areas are numpy stacks with lazy deletion: the ``PageBuddy`` bit and
the head's ``order`` are authoritative, and a stale stack entry is dropped
when popped. Bulk allocation and freeing are vectorised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from kvmpoison.mm.page import Page, PageArray
from kvmpoison.mm.page_flags import PG, PG_BUDDY_BIT

MAX_ORDER = 11  # orders 0..10, as in v5.12 (MAX_PAGE_ORDER = 10 in v6.x)
_BUDDY = np.uint32(1 << PG_BUDDY_BIT)

PfnArray = npt.NDArray[np.int64]
_MAX_RUNS = 16  # block runs freed slice by slice; more are gathered by one fancy index
FreeHook = Callable[[PfnArray], None]


def sorted_unique(a: PfnArray) -> PfnArray:
    """``np.unique`` by sort-and-compare (numpy 2's hash-based unique is slower here)."""
    s = np.sort(a)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


class _FreeArea:
    def __init__(self) -> None:
        self.stack = np.empty(64, dtype=np.int64)
        self.top = 0

    def __deepcopy__(self, memo: dict[int, object]) -> _FreeArea:
        new = _FreeArea.__new__(_FreeArea)
        memo[id(self)] = new
        new.stack = self.stack.copy()
        new.top = self.top
        return new

    def push1(self, pfn: int) -> None:
        if self.top == len(self.stack):
            grown = np.empty(2 * len(self.stack), dtype=np.int64)
            grown[: self.top] = self.stack[: self.top]
            self.stack = grown
        self.stack[self.top] = pfn
        self.top += 1

    def push(self, pfns: PfnArray) -> None:
        need = self.top + len(pfns)
        if need > len(self.stack):
            grown = np.empty(max(need, 2 * len(self.stack)), dtype=np.int64)
            grown[: self.top] = self.stack[: self.top]
            self.stack = grown
        self.stack[self.top : need] = pfns
        self.top = need


class BuddyAllocator:
    """One zone covering every pfn of ``mem`` except the reserved ones."""

    def __init__(self, mem: PageArray, reserved: int = 1):
        self.mem = mem
        self.areas = [_FreeArea() for _ in range(MAX_ORDER)]
        self.nr_free = 0
        self.free_pages_prepare_hooks: list[FreeHook] = []
        self.withheld_hwpoison = 0  # pages free_pages_prepare kept out (PageHWPoison)
        resv = mem.mask(PG.reserved)
        mem.flags[:reserved] |= np.uint32(resv)
        mem._refcount[:reserved] = 1
        self._add_range(reserved, mem.nr_pages)
        mem.release = self._release

    # -- bookkeeping ------------------------------------------------------------

    def _add_range(self, start: int, end: int) -> None:
        """Give [start, end) to the free areas as maximal aligned blocks."""
        pfn = start
        per_order: list[list[int]] = [[] for _ in range(MAX_ORDER)]
        while pfn < end:
            order = MAX_ORDER - 1
            while order and (pfn & ((1 << order) - 1) or pfn + (1 << order) > end):
                order -= 1
            per_order[order].append(pfn)
            pfn += 1 << order
        for order, heads in enumerate(per_order):
            if heads:
                self._mark_free(np.array(heads, dtype=np.int64), order)

    def _mark_free(self, heads: PfnArray, order: int) -> None:
        self.mem.flags[heads] = _BUDDY
        self.mem.order[heads] = order
        self.areas[order].push(heads)
        self.nr_free += len(heads) << order

    def _is_free(self, pfns: PfnArray, order: int) -> npt.NDArray[np.bool_]:
        free = ((self.mem.flags[pfns] & _BUDDY) != 0) & (self.mem.order[pfns] == order)
        return np.asarray(free, dtype=np.bool_)

    def _pop1(self, order: int) -> int:
        """One valid free head of ``order`` taken off its area (every alloc_pages), or -1:
        scalar checks, no array temporaries."""
        area = self.areas[order]
        flags, orders = self.mem.flags, self.mem.order
        while area.top:
            area.top -= 1
            pfn = int(area.stack[area.top])
            if flags[pfn] & _BUDDY and orders[pfn] == order:
                flags[pfn] = 0
                orders[pfn] = 0
                self.nr_free -= 1 << order
                return pfn
        return -1

    def _pop(self, order: int, count: int) -> PfnArray:
        """Up to ``count`` valid free heads of ``order``, taken off its area."""
        area = self.areas[order]
        if count == 1:
            pfn = self._pop1(order)
            return np.array([pfn] if pfn >= 0 else [], dtype=np.int64)
        got: list[PfnArray] = []
        have = 0
        while have < count and area.top:
            take = min(area.top, count - have)
            cand = area.stack[area.top - take : area.top]
            area.top -= take
            valid = cand[self._is_free(cand, order)]
            got.append(valid)
            have += len(valid)
        heads = np.concatenate(got) if got else np.empty(0, dtype=np.int64)
        self.mem.flags[heads] = 0
        self.mem.order[heads] = 0
        self.nr_free -= len(heads) << order
        return heads

    # -- allocation -------------------------------------------------------------

    def alloc_pages_bulk(self, n: int) -> PfnArray:
        """``n`` order-0 pages (fewer if memory runs out), refcount 1, flags clear."""
        out: list[PfnArray] = []
        need = n
        for order in range(MAX_ORDER):
            if need <= 0:
                break
            size = 1 << order
            heads = self._pop(order, -(-need // size))
            if not len(heads):
                continue
            pages = (heads[:, None] + np.arange(size, dtype=np.int64)[None, :]).ravel()
            if len(pages) > need:
                spare = pages[need:]
                pages = pages[:need]
                self._add_range(int(spare[0]), int(spare[-1]) + 1)
            out.append(pages)
            need -= len(pages)
        pfns = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        mem = self.mem
        mem.flags[pfns] = 0
        mem.order[pfns] = 0
        mem._refcount[pfns] = 1
        mem._mapcount[pfns] = -1
        mem.mapping[pfns] = 0
        mem.index[pfns] = 0
        return pfns

    def alloc_pages(self, order: int = 0, compound: bool = False) -> Page | None:
        """One block of ``2**order`` pages; ``compound`` makes it a head with tails."""
        if not 0 <= order < MAX_ORDER:
            raise ValueError(f"order {order} is outside 0..{MAX_ORDER - 1}")
        for have in range(order, MAX_ORDER):
            head = self._pop1(have)
            if head >= 0:
                break
        else:
            return None
        mem = self.mem
        if have > order:
            # split: hand the upper halves back, head + 2^k at order k for k = order..have-1
            # (what _add_range gives for that range, without its search)
            flags, orders = mem.flags, mem.order
            for k in range(order, have):
                upper = head + (1 << k)
                flags[upper] = _BUDDY
                orders[upper] = k
                self.areas[k].push1(upper)
                self.nr_free += 1 << k
        if order == 0 and not compound:  # most allocations: scalar stores
            mem.flags[head] = 0
            mem._mapcount[head] = -1
            mem.mapping[head] = 0
            mem.index[head] = 0
            mem._refcount[head] = 1
            mem.order[head] = 0
            return mem[head]
        span = slice(head, head + (1 << order))
        mem.flags[span] = 0
        mem._mapcount[span] = -1
        mem.mapping[span] = 0
        mem.index[span] = 0
        mem._refcount[span] = 0
        mem._refcount[head] = 1
        mem.order[span] = order if compound else 0
        if compound and order:
            mem.flags[head] |= np.uint32(mem.mask(PG.head))
        return mem[head]

    # -- freeing --------------------------------------------------------------

    def free_pages_prepare(self, pfns: PfnArray) -> PfnArray:
        """Run free-time hooks, reset the pages, keep hwpoisoned ones out.

        Returns the pfns that may go back to the buddy lists.
        """
        for hook in self.free_pages_prepare_hooks:
            hook(pfns)
        mem = self.mem
        if (mem._mapcount[pfns] >= 0).any():
            bad = int(pfns[np.argmax(mem._mapcount[pfns] >= 0)])
            raise AssertionError(f"BUG: Bad page state: pfn {bad:#x} freed while mapped")
        poisoned = (mem.flags[pfns] & np.uint32(mem.mask(PG.hwpoison))) != 0
        keep = pfns[~poisoned]
        self.withheld_hwpoison += int(poisoned.sum())
        mem.flags[keep] = 0
        mem.order[keep] = 0
        mem.mapping[pfns] = 0
        mem.index[pfns] = 0
        return np.asarray(keep, dtype=np.int64)

    def free_pages_bulk(self, pfns: PfnArray) -> None:
        """Free order-0 pages whose refcount already dropped to zero."""
        if not len(pfns):
            return
        self._free_blocks(self.free_pages_prepare(np.asarray(pfns, dtype=np.int64)), 0)

    def __free_pages(self, page: Page, order: int) -> None:
        span = np.arange(page.pfn, page.pfn + (1 << order), dtype=np.int64)
        keep = self.free_pages_prepare(span)
        if len(keep) == len(span):
            self._free_blocks(np.array([page.pfn], dtype=np.int64), order)
        else:  # a poisoned subpage: free the rest page by page
            self._free_blocks(keep, 0)

    def free_compound_bulk(self, heads: PfnArray) -> None:
        """``__free_pages`` of many compound pages whose refcount dropped to zero, one
        batch per order; a block with a PageHWPoison subpage frees the rest page by page."""
        mem = self.mem
        orders = mem.order[heads]
        for order in sorted_unique(orders.astype(np.int64)).tolist():
            hs = heads[orders == order]
            nr = 1 << int(order)
            if self._free_compound_rows(hs, int(order)):
                continue
            spans = (hs[:, None] + np.arange(nr, dtype=np.int64)[None, :]).ravel()
            poisoned = ((mem.flags[spans] & np.uint32(mem.m_hwpoison)) != 0).reshape(-1, nr)
            keep = self.free_pages_prepare(spans)
            bad = poisoned.any(axis=1)
            if bad.any():
                self._free_blocks(keep[np.isin(keep, spans.reshape(-1, nr)[bad].ravel())], 0)
            if (~bad).any():
                self._free_blocks(hs[~bad], int(order))

    def _free_compound_rows(self, hs: PfnArray, order: int) -> bool:
        """The common case of :meth:`free_compound_bulk` for blocks of one order, done a
        block at a time: each aligned block is one row of the per-pfn arrays seen as
        ``[n, 2**order]``, so its pages are checked and reset by row copies and fills,
        not by gathering every pfn. Same effect as ``free_pages_prepare`` + one free
        per block; False (nothing done) when a free hook is installed, a block is not
        aligned to its order or holds a PageHWPoison page (the general path then)."""
        nr = 1 << order
        if self.free_pages_prepare_hooks or not order or (hs & (nr - 1)).any():
            return False
        mem = self.mem
        rows = np.sort(hs >> order)
        # Runs of adjacent blocks are slices of the row view (no gathered copy); many
        # scattered runs are taken as one fancy index instead, so the loops below stay
        # bounded by _MAX_RUNS whatever the layout.
        brk = np.flatnonzero(np.diff(rows) != 1) + 1
        spans: list[slice | PfnArray] = [rows]
        if len(brk) < _MAX_RUNS:
            lo = rows[np.concatenate(([0], brk))].tolist()
            hi = (rows[np.concatenate((brk - 1, [len(rows) - 1]))] + 1).tolist()
            spans = [slice(a, b) for a, b in zip(lo, hi, strict=True)]

        def view(arr: np.ndarray) -> np.ndarray:
            n = len(arr) >> order
            return arr[: n << order].reshape(n, nr)

        flags, mapcount = view(mem.flags), view(mem._mapcount)
        hw = np.uint32(mem.m_hwpoison)
        if any((flags[sp] & hw).any() or mapcount[sp].max() >= 0 for sp in spans):
            return False  # the general path withholds the page or reports the bad state
        for arr in (mem.flags, mem.order, mem.mapping, mem.index):
            rowview = view(arr)
            for sp in spans:
                rowview[sp] = 0
        self._free_blocks(hs, order)
        return True

    def _release(self, head: Page) -> None:
        order = int(self.mem.order[head.pfn])
        self.__free_pages(head, order)

    def _free_blocks(self, heads: PfnArray, order: int) -> None:
        """``__free_one_page`` for many blocks of one order at once."""
        mem = self.mem
        blocks = sorted_unique(heads)
        k = order
        while len(blocks) and k < MAX_ORDER - 1:
            buddy = blocks ^ (1 << k)
            pos = np.searchsorted(blocks, buddy)
            pos[pos == len(blocks)] = 0
            in_set = blocks[pos] == buddy
            in_mem = buddy + (1 << k) <= mem.nr_pages
            safe = np.where(in_mem, buddy, 0)
            in_area = in_mem & ~in_set & self._is_free(safe, k)
            # Buddies leaving the free area: lazy deletion from the stack.
            leaving = buddy[in_area]
            mem.flags[leaving] = 0
            mem.order[leaving] = 0
            self.nr_free -= len(leaving) << k
            merged = np.concatenate([blocks[in_set & (blocks < buddy)],
                                     np.minimum(blocks[in_area], leaving)])
            stay = blocks[~in_set & ~in_area]
            if len(stay):
                self._mark_free(stay, k)
            blocks = sorted_unique(merged)
            k += 1
        if len(blocks):
            self._mark_free(blocks, k)
