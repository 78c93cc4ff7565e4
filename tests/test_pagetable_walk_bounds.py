"""Walks cost what is mapped: a PUD table with one PMD table is not stepped GiB by GiB."""

from __future__ import annotations

import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE
from kvmpoison.mm.pagetable import PageTables


def test_chunks_skip_the_gibs_of_a_pud_table_that_have_no_pmd_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    k = Kernel.boot(KernelConfig(version=KernelVersion.V6_18),
                    PlatformConfig(mem_bytes=16 << 20, integrity=IntegrityMode.OFF))
    p = Process.spawn(k, "t")
    addr = p.mmap(0, 8 << 12, 3, MAP_PRIVATE | MAP_ANONYMOUS).value
    assert addr is not None
    assert p.store(addr, b"x" * (8 << 12)).succeeded
    pgd = p.mm.pgd
    base = (addr >> 39) << 39  # the 512 GiB the mapping sits in
    calls = 0
    real = PageTables._pmd_table

    def counting(self: PageTables, a: int, alloc: bool) -> object:
        nonlocal calls
        calls += 1
        return real(self, a, alloc)

    monkeypatch.setattr(PageTables, "_pmd_table", counting)
    got = list(pgd.chunks(base, base + (1 << 39)))
    assert sum(len(c.addr) for c in got) == 512  # the one PTE table's slots
    assert calls == 1  # one GiB has a PMD table; the other 511 are skipped unvisited


def test_a_walk_over_the_whole_address_space_visits_only_what_is_mapped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM zaps a protected VM's whole guest-physical space (hardened's boot-time unshare):
    the empty 512 GiB regions are skipped together, not one by one."""
    k = Kernel.boot(KernelConfig(version=KernelVersion.V6_18),
                    PlatformConfig(mem_bytes=16 << 20, integrity=IntegrityMode.OFF))
    p = Process.spawn(k, "t")
    addr = p.mmap(0, 1 << 12, 3, MAP_PRIVATE | MAP_ANONYMOUS).value
    assert addr is not None and p.store(addr, b"x").succeeded
    lookups = 0
    real = PageTables._index

    def counting(a: int, shift: int) -> int:
        nonlocal lookups
        lookups += 1
        return real(a, shift)

    monkeypatch.setattr(PageTables, "_index", staticmethod(counting))
    got = list(p.mm.pgd.chunks(0, 1 << 48))
    assert sum(len(c.addr) for c in got) == 512
    assert lookups < 64  # a handful per level, not one per 512 GiB or per GiB


def test_a_walk_skips_to_a_table_further_on_and_past_the_last() -> None:
    """Two mappings 512 GiB and more apart: the walk over everything finds both (the empty
    regions between them skipped, and the empty tail after the last)."""
    k = Kernel.boot(KernelConfig(version=KernelVersion.V6_18),
                    PlatformConfig(mem_bytes=16 << 20, integrity=IntegrityMode.OFF))
    pgd = Process.spawn(k, "t").mm.pgd
    low, high = 5 << 30, (3 << 39) + (7 << 30)  # PGD slots 0 and 3; PUD slots 5 and 7
    pgd.set(low, 0x1000 | 1)
    pgd.set(high, 0x2000 | 1)
    got = [(int(a), int(pgd.store.rows[r, c])) for ch in pgd.chunks(0, 1 << 48)
           for a, r, c in zip(ch.addr, ch.rows, ch.cols, strict=True) if pgd.store.rows[r, c]]
    assert got == [(low, 0x1001), (high, 0x2001)]
    assert [len(ch.addr) for ch in pgd.chunks(1 << 30, 1 << 48)] == [512, 512]
    assert list(pgd.chunks(high + (2 << 30), 1 << 48)) == []
