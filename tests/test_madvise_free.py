"""MADV_FREE (mm/madvise.c, v5.12 and 6.18): lazy free of anonymous memory only."""

from __future__ import annotations

import pytest

from helpers import PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.mm.madvise import MADV_FREE, MADV_PAGEOUT
from kvmpoison.mm.memory_failure import memory_failure
from kvmpoison.mm.mmap import MAP_SHARED
from kvmpoison.mm.ptdump import decode

V6_18_MF = KernelConfig(version=KernelVersion.V6_18, memory_failure=True)


def test_madv_free_keeps_data_until_reclaim() -> None:
    p = proc(boot())
    addr = anon(p, 2, fill=7)
    assert p.madvise(addr, 2 * PAGE, MADV_FREE).cell == "ret:0"
    assert p.load(addr, 4).data == b"\x07" * 4  # no reclaim ran: the page is still there
    assert p.mm.rss_anon == 2


def test_madv_free_refuses_a_shared_mapping() -> None:
    p = proc(boot())
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, PAGE))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    ok(p.store(addr, b"\x05"))
    assert p.madvise(addr, PAGE, MADV_FREE).cell == "err:EINVAL"
    assert p.load(addr, 1).data == b"\x05"


def test_madv_free_drops_swapped_out_pages() -> None:
    k = boot()
    p = proc(k)
    addr = anon(p, 1, fill=9)
    ok(p.madvise(addr, PAGE, MADV_PAGEOUT))
    assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "swap"
    slots = len(k.core.swap_space)
    assert p.madvise(addr, PAGE, MADV_FREE).cell == "ret:0"
    assert p.mm.pgd.get(addr) == 0 and len(k.core.swap_space) == slots - 1
    assert p.load(addr, 1).data == b"\x00"


@pytest.mark.parametrize(("kcfg", "after"), [(RFC_BASE, "sig:SIGBUS:BUS_MCEERR_AR"),
                                             (V6_18_MF, "ok")])
def test_madv_free_hwpoison_entry_kept_in_5_12_cleared_in_6_x(kcfg: KernelConfig,
                                                             after: str) -> None:
    k = boot(kcfg)
    p, other = proc(k), proc(k, "injector")
    addr = anon(p, 1, fill=3)
    assert memory_failure(k.core, pte_pfn(p.mm.pgd.get(addr)), 0, other.pid) == 0
    assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "hwpoison"
    assert p.madvise(addr, PAGE, MADV_FREE).cell == "ret:0"
    assert p.load(addr, 1).cell.startswith(after)
