"""``struct page`` as numpy arrays indexed by pfn, and the kernel's page accessors.

Follows ``include/linux/mm_types.h``, ``page-flags.h`` and ``page_ref.h``
(v5.12; v6.18 keeps the same per-page semantics behind folios). Fields:

* ``flags``: the ``PG_*`` bits of :mod:`kvmpoison.mm.page_flags`;
* ``_refcount``, and ``_mapcount`` which starts at -1 as in the kernel;
* ``order``: compound order, stored on the head and on every tail;
* ``mapping``: ``anon_vma | PAGE_MAPPING_ANON`` or an ``address_space``, as
  an id into :class:`MappingRegistry`; ``index``: the page offset.

Compound heads are naturally aligned, so a tail finds its head from its
order; the model keeps no per-tail ``compound_head`` pointer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmpoison import statecopy
from kvmpoison.mm.page_flags import PG, PG_BUDDY_BIT, PG_PGTABLE_BIT, PageFlagBits

PAGE_MAPPING_ANON = 0x1
PAGE_MAPPING_MOVABLE = 0x2
PAGE_MAPPING_KSM = PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE
_MAPPING_SHIFT = 2

IntArray = npt.NDArray[np.int64]


class MappingRegistry:
    """Gives ``anon_vma`` and ``address_space`` objects the small ids pages store."""

    def __init__(self) -> None:
        self._objects: dict[int, Any] = {}
        self._ids: dict[int, int] = {}
        self._next = 1

    def encode(self, obj: object, anon: bool) -> int:
        key = id(obj)
        ident = self._ids.get(key)
        if ident is None:
            ident = self._next
            self._next += 1
            self._ids[key] = ident
            self._objects[ident] = obj
        return (ident << _MAPPING_SHIFT) | (PAGE_MAPPING_ANON if anon else 0)

    def decode(self, value: int) -> Any:
        return self._objects.get(int(value) >> _MAPPING_SHIFT)

    def __deepcopy__(self, memo: dict[int, object]) -> MappingRegistry:
        """A copy whose id lookup names the copied objects (ids are per object)."""
        new = MappingRegistry()
        memo[id(self)] = new
        new._objects = {ident: statecopy.deepcopy(obj, memo)
                        for ident, obj in self._objects.items()}
        new._ids = {id(obj): ident for ident, obj in new._objects.items()}
        new._next = self._next
        return new


class PageArray:
    """All ``struct page``s of one machine (the vmemmap)."""

    def __init__(self, nr_pages: int, bits: PageFlagBits):
        self.nr_pages = nr_pages
        self.bits = bits
        self.flags = np.zeros(nr_pages, dtype=np.uint32)
        self._refcount = np.zeros(nr_pages, dtype=np.int32)
        self._mapcount = np.full(nr_pages, -1, dtype=np.int32)
        self.order = np.zeros(nr_pages, dtype=np.uint8)
        self.mapping = np.zeros(nr_pages, dtype=np.int32)
        self.index = np.zeros(nr_pages, dtype=np.int64)
        self.registry = MappingRegistry()
        # head pfn -> PMD mappings of that compound page (v5.12 ``compound_mapcount`` + 1,
        # 6.x ``_entire_mapcount`` + 1); absent means 0. Only THPs ever have one.
        self.compound_mapcount: dict[int, int] = {}
        # head pfn -> FOLL_PIN pins of a compound page (v5.12 ``hpage_pincount``, 6.x
        # ``_pincount``); absent means 0. Order-0 pins use GUP_PIN_COUNTING_BIAS instead.
        self.compound_pincount: dict[int, int] = {}
        # Masks by flag, computed once: enum hashing is slow on the scalar paths.
        self._masks = {flag: 1 << bit for flag, bit in bits.bit.items()}
        self.m_hwpoison = self._masks[PG.hwpoison]
        self.m_locked = self._masks[PG.locked]
        self.m_swapbacked = self._masks[PG.swapbacked]
        # Set by the page allocator: called when a refcount drops to zero.
        self.release: Callable[[Page], None] | None = None

    def mask(self, flag: PG) -> int:
        return self._masks[flag]

    def __getitem__(self, pfn: int) -> Page:
        if not 0 <= pfn < self.nr_pages:
            raise IndexError(f"pfn {pfn:#x} has no struct page (memory has {self.nr_pages:#x})")
        return Page(self, pfn)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.flags, self._refcount, self._mapcount, self.order,
                                      self.mapping, self.index))


@dataclass(frozen=True, slots=True)
class Page:
    """A ``struct page *``: a handle on one pfn's fields."""

    mem: PageArray
    pfn: int

    def __repr__(self) -> str:
        return f"Page(pfn={self.pfn:#x})"


