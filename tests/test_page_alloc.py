"""The buddy allocator and struct page accessors."""

import random
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.mm.page import (
    PageArray,
    PageHead,
    PageHWPoison,
    SetPageHWPoison,
    TestClearPageHWPoison,
    TestSetPageHWPoison,
    compound_head,
    get_page,
    page_count,
    put_page,
)
from kvmpoison.mm.page_alloc import MAX_ORDER, BuddyAllocator
from kvmpoison.mm.page_flags import PG, PageFlagBits

NPAGES = 1 << 14  # 64 MiB


def fresh(cfg: KernelConfig = RFC_BASE) -> BuddyAllocator:
    return BuddyAllocator(PageArray(NPAGES, PageFlagBits.for_config(cfg)), reserved=1)


def test_hwpoison_bit_numbers_per_kernel() -> None:
    assert PageFlagBits.for_config(RFC_BASE).bit[PG.hwpoison] == 23
    assert PageFlagBits.for_config(THIS_MACHINE).bit[PG.hwpoison] == 21
    assert PageFlagBits.for_config(RFC_BASE).bit[PG.swapbacked] == 19
    assert PageFlagBits.for_config(THIS_MACHINE).bit[PG.swapbacked] == 17


def test_boot_leaves_everything_but_reserved_free() -> None:
    buddy = fresh()
    assert buddy.nr_free == NPAGES - 1


def test_bulk_alloc_and_free_merge_back_to_max_order() -> None:
    buddy = fresh()
    pfns = buddy.alloc_pages_bulk(5000)
    assert len(np.unique(pfns)) == 5000 and buddy.nr_free == NPAGES - 1 - 5000
    assert (buddy.mem._refcount[pfns] == 1).all()
    buddy.mem._refcount[pfns] = 0
    buddy.free_pages_bulk(pfns)
    assert buddy.nr_free == NPAGES - 1
    # Everything from 1024 up is whole order-10 blocks again.
    top = buddy.areas[MAX_ORDER - 1]
    live = top.stack[: top.top][buddy._is_free(top.stack[: top.top], MAX_ORDER - 1)]
    assert len(live) == NPAGES // 1024 - 1


def test_put_page_frees_at_zero() -> None:
    buddy = fresh()
    page = buddy.alloc_pages(0)
    assert page is not None
    before = buddy.nr_free
    get_page(page)
    put_page(page)
    assert buddy.nr_free == before and page_count(page) == 1
    put_page(page)
    assert buddy.nr_free == before + 1
    with pytest.raises(AssertionError, match="free"):
        put_page(page)


def test_hwpoisoned_pages_never_return_to_the_free_lists() -> None:
    buddy = fresh()
    page = buddy.alloc_pages(0)
    assert page is not None
    SetPageHWPoison(page)
    before = buddy.nr_free
    put_page(page)
    assert buddy.nr_free == before and buddy.withheld_hwpoison == 1
    assert PageHWPoison(page)


def test_free_pages_prepare_hook_runs_before_the_hwpoison_check() -> None:
    buddy = fresh()
    seen: list[int] = []

    def unpoison(pfns: np.ndarray) -> None:  # what the RFC's kvm_unpoison_page does
        seen.extend(int(p) for p in pfns)
        for p in pfns:
            TestClearPageHWPoison(buddy.mem[int(p)])

    buddy.free_pages_prepare_hooks.append(unpoison)
    page = buddy.alloc_pages(0)
    assert page is not None
    SetPageHWPoison(page)
    before = buddy.nr_free
    put_page(page)
    assert seen == [page.pfn] and buddy.nr_free == before + 1


def test_compound_pages() -> None:
    buddy = fresh()
    head = buddy.alloc_pages(9, compound=True)
    assert head is not None and PageHead(head) and head.pfn % 512 == 0
    tail = buddy.mem[head.pfn + 77]
    assert compound_head(tail) == head
    get_page(tail)
    assert page_count(head) == 2
    assert not TestSetPageHWPoison(tail) and PageHWPoison(tail) and not PageHWPoison(head)


@settings(max_examples=25, deadline=timedelta(seconds=5))
@given(
    st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_alloc_free_in_any_order_conserves_pages(sizes: list[int], rnd: random.Random) -> None:
    buddy = fresh()
    batches = [buddy.alloc_pages_bulk(n) for n in sizes]
    everything = np.concatenate(batches)
    assert len(np.unique(everything)) == len(everything)  # never handed out twice
    rnd.shuffle(batches)
    for batch in batches:
        buddy.mem._refcount[batch] = 0
        buddy.free_pages_bulk(batch)
    assert buddy.nr_free == NPAGES - 1
    again = buddy.alloc_pages_bulk(NPAGES - 1)
    assert len(np.unique(again)) == NPAGES - 1  # nothing lost, nothing duplicated


def _alloc_by_add_range(b: BuddyAllocator, order: int) -> int | None:
    """alloc_pages as it was before its scalar split: the upper halves through _add_range."""
    for have in range(order, MAX_ORDER):
        heads = b._pop(have, 1)
        if len(heads):
            break
    else:
        return None
    head = int(heads[0])
    if have > order:
        b._add_range(head + (1 << order), head + (1 << have))
    span = slice(head, head + (1 << order))
    b.mem.flags[span] = 0
    b.mem._mapcount[span] = -1
    b.mem.mapping[span] = 0
    b.mem.index[span] = 0
    b.mem._refcount[span] = 0
    b.mem._refcount[head] = 1
    b.mem.order[span] = 0
    return head


def _free_area_state(b: BuddyAllocator) -> list[object]:
    return [b.nr_free, b.mem.flags.tobytes(), b.mem.order.tobytes(), b.mem._refcount.tobytes(),
            b.mem._mapcount.tobytes()] + [a.stack[: a.top].tolist() for a in b.areas]


def test_alloc_pages_splits_as_add_range_would() -> None:
    """Every pfn handed out, and the free areas after, match the _add_range split."""
    fast, ref = fresh(), fresh()
    rng = random.Random(7)
    held: list[tuple[int, int]] = []
    for _ in range(400):
        if held and rng.random() < 0.3:  # free something, so later splits start mid-block
            pfn, order = held.pop(rng.randrange(len(held)))
            for b in (fast, ref):
                b.mem._refcount[pfn] = 0
                b.free_pages_bulk(np.arange(pfn, pfn + (1 << order), dtype=np.int64))
            continue
        order = rng.choice([0, 0, 0, 1, 2, 5])
        page = fast.alloc_pages(order)
        got = _alloc_by_add_range(ref, order)
        assert page is not None and page.pfn == got
        held.append((got, order))
        assert _free_area_state(fast) == _free_area_state(ref)
