"""TLB flushes drop exactly the translations in range, by either strategy."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpoison.arch.x86.tlb import Tlb

PAGE = 4096


@given(entries=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 64)), max_size=40),
       asid=st.integers(0, 2), lo=st.integers(0, 64), pages=st.integers(0, 70))
def test_flush_range_drops_exactly_the_range(entries: list[tuple[int, int]], asid: int,
                                             lo: int, pages: int) -> None:
    tlb = Tlb(capacity=64)
    for a, vpn in entries:
        tlb.fill(a, vpn * PAGE, (vpn << 12) | 1)
    before = {(a, vpn) for a, vpn in entries}
    tlb.flush_range(asid, lo * PAGE, (lo + pages) * PAGE)
    for a, vpn in before:
        gone = a == asid and lo <= vpn < lo + pages
        assert (tlb.lookup(a, vpn * PAGE) is None) == gone


def test_capacity_evicts_the_oldest() -> None:
    tlb = Tlb(capacity=2)
    for vpn in range(3):
        tlb.fill(1, vpn * PAGE, vpn)
    assert tlb.lookup(1, 0) is None and tlb.lookup(1, 2 * PAGE) == 2 and len(tlb) == 2


@given(ops=st.lists(st.tuples(st.sampled_from(["fill", "flush", "flush_asid"]),
                              st.integers(0, 2), st.integers(0, 40), st.integers(0, 45)),
                    max_size=80))
def test_tlb_matches_a_reference_lru_dict(ops: list[tuple[str, int, int, int]]) -> None:
    """Any mix of fills and flushes leaves the TLB equal to a plain reference model."""
    tlb = Tlb(capacity=16)
    ref: dict[tuple[int, int], int] = {}
    for op, asid, vpn, pages in ops:
        if op == "fill":
            ref.pop((asid, vpn), None)
            ref[(asid, vpn)] = vpn
            while len(ref) > 16:
                del ref[next(iter(ref))]
            tlb.fill(asid, vpn * PAGE, vpn)
        elif op == "flush":
            for key in [k for k in ref if k[0] == asid and vpn <= k[1] < vpn + pages]:
                del ref[key]
            tlb.flush_range(asid, vpn * PAGE, (vpn + pages) * PAGE)
        else:
            for key in [k for k in ref if k[0] == asid]:
                del ref[key]
            tlb.flush_asid(asid)
    for asid in range(3):
        for vpn in range(41):
            assert tlb.lookup(asid, vpn * PAGE) == ref.get((asid, vpn))
