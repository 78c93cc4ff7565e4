"""Punch-hole and truncate zero the partial pages at the range's edges (shmem and a disk file)."""

from __future__ import annotations

import pytest

from helpers import PAGE, RW, anon, boot, ok, proc
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.mmap import MAP_SHARED

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def filled(kind: str) -> tuple[Kernel, Process, int]:
    k = boot()
    p = proc(k)
    if kind == "memfd":
        fd = ok(p.memfd_create("m"))
        ok(p.ftruncate(fd, 2 * PAGE))
        buf = anon(p, 2, fill=0x11)
        assert ok(p.pwrite(fd, buf, 2 * PAGE, 0)) == 2 * PAGE
    else:
        k.create_file("/f", b"\x11" * 2 * PAGE)
        fd = ok(p.open("/f", O_RDWR))
    return k, p, fd


def contents(p: Process, fd: int, size: int) -> bytes:
    buf = anon(p, 2)
    assert ok(p.pread(fd, buf, size, 0)) == size
    return p.load(buf, size).data or b""


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_punch_hole_zeroes_the_partial_edges(kind: str) -> None:
    _, p, fd = filled(kind)
    assert p.fallocate(fd, PUNCH, 100, 5000).cell == "ret:0"
    data = contents(p, fd, 2 * PAGE)
    assert data == b"\x11" * 100 + bytes(5000) + b"\x11" * (2 * PAGE - 5100)


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_punch_inside_one_page(kind: str) -> None:
    _, p, fd = filled(kind)
    assert p.fallocate(fd, PUNCH, 10, 20).cell == "ret:0"
    assert contents(p, fd, 64) == b"\x11" * 10 + bytes(20) + b"\x11" * 34


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_truncate_zeroes_the_tail_of_the_last_page(kind: str) -> None:
    _, p, fd = filled(kind)
    ok(p.ftruncate(fd, 100))
    ok(p.ftruncate(fd, PAGE))
    assert contents(p, fd, PAGE) == b"\x11" * 100 + bytes(PAGE - 100)


def test_truncate_zeroes_a_mapped_tail_too() -> None:
    _, p, fd = filled("memfd")
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    ok(p.ftruncate(fd, 100))
    assert p.load(addr + 99, 2).data == b"\x11\x00"  # same page, its tail beyond EOF is zeroed
