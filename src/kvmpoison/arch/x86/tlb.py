"""CPUs and their TLBs. Flushes are explicit, so a missing flush is observable.

Follows the contract of ``arch/x86/mm/tlb.c`` (``flush_tlb_mm_range``: every
CPU that may cache the mm's translations drops those in the range).
Simplified: no PCID/ASID generations, no lazy-TLB mode, no full-flush
ceiling (``tlb_single_page_flush_ceiling``); every CPU is flushed. Each
TLB caches whole leaf PTE values keyed by (mm, virtual page), with FIFO
eviction at a fixed capacity; a range flush costs O(min(pages, capacity)).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT

TLB_ENTRIES = 1536  # a second-level TLB's worth


class Tlb:
    def __init__(self, capacity: int = TLB_ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._per_asid: Counter[int] = Counter()  # entries held per address space
        self.flushes = 0

    def __deepcopy__(self, memo: dict[int, object]) -> Tlb:
        """Keys and values are ints and tuples of ints: shallow copies share nothing mutable."""
        new = Tlb(self.capacity)
        memo[id(self)] = new
        new._entries = OrderedDict(self._entries)
        new._per_asid = Counter(self._per_asid)
        new.flushes = self.flushes
        return new

    def lookup(self, asid: int, vaddr: int) -> int | None:
        return self._entries.get((asid, vaddr >> PAGE_SHIFT))

    def fill(self, asid: int, vaddr: int, pte: int) -> None:
        key = (asid, vaddr >> PAGE_SHIFT)
        if key not in self._entries:
            self._per_asid[asid] += 1
        self._entries[key] = pte
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            (old_asid, _), _ = self._entries.popitem(last=False)
            self._per_asid[old_asid] -= 1

    def flush_range(self, asid: int, start: int, end: int) -> None:
        self.flushes += 1
        if not self._per_asid[asid]:  # nothing of this mm cached here
            return
        lo, hi = start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        entries = self._entries
        if hi - lo <= len(entries):  # a short range: probe its pages, O(pages)
            gone = sum(entries.pop((asid, vpn), None) is not None for vpn in range(lo, hi))
        else:
            stale = [k for k in entries if k[0] == asid and lo <= k[1] < hi]
            for key in stale:
                del entries[key]
            gone = len(stale)
        self._per_asid[asid] -= gone

    def flush_asid(self, asid: int) -> None:
        for key in [k for k in self._entries if k[0] == asid]:
            del self._entries[key]
        self._per_asid[asid] = 0
        self.flushes += 1

    def __len__(self) -> int:
        return len(self._entries)


class Cpu:
    def __init__(self, cpu_id: int):
        self.cpu_id = cpu_id
        self.tlb = Tlb()


def flush_tlb_mm_range(cpus: list[Cpu], asid: int, start: int, end: int) -> None:
    """Shoot down [start, end) of one address space on every CPU."""
    for cpu in cpus:
        cpu.tlb.flush_range(asid, start, end)
