"""CPUs and their TLBs. Flushes are explicit, so a missing flush is observable.

Follows the contract of ``arch/x86/mm/tlb.c`` (``flush_tlb_mm_range``: every
CPU that may cache the mm's translations drops those in the range). Each
TLB caches whole leaf PTE values keyed by (mm, virtual page), with FIFO
eviction at a fixed capacity; a range flush costs O(min(pages, capacity)).
"""

from __future__ import annotations

from collections import OrderedDict

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT

TLB_ENTRIES = 1536  # a second-level TLB's worth


class Tlb:
    def __init__(self, capacity: int = TLB_ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.flushes = 0

    def lookup(self, asid: int, vaddr: int) -> int | None:
        return self._entries.get((asid, vaddr >> PAGE_SHIFT))

    def fill(self, asid: int, vaddr: int, pte: int) -> None:
        key = (asid, vaddr >> PAGE_SHIFT)
        self._entries[key] = pte
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def flush_range(self, asid: int, start: int, end: int) -> None:
        lo, hi = start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        entries = self._entries
        if hi - lo <= len(entries):  # a short range: probe its pages, O(pages)
            for vpn in range(lo, hi):
                entries.pop((asid, vpn), None)
        else:
            for key in [k for k in entries if k[0] == asid and lo <= k[1] < hi]:
                del entries[key]
        self.flushes += 1

    def flush_asid(self, asid: int) -> None:
        for key in [k for k in self._entries if k[0] == asid]:
            del self._entries[key]
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
