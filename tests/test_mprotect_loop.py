"""mprotect(2) as do_mprotect_pkey/mprotect_fixup/change_pte_range do it (v5.12, 6.18)."""

from __future__ import annotations

import pytest

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.mm.file import O_RDONLY
from kvmpoison.mm.mmap import MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PROT_READ


def test_vmas_before_a_hole_keep_the_new_protection() -> None:
    p = proc(boot())
    base = ok(p.mmap(0x4000_0000, 3 * PAGE, RW, ANON | MAP_FIXED))
    ok(p.munmap(base + 2 * PAGE, PAGE))
    ok(p.mmap(base + 3 * PAGE, PAGE, RW, ANON | MAP_FIXED))
    ok(p.store(base, b"x"))
    assert p.mprotect(base, 4 * PAGE, PROT_READ).cell == "err:ENOMEM"
    assert p.store(base, b"y").cell == "sig:SIGSEGV:SEGV_ACCERR"  # changed before the hole


def test_a_refused_vma_stops_the_loop_after_earlier_ones_changed() -> None:
    p = proc(boot())
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, PAGE))
    p.task.fds[fd].f_flags = O_RDONLY
    base = ok(p.mmap(0x5000_0000, PAGE, PROT_READ, ANON | MAP_FIXED))
    ok(p.mmap(base + PAGE, PAGE, PROT_READ, MAP_SHARED | MAP_FIXED, fd))
    assert p.mprotect(base, 2 * PAGE, RW).cell == "err:EACCES"
    assert p.store(base, b"z").succeeded  # the anonymous VMA became writable first


def test_prot_sem_accepted_and_zero_length_checks_nothing() -> None:
    p = proc(boot())
    addr = anon(p, 1)
    assert p.mprotect(addr, PAGE, RW | 0x8).cell == "ret:0"
    assert p.mprotect(addr, 0, 0x80).cell == "ret:0"


@pytest.mark.parametrize(("kcfg", "writable"), [(RFC_BASE, False), (THIS_MACHINE, True)])
def test_exclusive_anon_pte_made_writable_only_from_6_x(kcfg: KernelConfig,
                                                        writable: bool) -> None:
    p = proc(boot(kcfg))
    addr = anon(p, 1, fill=1)
    ok(p.mprotect(addr, PAGE, PROT_READ))
    ok(p.mprotect(addr, PAGE, RW))
    assert bool(p.mm.pgd.get(addr) & _PAGE_RW) is writable


def test_locked_private_mapping_made_writable_breaks_cow_at_once() -> None:
    p = proc(boot())
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, PAGE))
    addr = ok(p.mmap(0, PAGE, PROT_READ, MAP_PRIVATE, fd))
    ok(p.mlock(addr, PAGE))
    file_pfn = pte_pfn(p.mm.pgd.get(addr))
    ok(p.mprotect(addr, PAGE, RW))
    assert pte_pfn(p.mm.pgd.get(addr)) != file_pfn  # populate_vma_page_range wrote (COW)
