"""The explorer's invariants: what must hold after every step, whatever the actors did.

State invariants read the machine's arrays in bulk (page tables, EPT, struct page flags,
the memory controller's per-line metadata); step invariants also need the step's outcome
(a guest read, a host access). Each has a name (I1...) and a one-line meaning; a violation
is the text ``"I1: ..."``. The designs differ: baseline maps private memory by design and
rfc-v1's GUP reaches it, so their violations are the point, not a bug of the explorer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    PAGE_SHIFT,
    PMD_SHIFT,
)
from kvmpoison.arch.x86.physmem import LINE_TD, NO_KEYID
from kvmpoison.arch.x86.vmx import VMX_EPT_RWX_MASK
from kvmpoison.explore.arrays import nonzero, pte_pfns_nonzero
from kvmpoison.explore.refcount import PteScan, refcount_mismatches, user_ptes
from kvmpoison.explore.tlb import stale_tlb_entries
from kvmpoison.machine import Instance, Machine
from kvmpoison.mm.memory_failure import MfReport
from kvmpoison.mm.page_flags import PG, PG_BUDDY_BIT
from kvmpoison.mm.pagetable import PageTables
from kvmpoison.virt.kvm.gmem_memslot import SPTE_PRIVATE
from kvmpoison.virt.kvm.kvm_main import Protection

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
PFN_BITS = np.uint64((1 << 40) - 1)
_PFN_FIELD = PFN_BITS << np.uint64(PAGE_SHIFT)  # an EPT entry's pfn, in place
# numpy scalars made once: making one costs about as much as the operation on 256 entries.
_SHIFT = np.uint64(PAGE_SHIFT)
_EPT_RWX = np.uint64(VMX_EPT_RWX_MASK)
_SPTE_PRIVATE = np.uint64(SPTE_PRIVATE)
_PTE_PRESENT = np.uint64(_PAGE_PRESENT | _PAGE_PROTNONE)  # pte_present()


@dataclass(frozen=True)
class Invariant:
    name: str
    meaning: str
    per_step: bool  # needs the step's outcome, not only the machine's state


INVARIANTS: dict[str, Invariant] = {i.name: i for i in (
    Invariant("I1", "no present host-userspace PTE, in any mm, maps a private page", False),
    Invariant("I2", "no host write reaches a TD-private line (last-writer KeyID oracle)", False),
    Invariant("I3", "guest data is never lost or corrupted: every successful guest read of a "
              "private gfn returns what the guest last wrote there", True),
    Invariant("I4", "refcount and mapcount agree with what holds the page: mapcount is the "
              "number of present user PTEs mapping it; refcount is what its PTEs, hwpoison "
              "entries that hold one, page-cache slots, pipe buffers, page-table use, "
              "long-term pins and memory_failure own", False),
    Invariant("I5", "no page returns to the allocator poisoned (PG_hwpoison), or still "
              "holding TD data", False),
    Invariant("I6", "real hardware poison the kernel has seen (memory_failure or the #MC "
              "handler ran on the frame while its error was there) is never cleared or hidden "
              "by protection bookkeeping", False),
    Invariant("I7", "a shared gfn's page is the one the VMM maps; a private gfn's page is "
              "never reached by a VMM or host access that succeeds", True),
    Invariant("I8", "no CPU's TLB keeps a translation that grants more than the current PTE "
              "(another pfn, or a permission the PTE lost), so no host access succeeds "
              "through a stale entry", False),
)}


def parse_invariants(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"I1,I3"`` (or a list) -> ("I1", "I3"); None -> every invariant. ValueError if unknown."""
    if text is None:
        return tuple(INVARIANTS)
    names = [n.strip().upper() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    bad = [n for n in names if n not in INVARIANTS]
    if bad or not names:
        raise ValueError(f"unknown invariant {', '.join(bad) or '(none given)'} "
                         f"(known: {', '.join(INVARIANTS)})")
    return tuple(dict.fromkeys(names))


# -- vectorised views of one VM --------------------------------------------------------------


@dataclass(frozen=True)
class GuestView:
    """The EPT-present gfns of a VM, their pfns, and which the guest uses as private."""

    gfns: I64
    pfns: I64
    private: npt.NDArray[np.bool_]


def guest_private_mask(inst: Instance, gfns: I64) -> npt.NDArray[np.bool_]:
    """The gfns the guest uses through its private alias (its own view, as TDX's shared bit)."""
    g = inst.guest
    if inst.vm.protection is Protection.GMEM:
        return np.asarray(g.gmem_alias.get_many(gfns) == 0, dtype=np.bool_)
    shared = np.zeros(len(gfns), dtype=np.bool_)
    for lo, hi in g.shared:  # one pass per shared range, not per page
        shared |= (gfns >= lo) & (gfns < hi)
    return ~shared


Cache = dict[object, object]  # one step's views, so several checks walk the EPT once
PINS = "pins"  # the cache key of the long-term pins a scenario keeps (a tuple of Pages)


@dataclass(frozen=True)
class ViewSource:
    """What a VM's guest view is made of, read at one moment: its EPT's leaf entries over
    guest RAM (or one gfn of it) and the gfn ranges its guest shares (gmem: the SPTE's own
    bit says)."""

    inst: Instance
    first: int  # the gfn of raw[0], when pages is None
    pages: I64 | None  # the gfn of each entry of raw; None: first + its index
    raw: U64
    shared: tuple[tuple[int, int], ...]


def view_source(inst: Instance, copy: bool = True, gfn: int | None = None) -> ViewSource:
    """``copy``: the entries are copied, so the source outlives a change of the EPT (the
    state before a step, for I2); without, they are a view of the EPT's table. ``gfn``:
    that gfn only (it must be one of guest RAM)."""
    ept = inst.vm.ept
    start, end = (0, inst.vmm.ram_size) if gfn is None else \
        (gfn << PAGE_SHIFT, (gfn + 1) << PAGE_SHIFT)
    shared = tuple(inst.guest.shared)
    if start < end and start >> PMD_SHIFT == (end - 1) >> PMD_SHIFT:
        # One 2 MiB region (every explored VM's RAM): a slice of its table.
        slot = ept.pte_slot(start)
        if slot is None:
            return ViewSource(inst, 0, None, np.zeros(0, dtype=np.uint64), shared)
        row, col = slot
        raw = ept.store.rows[row, col : col + ((end - start) >> PAGE_SHIFT)]
        return ViewSource(inst, start >> PAGE_SHIFT, None, raw.copy() if copy else raw, shared)
    addr, raw = leaf_ptes(ept, start, end)
    return ViewSource(inst, 0, addr >> PAGE_SHIFT, raw, shared)


def view_of(src: ViewSource) -> GuestView:
    idx = nonzero(src.raw & _EPT_RWX)
    g = (idx + src.first if src.first else idx) if src.pages is None else src.pages[idx]
    raw = src.raw[idx]
    p = ((raw & _PFN_FIELD) >> _SHIFT).view(np.int64)
    if src.inst.vm.protection is Protection.GMEM:
        # What the hardware uses: the SPTE's private bit (a rebooted guest's view of a gfn
        # may lag KVM's attributes until its first access converts it).
        return GuestView(g, p, (raw & _SPTE_PRIVATE) != 0)
    # guest_private_mask for every RAM gfn at once: one slice per shared range.
    shared = np.zeros(src.inst.vmm.ram_size >> PAGE_SHIFT, dtype=np.bool_)
    for lo, hi in src.shared:
        shared[max(lo, 0) : max(hi, 0)] = True
    return GuestView(g, p, ~shared[g])


def guest_view(inst: Instance, cache: Cache | None = None) -> GuestView:
    if cache is None:
        return view_of(view_source(inst, copy=False))
    hit = cache.get(("view", id(inst)))
    if not isinstance(hit, GuestView):
        hit = cache[("view", id(inst))] = view_of(view_source(inst, copy=False))
    return hit


# A range of at most this many 2 MiB regions is read region by region (a dict look-up and
# a slice each); a larger one by the table walk, which costs what is mapped.
_FEW_REGIONS = 8


def leaf_ptes(pt: PageTables, start: int, end: int) -> tuple[I64, npt.NDArray[np.uint64]]:
    """The addresses in [start, end) (page-aligned) that have a PTE table, and their raw
    leaf entries: what :meth:`PageTables.chunks` yields, concatenated. Every explored VM's
    RAM fits in one or two 2 MiB regions, where the walk's set-up costs more than the read,
    so those are read through each region's ``pte_slot`` (None: no PTE table there, a hole
    or a 2 MiB leaf, which ``chunks`` leaves out as well)."""
    if end <= start:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    first, last = start >> PMD_SHIFT, (end - 1) >> PMD_SHIFT
    rows = pt.store.rows
    addrs: list[I64] = []
    raws: list[npt.NDArray[np.uint64]] = []
    if last - first < _FEW_REGIONS:
        for region in range(first, last + 1):
            lo = max(start, region << PMD_SHIFT)
            hi = min(end, (region + 1) << PMD_SHIFT)
            slot = pt.pte_slot(lo)
            if slot is None:
                continue
            row, col = slot
            n = (hi - lo) >> PAGE_SHIFT
            addrs.append(lo + (np.arange(n, dtype=np.int64) << PAGE_SHIFT))
            raws.append(rows[row, col : col + n])
    else:
        for ch in pt.chunks(start, end):
            addrs.append(ch.addr)
            raws.append(rows[ch.rows, ch.cols])
    if not addrs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    if len(addrs) == 1:
        return addrs[0], raws[0].copy()
    return np.concatenate(addrs), np.concatenate(raws)


def present_leaves(pt: PageTables, start: int, end: int, mask: np.uint64) -> tuple[I64, U64]:
    """The page numbers (address >> PAGE_SHIFT) in [start, end) whose leaf entry has a bit
    of ``mask``, and those entries: :func:`leaf_ptes` filtered. A range inside one 2 MiB
    region (every explored VM's RAM) is read straight from its PTE table's row."""
    if end > start and start >> PMD_SHIFT == (end - 1) >> PMD_SHIFT:
        slot = pt.pte_slot(start)
        if slot is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        row, col = slot
        raw = pt.store.rows[row, col : col + ((end - start) >> PAGE_SHIFT)]
        idx = nonzero(raw & mask)
        return idx + (start >> PAGE_SHIFT), raw[idx]
    addr, raw = leaf_ptes(pt, start, end)
    keep = (raw & mask) != 0
    return addr[keep] >> PAGE_SHIFT, raw[keep]


def live(m: Machine) -> list[Instance]:
    return [i for i in m.instances.values() if i.vmm.proc.task.mm is not None]


def private_mask(m: Machine, cache: Cache | None = None,
                 sources: list[ViewSource] | None = None) -> npt.NDArray[np.bool_]:
    """Per pfn, whether some live VM's guest uses it as a private page (a scatter of every
    view's private pfns: no sort, whatever the number of VMs). ``sources``: the views of
    another moment (:func:`view_sources`), instead of the live VMs' now."""
    if cache is not None and sources is None:
        hit = cache.get("private")
        if isinstance(hit, np.ndarray):
            return hit
    out = np.zeros(m.kernel.core.pages.nr_pages, dtype=np.bool_)
    views = [guest_view(i, cache) for i in live(m)] if sources is None else \
        [view_of(src) for src in sources]
    for v in views:
        out[v.pfns[v.private]] = True
    if cache is not None and sources is None:
        cache["private"] = out
    return out


def view_sources(m: Machine) -> list[ViewSource]:
    """Every live VM's view, copied: what :func:`private_mask` needs of this moment."""
    return [view_source(i) for i in live(m)]


def vmm_pfns(inst: Instance, cache: Cache | None = None) -> I64:
    """Per gfn of guest RAM: the pfn the VMM's PTE maps at its address (-1: none)."""
    if cache is not None:
        hit = cache.get(("vmm", id(inst)))
        if isinstance(hit, np.ndarray):
            return hit
    mm = inst.vmm.proc.task.mm
    out = np.full(inst.vmm.ram_size >> PAGE_SHIFT, -1, dtype=np.int64)
    if mm is not None:
        base = inst.vmm.ram_hva
        pages, raw = present_leaves(mm.pgd, base, base + inst.vmm.ram_size, _PTE_PRESENT)
        out[pages - (base >> PAGE_SHIFT)] = pte_pfns_nonzero(raw)
    if cache is not None:
        cache[("vmm", id(inst))] = out
    return out


def _fmt(pfns: I64, limit: int = 4) -> str:
    shown = ", ".join(f"{int(p):#x}" for p in pfns[:limit])
    return shown + (f" (+{len(pfns) - limit} more)" if len(pfns) > limit else "")


# -- state invariants ------------------------------------------------------------------------


def _user_ptes(m: Machine, cache: Cache | None) -> PteScan:
    """:func:`user_ptes`, once per step for I1 and I4."""
    if cache is None:
        return user_ptes(m)
    hit = cache.get("ptes")
    if not isinstance(hit, PteScan):
        hit = cache["ptes"] = user_ptes(m)
    return hit


def check_i1(m: Machine, cache: Cache | None = None) -> str | None:
    """Every present user PTE of the machine (one array for all mms) against private pfns."""
    scan = _user_ptes(m, cache)
    private = private_mask(m, cache)
    mapped = scan.pfns[scan.pfns < len(private)]  # PROT_NONE pfns are inverted (L1TF)
    hit = private[mapped]
    if hit.any():
        bad = np.unique(mapped[hit])
        return f"I1: a host-userspace PTE maps private page(s) pfn {_fmt(bad)}"
    return None


def intrusions(m: Machine, cache: Cache | None = None) -> dict[int, int]:
    """Per frame the memory controller saw a shared-KeyID write over TD lines: how many of
    its lines were hit (the model-only last-writer oracle; one entry per such frame, few)."""
    hit = cache.get("intrusions") if cache is not None else None
    if isinstance(hit, dict):
        return hit
    out = {pfn: int((keyids != NO_KEYID).sum()) for pfn, keyids in
           m.kernel.core.hw.mem.intruder.items()}
    if cache is not None:
        cache["intrusions"] = out
    return out


def check_i4(m: Machine, cache: Cache | None = None) -> str | None:
    """Mapcount: per pfn, present non-special user PTEs of every mm (one array) against
    _mapcount + 1. Refcount: per pfn, the references its holders own
    (:mod:`kvmpoison.explore.refcount`) against _refcount."""
    core = m.kernel.core
    scan = _user_ptes(m, cache)
    mem = core.pages
    # In _mapcount's own type and offset (-1: unmapped), as ufuncs on one type are the
    # fast ones.
    counted = np.bincount(scan.mapped, minlength=mem.nr_pages)[: mem.nr_pages].astype(np.int32)
    counted -= 1
    bad = nonzero(counted != mem._mapcount)
    if len(bad):
        bad = bad[bad != core.zero_pfn]
    if len(bad):
        p = int(bad[0])
        return (f"I4: pfn {_fmt(bad)}: mapcount {int(mem._mapcount[p]) + 1} but "
                f"{int(counted[p]) + 1} present PTE(s) map pfn {p:#x}")
    pins = cache.get(PINS, ()) if cache is not None else ()
    assert isinstance(pins, tuple)
    bad, held = refcount_mismatches(m, pins, scan)
    if held is not None:
        p = int(bad[0])
        return (f"I4: pfn {_fmt(bad)}: refcount {int(mem._refcount[p])} but its holders own "
                f"{int(held.expected[p])} ({held.describe(p)}) at pfn {p:#x}")
    return None


def check_i2(m: Machine, before: dict[int, int], private: list[ViewSource],
             cache: Cache | None = None) -> str | None:
    """New intrusions in this step on frames that are the TD's private pages before and after
    it (a frame the TD let go of in the step may be overwritten: its next owner clears it
    with KeyID 0, as a conversion's punch-hole then a fresh shared page does). ``before``:
    :func:`intrusions` before the step; ``private``: :func:`view_sources` before it, read
    only when there is a new intrusion."""
    now = intrusions(m, cache)
    hit = sorted(p for p, n in now.items() if n > before.get(p, 0))
    if not hit:
        return None
    pfns = np.array(hit, dtype=np.int64)  # frames of memory: each has a struct page
    bad = pfns[private_mask(m, sources=private)[pfns] & private_mask(m, cache)[pfns]]
    if len(bad):
        return f"I2: a host (shared-KeyID) write reached TD-private lines of pfn {_fmt(bad)}"
    return None


def free_pfns(m: Machine) -> I64:
    """Every pfn in the buddy free lists: PageBuddy heads expanded by their order."""
    mem = m.kernel.core.pages
    heads = np.flatnonzero(mem.flags & np.uint32(1 << PG_BUDDY_BIT)).astype(np.int64)
    counts = np.left_shift(1, mem.order[heads].astype(np.int64))
    starts = np.cumsum(counts) - counts
    return np.repeat(heads - starts, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def td_data_mask(m: Machine, pfns: I64) -> npt.NDArray[np.bool_]:
    """Which of ``pfns`` hold TD data (any line written with a TD-private KeyID)."""
    hw = m.kernel.core.hw
    phys = hw.mem
    if hw.cfg.integrity is IntegrityMode.OFF:
        return np.zeros(len(pfns), dtype=np.bool_)
    # Zero-form frames: one entry per (KeyID, generation) the machine has used, few. Every
    # pfn has a zero-form state (a stored frame's is stale): look all up, then overwrite
    # the stored frames (few) from their line flags.
    lut = np.array([hw.cfg.keyids.is_private(k) for k, _ in phys.zero_states], dtype=np.bool_)
    out: npt.NDArray[np.bool_] = lut[phys.zstate[pfns]]
    slots = phys.slot_of[pfns]
    stored = np.flatnonzero(slots)
    out[stored] = (phys.flags[slots[stored].astype(np.int64) - 1] & LINE_TD).any(axis=1)
    return out


def td_pfns(m: Machine) -> I64:
    """Every pfn holding TD data, sorted: :func:`td_data_mask` of every pfn, read from the
    few frames that can: stored frames (their line flags) and zero-form frames of a
    TD-private KeyID (none unless such a zero state was ever used)."""
    hw = m.kernel.core.hw
    phys = hw.mem
    if hw.cfg.integrity is IntegrityMode.OFF:
        return np.zeros(0, dtype=np.int64)
    stored = nonzero(phys.slot_of)
    td = stored[(phys.flags[phys.slot_of[stored] - 1] & LINE_TD).any(axis=1)]
    private = [z for z, (k, _) in enumerate(phys.zero_states) if hw.cfg.keyids.is_private(k)]
    if not private:
        return td
    if len(private) == 1:
        zeros = nonzero(phys.zstate == private[0])
    else:
        lut = np.zeros(len(phys.zero_states), dtype=np.bool_)
        lut[private] = True
        zeros = nonzero(lut[phys.zstate])
    zeros = zeros[phys.slot_of[zeros] == 0]  # a stored frame's zero state is stale
    return np.sort(np.concatenate((td, zeros)))


_ORDERS = np.arange(11, dtype=np.int64)  # MAX_ORDER
_ORDER_MASKS = ~((np.int64(1) << _ORDERS) - 1)
_BUDDY = np.uint32(1 << PG_BUDDY_BIT)


def free_mask(m: Machine, pfns: I64) -> npt.NDArray[np.bool_]:
    """Which of ``pfns`` lie in a buddy free block: a PageBuddy head of order o at the pfn
    rounded down to 2^o, for some o (one gather of every pfn's 11 candidate heads)."""
    if not len(pfns):
        return np.zeros(0, dtype=np.bool_)
    mem = m.kernel.core.pages
    heads = pfns[:, None] & _ORDER_MASKS[None, :]
    buddy = (mem.flags[heads] & _BUDDY) != 0
    return np.asarray((buddy & (mem.order[heads] == _ORDERS[None, :])).any(axis=1),
                      dtype=np.bool_)


def check_i5(m: Machine, cache: Cache | None = None) -> str | None:
    """The pages that are poisoned or hold TD data (few), then which of them are free."""
    mem = m.kernel.core.pages
    poisoned = nonzero(mem.flags & mem.m_hwpoison)
    td = td_pfns(m)
    if not len(poisoned) and not len(td):
        return None
    free = free_mask(m, np.concatenate((poisoned, td)))
    problems = []
    # A latent DRAM error nobody consumed is not here: the kernel cannot know of it (I6
    # covers poison the kernel has seen).
    for what, pfns, is_free in (("PG_hwpoison", poisoned, free[: len(poisoned)]),
                                ("TD data", td, free[len(poisoned) :])):
        if is_free.any():
            problems.append(f"pfn {_fmt(pfns[is_free])} with {what}")
    if problems:
        return "I5: free page(s) in the allocator: " + "; ".join(problems)
    return None


def really_poisoned(m: Machine) -> I64:
    """Frames with a real (DRAM) error on some line; one dict entry per such frame, few."""
    hw_poison = m.kernel.core.hw.mem.hw_poison
    return np.array(sorted(p for p, lines in hw_poison.items() if lines.any()), dtype=np.int64)


def seen_poison(m: Machine, reports_from: int = 0, mces_from: int = 0) -> I64:
    """The really poisoned frames the kernel's error handling ran on while the error was
    there, and left PG_hwpoison: memory_failure reported on them (its log from index
    ``reports_from``), or a TD's consumption reached the host's SEAM_NR handling (the #MC
    log from ``mces_from``). The monitor passes the logs' lengths before the step, so a
    report on a frame before its error appeared is not seeing that error. PG_hwpoison alone
    is not seeing one: the RFC designs set it to protect a page, and a latent error nobody
    consumed reaches no kernel code."""
    core = m.kernel.core
    if not core.hw.mem.hw_poison:
        return np.zeros(0, dtype=np.int64)
    handled = {r.pfn for r in core.mf_reports[reports_from:] if isinstance(r, MfReport)}
    handled.update(core.mce_log[mces_from:])
    if not handled:
        return np.zeros(0, dtype=np.int64)
    real = really_poisoned(m)
    real = real[np.isin(real, np.fromiter(handled, dtype=np.int64, count=len(handled)))]
    mem = core.pages
    seen: I64 = real[(mem.flags[real] & np.uint32(mem.mask(PG.hwpoison))) != 0]
    return seen


def check_i6(m: Machine, seen: I64) -> str | None:
    """``seen``: the frames :func:`seen_poison` returned after earlier steps."""
    if not len(seen):
        return None
    mem = m.kernel.core.pages
    lost = seen[(mem.flags[seen] & np.uint32(mem.mask(PG.hwpoison))) == 0]
    if len(lost):
        free = np.isin(lost, free_pfns(m))
        where = "back in the allocator" if free.any() else "still in use"
        return (f"I6: PG_hwpoison of really poisoned pfn {_fmt(lost)} was cleared ({where}): "
                "the next user consumes the error unwarned")
    return None


def check_i7_shared(m: Machine, cache: Cache | None = None) -> str | None:
    """A shared gfn's EPT page must be the page the VMM maps at that gfn's address."""
    for inst in live(m):
        v = guest_view(inst, cache)
        shared = ~v.private
        if not shared.any():
            continue
        gfns, pfns = v.gfns[shared], v.pfns[shared]
        q = vmm_pfns(inst, cache)[gfns]  # a view's gfns are RAM's, as vmm_pfns's are
        bad = (q >= 0) & (q != pfns)
        if bad.any():
            return (f"I7: shared gfn {_fmt(gfns[bad])} of {inst.spec.name}: the guest uses "
                    f"pfn {_fmt(pfns[bad])}, the VMM maps pfn {_fmt(q[bad])}")
    return None


def check_i8(m: Machine, cache: Cache | None = None) -> str | None:
    stale = stale_tlb_entries(m)
    if stale:
        e = stale[0]
        more = f" (+{len(stale) - 1} more)" if len(stale) > 1 else ""
        return (f"I8: CPU {e.cpu} caches PTE {e.cached:#x} for {e.vaddr:#x} of mm {e.mm}, "
                f"but the PTE is {e.current:#x} now{more}")
    return None


StateCheck = Callable[[Machine, Cache | None], str | None]
STATE_CHECKS: dict[str, StateCheck] = {"I1": check_i1, "I4": check_i4, "I5": check_i5,
                                       "I7": check_i7_shared, "I8": check_i8}