def pfn_to_page(mem: PageArray, pfn: int) -> Page:
    return mem[pfn]


def page_to_pfn(page: Page) -> int:
    return page.pfn


# -- flags --------------------------------------------------------------------


def PageFlag(page: Page, flag: PG) -> bool:
    return bool(page.mem.flags[page.pfn] & page.mem.mask(flag))


def SetPageFlag(page: Page, flag: PG) -> None:
    page.mem.flags[page.pfn] |= np.uint32(page.mem.mask(flag))


def ClearPageFlag(page: Page, flag: PG) -> None:
    page.mem.flags[page.pfn] &= np.uint32(~page.mem.mask(flag) & 0xFFFF_FFFF)


def TestSetPageFlag(page: Page, flag: PG) -> bool:
    old = PageFlag(page, flag)
    SetPageFlag(page, flag)
    return old


def TestClearPageFlag(page: Page, flag: PG) -> bool:
    old = PageFlag(page, flag)
    ClearPageFlag(page, flag)
    return old


def PageHWPoison(page: Page) -> bool:
    """PF_ANY: tested on this very (sub)page, not on its head."""
    return bool(page.mem.flags[page.pfn] & page.mem.m_hwpoison)


def SetPageHWPoison(page: Page) -> None:
    page.mem.flags[page.pfn] |= page.mem.m_hwpoison


def ClearPageHWPoison(page: Page) -> None:
    page.mem.flags[page.pfn] &= ~page.mem.m_hwpoison & 0xFFFF_FFFF


def TestSetPageHWPoison(page: Page) -> bool:
    old = PageHWPoison(page)
    SetPageHWPoison(page)
    return old


def TestClearPageHWPoison(page: Page) -> bool:
    old = PageHWPoison(page)
    ClearPageHWPoison(page)
    return old


def PageLocked(page: Page) -> bool:
    head = compound_head(page)
    return bool(head.mem.flags[head.pfn] & head.mem.m_locked)


def trylock_page(page: Page) -> bool:
    head = compound_head(page)
    flags = head.mem.flags
    if flags[head.pfn] & head.mem.m_locked:
        return False
    flags[head.pfn] |= head.mem.m_locked
    return True


def lock_page(page: Page) -> None:
    """The model is single-threaded: a page already locked here is a model bug."""
    if not trylock_page(page):
        raise AssertionError(f"{page} is already locked")


def unlock_page(page: Page) -> None:
    head = compound_head(page)
    flags = head.mem.flags
    if not flags[head.pfn] & head.mem.m_locked:
        raise AssertionError(f"unlock_page of unlocked {page}")
    flags[head.pfn] &= ~head.mem.m_locked & 0xFFFF_FFFF


def PageSwapBacked(page: Page) -> bool:
    head = compound_head(page)
    return bool(head.mem.flags[head.pfn] & head.mem.m_swapbacked)


def PageDirty(page: Page) -> bool:
    return PageFlag(compound_head(page), PG.dirty)


def SetPageDirty(page: Page) -> None:
    SetPageFlag(compound_head(page), PG.dirty)


def PageUptodate(page: Page) -> bool:
    return PageFlag(compound_head(page), PG.uptodate)


def PageBuddy(page: Page) -> bool:
    return bool(page.mem.flags[page.pfn] >> PG_BUDDY_BIT & 1)


def PageTable(page: Page) -> bool:
    return bool(page.mem.flags[page.pfn] >> PG_PGTABLE_BIT & 1)


# -- compound pages -----------------------------------------------------------


def PageHead(page: Page) -> bool:
    return PageFlag(page, PG.head)


def compound_order(page: Page) -> int:
    return int(page.mem.order[page.pfn])


def compound_head(page: Page) -> Page:
    order = page.mem.order[page.pfn]
    if not order:
        return page
    order = int(order)
    head = page.pfn & ~((1 << order) - 1)
    return page if head == page.pfn else Page(page.mem, head)


def PageTail(page: Page) -> bool:
    return compound_head(page).pfn != page.pfn


# -- mapping ------------------------------------------------------------------


def PageAnon(page: Page) -> bool:
    head = compound_head(page)
    return bool(head.mem.mapping[head.pfn] & PAGE_MAPPING_ANON)


def PageKsm(page: Page) -> bool:
    """``mapping`` is a KSM stable node (PAGE_MAPPING_KSM = ANON | MOVABLE)."""
    head = compound_head(page)
    return int(head.mem.mapping[head.pfn]) & PAGE_MAPPING_KSM == PAGE_MAPPING_KSM


