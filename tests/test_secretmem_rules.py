"""memfd_secret (mm/secretmem.c, 6.18): its size rule and its lazily filled, locked VMAs."""

from __future__ import annotations

from helpers import PAGE, RW, boot, ok, proc
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.mm.mmap import MAP_NONBLOCK, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED


def test_ftruncate_once_the_size_is_set_is_einval_even_to_the_same_size() -> None:
    p = proc(boot(THIS_MACHINE))
    fd = ok(p.memfd_secret())
    assert p.ftruncate(fd, 0).cell == "ret:0"
    assert p.ftruncate(fd, PAGE).cell == "ret:0"  # i_size was still 0
    assert p.ftruncate(fd, PAGE).cell == "err:EINVAL"


def test_mmap_does_not_populate_a_vma_locked_by_its_driver() -> None:
    p = proc(boot(THIS_MACHINE))
    fd = ok(p.memfd_secret())
    ok(p.ftruncate(fd, PAGE))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    assert p.mm.pgd.get(addr) == 0 and p.mm.locked_vm == 1
    assert p.mmap(0, PAGE, RW, MAP_PRIVATE, fd).cell == "err:EINVAL"
    ok(p.store(addr, b"s"))
    assert p.mm.pgd.get(addr) != 0


def test_map_populate_with_map_nonblock_does_not_populate() -> None:
    p = proc(boot(THIS_MACHINE))
    addr = ok(p.mmap(0, PAGE, RW, 0x22 | MAP_POPULATE | MAP_NONBLOCK))
    assert p.mm.pgd.get(addr) == 0
    addr = ok(p.mmap(0, PAGE, RW, 0x22 | MAP_POPULATE))
    assert p.mm.pgd.get(addr) != 0
