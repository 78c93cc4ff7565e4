"""``PageTables.chunks`` yields exactly the PTE slots of the range that have a table, in
address order, whatever the range (it only walks what is mapped)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.mm.core import MmCore

PAGE = 4096
PMD = 1 << 21
GIB = 1 << 30


@settings(max_examples=40, deadline=3000)
@given(mapped=st.lists(st.integers(0, 3 * 512 * 512 - 1), min_size=1, max_size=30),
       lo=st.integers(0, 3 * GIB), span=st.integers(1, 3 * GIB))
def test_chunks_yield_the_slots_of_every_mapped_pmd_in_range(
        mapped: list[int], lo: int, span: int) -> None:
    core = MmCore.boot(THIS_MACHINE, PlatformConfig(mem_bytes=16 << 20,
                                                    integrity=IntegrityMode.OFF))
    pgd = core.mm_alloc().pgd
    base = 0x7F00_0000_0000  # a user address, PUD-aligned
    for page in mapped:
        pgd.set(base + page * PAGE, 0x1000 | 1)  # builds the tables of that page's PMD
    start = base + (lo & ~(PAGE - 1))
    end = min(start + ((span + PAGE - 1) & ~(PAGE - 1)), base + 3 * GIB)
    got_addr: list[int] = []
    got_slots: list[tuple[int, int]] = []
    for chunk in pgd.chunks(start, end):
        got_addr.extend(chunk.addr.tolist())
        got_slots.extend(zip(chunk.rows.tolist(), chunk.cols.tolist(), strict=True))
    want_addr, want_slots = [], []
    tabled = {(base + p * PAGE) // PMD for p in mapped}
    for pmd in sorted(tabled):
        for addr in range(max(pmd * PMD, start), min((pmd + 1) * PMD, end), PAGE):
            slot = pgd.pte_slot(addr)
            assert slot is not None
            want_addr.append(addr)
            want_slots.append(slot)
    assert got_addr == want_addr and got_slots == want_slots
    assert np.all(np.diff(np.array(got_addr, dtype=np.int64)) > 0) if len(got_addr) > 1 else True