def page_mapping(page: Page) -> Any:
    """The ``address_space`` of a file page, or None for anon and unmapped pages."""
    head = compound_head(page)
    value = int(head.mem.mapping[head.pfn])
    if value == 0 or value & PAGE_MAPPING_ANON:
        return None
    return head.mem.registry.decode(value)


def page_anon_vma(page: Page) -> Any:
    head = compound_head(page)
    value = int(head.mem.mapping[head.pfn])
    if value & PAGE_MAPPING_KSM != PAGE_MAPPING_ANON:  # not anon, or a KSM stable node
        return None
    return head.mem.registry.decode(value)


# -- counts ---------------------------------------------------------------------


def page_count(page: Page) -> int:
    head = compound_head(page)
    return int(head.mem._refcount[head.pfn])


def get_page(page: Page) -> None:
    """include/linux/mm.h ``get_page`` (v5.12): one more reference.

    A count of zero is a free page: taking it is a bug of the model. A count
    already below zero (RFCv1's pin released on a bare ``get_page`` underflows
    it) is incremented as the kernel does without CONFIG_DEBUG_VM, whose
    ``VM_BUG_ON_PAGE(page_ref_zero_or_close_to_overflow(page))`` would oops there.
    """
    head = compound_head(page)
    if head.mem._refcount[head.pfn] == 0:
        raise AssertionError(f"get_page on free {page}")
    head.mem._refcount[head.pfn] += 1


def put_page(page: Page) -> None:
    """Drop a reference; the last one frees the page through the allocator.

    A count already below zero (an RFC pin released on a bare ``get_page``)
    only goes further down, as without CONFIG_DEBUG_VM; a free page (zero)
    is a model bug.
    """
    head = compound_head(page)
    mem = head.mem
    if mem._refcount[head.pfn] == 0:
        raise AssertionError(f"put_page on free {page}")
    mem._refcount[head.pfn] -= 1
    if mem._refcount[head.pfn] == 0 and mem.release is not None:
        mem.release(head)


def compound_mapcount(page: Page) -> int:
    """include/linux/mm.h ``compound_mapcount`` (v5.12; 6.x ``folio_entire_mapcount``):
    how many PMDs map the compound page ``page`` belongs to."""
    mem = page.mem
    if not mem.order[page.pfn] or not mem.compound_mapcount:
        return 0
    return mem.compound_mapcount.get(compound_head(page).pfn, 0)


def page_mapcount(page: Page) -> int:
    """include/linux/mm.h ``page_mapcount`` (v5.12): this subpage's PTE mappings plus
    the PMD mappings of its compound page (PG_double_map's extra count is not kept,
    so nothing needs subtracting). A file THP's ``_mapcount`` already counts its PMD
    mappings (``page_add_file_rmap(page, true)``), so it is read alone."""
    count = int(page.mem._mapcount[page.pfn]) + 1
    if page.mem.order[page.pfn] and PageAnon(page):
        count += compound_mapcount(page)
    return count


def total_mapcount(page: Page) -> int:
    """mm/huge_memory.c ``total_mapcount`` (v5.12; 6.x ``folio_mapcount``) of an anon
    page: the PTE mappings of every subpage plus one per PMD mapping. A file THP's
    subpage counts include its PMD mappings, which are taken out again ("File pages
    has compound_mapcount included in _mapcount")."""
    head = compound_head(page)
    mem = head.mem
    order = int(mem.order[head.pfn])
    if not order:
        return int(mem._mapcount[head.pfn]) + 1
    span = mem._mapcount[head.pfn : head.pfn + (1 << order)]
    compound = compound_mapcount(head)
    ret = int((span + 1).sum()) + compound
    return ret if PageAnon(head) else ret - compound * (1 << order)


def page_mapped(page: Page) -> bool:
    mem = page.mem
    if not mem.order[page.pfn]:
        return bool(mem._mapcount[page.pfn] >= 0)
    head = compound_head(page)
    if compound_mapcount(head):
        return True
    order = compound_order(head)
    span = slice(head.pfn, head.pfn + (1 << order))
    return bool((head.mem._mapcount[span] >= 0).any())


def PageTransCompoundMap(page: Page) -> bool:
    """include/linux/page-flags.h ``PageTransCompoundMap`` (v5.12), what KVM's
    ``transparent_hugepage_adjust`` asks: an anon subpage with no PTE mapping of its
    own (so it is mapped by a PMD), or a file THP mapped by PMDs only. Removed in
    v5.13 (KVM walks the host page tables instead: see ``PageTables.lookup_address``).
    """
    mem = page.mem
    if not mem.order[page.pfn]:
        return False
    if PageAnon(page):
        return bool(mem._mapcount[page.pfn] < 0)
    return int(mem._mapcount[page.pfn]) + 1 == compound_mapcount(page)
