"""I4's refcount half: each page's ``_refcount`` derived from the holders that exist.

The kernel never stores who holds a page's references; the model's state does, in places
the explorer can read in bulk. Per page (on its compound head, as ``get_page`` counts):

* one per present, non-special user PTE of every mm (PROT_NONE included): the PTE's
  reference (``page_add_*_rmap`` goes with a ``get_page``);
* one per hwpoison swap entry naming the page, when the design's entries hold one
  (RFC patch 10, ``MmHooks.hwpoison_entry_holds_ref``);
* one per PTE_MARKER_GUEST_PRIVATE entry naming the page (the hardened design: the
  marker keeps the reference of the mapping it replaced);
* one per page-cache slot of every ``address_space`` (shmem/memfd, guest_memfd,
  secretmem): ``add_to_page_cache`` keeps its caller's reference;
* one per pipe buffer holding the page (``vmsplice``'s ``user_page_pipe_buf_ops``), in
  every pipe a task has open;
* one for a page-table page (its allocation's reference, PG_table);
* ``GUP_PIN_COUNTING_BIAS`` per long-term FOLL_PIN the scenario keeps (``vfio_pin``), or
  one on a folio with a pincount field;
* one for memory_failure's own reference (``get_hwpoison_page``, or
  ``take_page_off_buddy`` + ``page_ref_inc``), kept while the page stays PG_hwpoison:
  counted from memory_failure's report log, whose page types say whether it took one.

Holders that cannot be counted, so their pages are left out of the comparison: PG_reserved
pages (the zero page, whose count only ever grows in the kernel). KVM holds no reference
across steps in any design: its GUP references are dropped at the end of a fault or copy
(``kvm_release_pfn_clean``), unless a design leaks one, which is what the check is for.
Swap entries of pages written out hold no page (the model has no swap cache), so they
count nothing. PMD-mapped huge pages are not counted (no PMD leaf is scanned).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pte_none_array
from kvmpoison.arch.x86.pgtable_64 import __swp_offset_array, __swp_type_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_SPECIAL
from kvmpoison.explore.arrays import nonzero, pte_pfns_nonzero
from kvmpoison.fs.pipe import Pipe
from kvmpoison.machine import Machine
from kvmpoison.mm.file import AddressSpace
from kvmpoison.mm.guest_private import guest_private_marker_pfns
from kvmpoison.mm.gup import GUP_PIN_COUNTING_BIAS, folio_has_pincount
from kvmpoison.mm.memory_failure import MfReport
from kvmpoison.mm.page import Page
from kvmpoison.mm.page_flags import PG, PG_PGTABLE_BIT

I64 = npt.NDArray[np.int64]

# memory_failure's reports whose handling took no reference of its own (the page was
# already poisoned, was the kernel's, or soft offline left it alone).
NO_MF_REFERENCE = frozenset({
    "already poisoned", "reserved kernel page", "high-order kernel page",
    "soft offline: page already poisoned", "soft offline: migration not modelled",
})


@dataclass(frozen=True)
class Holders:
    """Per pfn (heads hold the counts): the references each kind of holder owns."""

    ptes: I64
    hwpoison_entries: I64
    guest_private_markers: I64  # the hardened design's markers each hold one
    page_cache: I64
    page_tables: I64
    pipes: I64
    pins: I64
    memory_failure: I64
    uncounted: npt.NDArray[np.bool_]  # pages with a holder the model cannot count

    @property
    def expected(self) -> I64:
        total: I64 = (self.ptes + self.hwpoison_entries + self.guest_private_markers
                      + self.page_cache + self.page_tables
                      + self.pipes + self.pins + self.memory_failure)
        return total

    def describe(self, pfn: int) -> str:
        parts = [(n, int(getattr(self, n)[pfn])) for n in (
            "ptes", "hwpoison_entries", "guest_private_markers", "page_cache", "page_tables",
            "pipes", "pins", "memory_failure")]
        return ", ".join(f"{n.replace('_', ' ')} {c}" for n, c in parts if c) or "no holder"


assert PG_PGTABLE_BIT == 31  # refcount_mismatches reads it as the flags' top bit

# Per compound order, the mask that rounds a pfn down to its head (MAX_ORDER is far below 64).
_HEAD_MASKS = ~((np.int64(1) << np.arange(63, dtype=np.int64)) - 1)
# numpy scalars made once (making one costs about what an operation on a few entries does).
_PTE_PRESENT = np.uint64(_PAGE_PRESENT | _PAGE_PROTNONE)  # pte_present()
_SPECIAL = np.uint64(_PAGE_SPECIAL)
_TABLE_SHIFT = np.uint32(PG_PGTABLE_BIT)


def _heads(m: Machine, pfns: I64) -> I64:
    heads: I64 = pfns & _HEAD_MASKS[m.kernel.core.pages.order[pfns]]
    return heads


def _count(m: Machine, pfns: I64, weight: I64 | int = 1) -> I64:
    n = m.kernel.core.pages.nr_pages
    if not len(pfns):
        return np.zeros(n, dtype=np.int64)
    w = None if isinstance(weight, int) and weight == 1 else \
        np.broadcast_to(np.asarray(weight, dtype=np.int64), pfns.shape)
    return np.bincount(_heads(m, pfns), weights=w, minlength=n)[:n].astype(np.int64)


@dataclass(frozen=True)
class PteScan:
    """Every user PTE of every mm that is not zero (a zero entry is none and holds nothing),
    read as one array: which are present (PROT_NONE included), the pfns those map, and
    which of those map a page (the PTE is not special: not the zero page, not VM_PFNMAP)."""

    entries: npt.NDArray[np.uint64]
    present: npt.NDArray[np.bool_]
    pfns: I64  # of entries[present]
    mapped: I64  # the pfns of the present, non-special PTEs that have a struct page

    @property
    def swap(self) -> npt.NDArray[np.uint64]:
        """The non-present entries that are not none: swap, hwpoison and marker entries."""
        rest = self.entries[~self.present]
        out: npt.NDArray[np.uint64] = rest[~pte_none_array(rest)]
        return out


def user_ptes(m: Machine) -> PteScan:
    """Every non-zero user PTE of every mm (one pass over the PTE tables in use)."""
    core = m.kernel.core
    rows = core.ptes.rows[: core.ptes._high].reshape(-1)
    entries = rows[nonzero(rows)]
    present = (entries & _PTE_PRESENT) != 0  # pte_present_array
    live = entries[present]
    pfns = pte_pfns_nonzero(live)
    mapped = pfns[(live & _SPECIAL) == 0]
    return PteScan(entries, present, pfns, mapped[mapped < core.pages.nr_pages])


Source = tuple[str, I64, I64 | None]  # a holder's name, the pfns it holds, refs per pfn


def _sources(m: Machine, pins: Iterable[Page], scan: PteScan | None) -> list[Source]:
    """Every counted holder but the page tables, as the pfns it holds (heads found later)."""
    core = m.kernel.core
    mem = core.pages
    if scan is None:
        scan = user_ptes(m)
    out: list[Source] = [("ptes", scan.mapped, None)]
    hw_type = core.swap_types.hwpoison
    hw_refs = core.hooks.hwpoison_entry_holds_ref and hw_type is not None
    swap = scan.swap if (hw_refs or core.hooks.guest_private) and not scan.present.all() \
        else None
    if hw_refs and hw_type is not None and swap is not None:
        off = __swp_offset_array(swap[__swp_type_array(swap) == np.uint64(hw_type)])
        out.append(("hwpoison_entries", off.astype(np.int64), None))
    if core.hooks.guest_private and swap is not None:
        out.append(("guest_private_markers", guest_private_marker_pfns(core, swap), None))
    # Every address_space a page was ever cached in is in the registry (few objects).
    cached = [a.pages for a in mem.registry._objects.values() if isinstance(a, AddressSpace)]
    if cached:
        slots = np.concatenate(cached)
        out.append(("page_cache", slots[slots >= 0], None))
    # Pipes: one object per pipe, however many fds (and forked tables) share it.
    pipes = {id(f.private_data): f.private_data for t in m.kernel.tasks.values()
             for f in t.fds.values() if isinstance(f.private_data, Pipe)}
    piped = [b.pfn for p in pipes.values() for b in p.bufs if b.pfn is not None]
    if piped:
        out.append(("pipes", np.array(piped, dtype=np.int64), None))
    pinned = list(pins)
    if pinned:
        bias = [1 if folio_has_pincount(p) else GUP_PIN_COUNTING_BIAS for p in pinned]
        out.append(("pins", np.array([p.pfn for p in pinned], dtype=np.int64),
                    np.array(bias, dtype=np.int64)))
    took = np.array([r.pfn for r in core.mf_reports if isinstance(r, MfReport)
                     and r.page_type not in NO_MF_REFERENCE], dtype=np.int64) \
        if core.mf_reports else np.zeros(0, dtype=np.int64)
    if len(took):
        poisoned = (mem.flags[took] & np.uint32(mem.mask(PG.hwpoison))) != 0
        out.append(("memory_failure", np.unique(took[poisoned]), None))
    return out


def _tables(m: Machine) -> I64:
    flags = m.kernel.core.pages.flags
    tables: I64 = ((flags & np.uint32(1 << PG_PGTABLE_BIT)) != 0).astype(np.int64)
    return tables


def holders(m: Machine, pins: Iterable[Page] = (), scan: PteScan | None = None) -> Holders:
    """Per holder, the references it owns (``scan``: :func:`user_ptes` of this state, when
    the caller has it already)."""
    got = {name: _count(m, pfns, 1 if w is None else w) for name, pfns, w in
           _sources(m, pins, scan)}
    zero = np.zeros(m.kernel.core.pages.nr_pages, dtype=np.int64)
    mem = m.kernel.core.pages
    return Holders(got.get("ptes", zero), got.get("hwpoison_entries", zero),
                   got.get("guest_private_markers", zero), got.get("page_cache", zero),
                   _tables(m), got.get("pipes", zero),
                   got.get("pins", zero), got.get("memory_failure", zero),
                   (mem.flags & np.uint32(mem.mask(PG.reserved))) != 0)


def refcount_mismatches(m: Machine, pins: Iterable[Page] = (),
                        scan: PteScan | None = None) -> tuple[I64, Holders | None]:
    """The pfns whose ``_refcount`` differs from what their holders own (tails included:
    a tail's own count must stay 0), and, when there are any, the holders. One bincount
    over every holder's pfns, on their heads; the holder by holder split only for a
    violation."""
    sources = _sources(m, pins, scan)
    mem = m.kernel.core.pages
    n = mem.nr_pages
    heads = _heads(m, np.concatenate([p for _, p, _ in sources]))
    weights = None
    if any(w is not None for _, _, w in sources):
        weights = np.concatenate([np.ones(len(p), dtype=np.int64) if w is None else w
                                  for _, p, w in sources])
    # In _refcount's own type (ufuncs on one type are the fast ones), plus a page-table
    # page's own reference: PG_table is the flags' top bit, so the shift is 0 or 1.
    expected = np.bincount(heads, weights=weights, minlength=n)[:n].astype(np.int32)
    expected += (mem.flags >> _TABLE_SHIFT).view(np.int32)
    bad = nonzero(mem._refcount != expected)
    if len(bad):  # the pages whose holders the model cannot count are left out
        bad = bad[(mem.flags[bad] & mem.mask(PG.reserved)) == 0]
    return bad, (holders(m, pins, scan) if len(bad) else None)
