"""zap_pte_range with and without zap_details, per kernel version (mm/memory.c)."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import PAGE, RW, SHARED, boot, cached, ok, proc, some
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_GUARD_INSTALL
from kvmpoison.mm.mmap import MAP_PRIVATE
from kvmpoison.mm.page import SetPageHWPoison, lock_page, page_count, unlock_page
from kvmpoison.mm.ptdump import decode
from kvmpoison.mm.rmap import TTU, try_to_unmap

PUNCH = 0x3  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
V5_12 = RFC_BASE
V6_18 = dataclasses.replace(RFC_BASE, version=KernelVersion.V6_18)  # MEMORY_FAILURE on


def _poisoned_shmem(kcfg: KernelConfig, holds_ref: bool = False):  # type: ignore[no-untyped-def]
    """A memfd page mapped MAP_SHARED, then poisoned and unmapped to a hwpoison entry."""
    k = boot(kcfg)
    k.core.hooks.hwpoison_entry_holds_ref = holds_ref
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, 2 * PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, 2 * PAGE, RW, SHARED, fd))
    ok(p.store(addr, b"old data"))
    pfn = some(cached(p, fd, 0))
    page = k.core.pages[pfn]
    lock_page(page)
    SetPageHWPoison(page)
    flags = TTU.IGNORE_MLOCK | (TTU.IGNORE_HWPOISON if kcfg.version >= KernelVersion.V6_18
                                else TTU(0))  # bit 0x20 is TTU_HWPOISON on v6.x
    assert try_to_unmap(page, flags)
    unlock_page(page)
    assert decode(p.mm.pgd.get(addr), kcfg).kind == "hwpoison"
    return k, p, fd, addr, page


@pytest.mark.parametrize(("kcfg", "punch_keeps", "truncate_keeps"), [
    (V5_12, True, True),  # "if (unlikely(details)) continue;"
    (V6_18, True, False),  # should_zap_cows: even_cows only on truncate
], ids=["v5.12", "v6.18"])
def test_hwpoison_entry_survives_zap_with_details(kcfg: KernelConfig, punch_keeps: bool,
                                                  truncate_keeps: bool) -> None:
    _, p, fd, addr, _ = _poisoned_shmem(kcfg)
    assert p.fallocate(fd, PUNCH, 0, PAGE).cell == "ret:0"
    kind = decode(p.mm.pgd.get(addr), kcfg).kind
    assert kind == ("hwpoison" if punch_keeps else "none")
    assert p.ftruncate(fd, 0).cell == "ret:0"
    kind = decode(p.mm.pgd.get(addr), kcfg).kind
    assert kind == ("hwpoison" if truncate_keeps else "none")
    expected = "sig:SIGBUS:BUS_MCEERR_AR" if truncate_keeps else "sig:SIGBUS:BUS_ADRERR"
    assert p.load(addr, 1).cell == expected


def test_kept_entry_keeps_the_rfc_reference_until_munmap() -> None:
    _, p, fd, addr, page = _poisoned_shmem(V5_12, holds_ref=True)
    assert page_count(page) == 2  # page cache + the entry (RFCv2 10/13)
    assert p.fallocate(fd, PUNCH, 0, PAGE).cell == "ret:0"
    assert page_count(page) == 1  # the entry's reference stays: the frame is not freed
    assert decode(p.mm.pgd.get(addr), V5_12).kind == "hwpoison"
    assert p.munmap(addr, 2 * PAGE).cell == "ret:0"
    assert page_count(page) == 0 and p.mm.pgd.get(addr) == 0  # unmap_vmas zaps everything


@pytest.mark.parametrize("kcfg", [V5_12, V6_18], ids=["v5.12", "v6.18"])
def test_hole_punch_keeps_private_cow_copies_truncate_drops_them(kcfg: KernelConfig) -> None:
    k = boot(kcfg)
    p = proc(k)
    fd = ok(p.memfd_create("m"))
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    addr = ok(p.mmap(0, PAGE, RW, MAP_PRIVATE, fd))
    ok(p.store(addr, b"cow copy"))  # a private anonymous copy of the file page
    assert p.fallocate(fd, PUNCH, 0, PAGE).cell == "ret:0"
    assert p.load(addr, 8).data == b"cow copy"  # check_mapping / should_zap_page
    assert p.ftruncate(fd, 0).cell == "ret:0"  # even_cows
    assert p.load(addr, 1).cell == "sig:SIGBUS:BUS_ADRERR"


def test_v6_18_madv_dontneed_keeps_guard_markers_munmap_drops_them() -> None:
    kcfg = KernelConfig(version=KernelVersion.V6_18, memory_failure=False)
    k = boot(kcfg)
    p = proc(k)
    addr = ok(p.mmap(0, 2 * PAGE, RW, MAP_PRIVATE | 0x20))
    assert p.madvise(addr, PAGE, MADV_GUARD_INSTALL).cell == "ret:0"
    assert p.madvise(addr, 2 * PAGE, MADV_DONTNEED).cell == "ret:0"
    assert decode(p.mm.pgd.get(addr), kcfg).kind == "pte_marker"  # the guard survives
    assert p.munmap(addr, 2 * PAGE).cell == "ret:0"  # ZAP_FLAG_DROP_MARKER
    assert p.mm.pgd.get(addr) == 0
    assert p.load(addr, 1).cell == "sig:SIGSEGV:SEGV_MAPERR"  # no VMA now
