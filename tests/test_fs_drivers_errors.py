"""/proc/PID/mem writes and getrandom(2) when the caller's buffer faults part-way."""

from __future__ import annotations

import pytest

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.drivers.char.random import GRND_INSECURE, GRND_RANDOM
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.kernel.range import add_range_with_merge, clean_sort_range
from kvmpoison.mm.file import O_APPEND, O_CREAT, O_EXCL, O_RDWR, O_TRUNC
from kvmpoison.mm.mmap import MAP_FIXED


def test_proc_mem_write_fault_after_a_full_chunk_is_efault() -> None:
    p = proc(boot())
    target = anon(p, 2, fill=0)
    src = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))  # nothing mapped above
    fd = ok(p.open_proc_mem(p, O_RDWR))
    assert p.pwrite(fd, src, PAGE + 8, target).cell == "err:EFAULT"  # not ret:4096
    assert p.pwrite(fd, src, PAGE, target).cell == "ret:4096"


@pytest.mark.parametrize(("kcfg", "cell"), [(RFC_BASE, "err:EFAULT"), (THIS_MACHINE, "ret:100")])
def test_getrandom_partial_copy(kcfg: KernelConfig, cell: str) -> None:
    p = proc(boot(kcfg))
    buf = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))
    assert p.getrandom(buf + PAGE - 100, 200).cell == cell
    assert p.getrandom(buf, 8, GRND_INSECURE | GRND_RANDOM).cell == "err:EINVAL"


def test_add_range_with_merge_merges_touching_ranges() -> None:
    ranges: list[tuple[int, int]] = []
    for lo, hi in ((20, 30), (0, 10), (10, 20), (40, 50)):
        add_range_with_merge(ranges, 32, lo, hi)
    assert clean_sort_range(ranges) == 2 and ranges == [(0, 30), (40, 50)]


def test_file_syscall_check_order() -> None:
    k = boot()
    p = proc(k)
    k.create_file("/ro", b"x" * 8)
    fd = ok(p.open("/ro", 0))  # O_RDONLY
    buf = anon(p, 1)
    assert p.pread(fd, buf, 8, -1).cell == "err:EINVAL"
    assert p.pread(99, buf, 8, -1).cell == "err:EINVAL"  # before the fd lookup
    assert p.ftruncate(99, -1).cell == "err:EINVAL"
    assert p.ftruncate(fd, 0).cell == "err:EINVAL"  # not open for writing
    assert p.fallocate(fd, 0, 0, 8).cell == "err:EBADF"
    assert p.fallocate(fd, 0, -1, 8).cell == "err:EINVAL"
    assert k.files["/ro"].i_size == 8


def test_open_creat_excl_trunc_and_append() -> None:
    k = boot()
    p = proc(k)
    buf = anon(p, 1, fill=7)
    assert p.open("/new", O_RDWR).cell == "err:ENOENT"
    fd = ok(p.open("/new", O_RDWR | O_CREAT))
    assert p.write(fd, buf, 10).cell == "ret:10"
    assert p.open("/new", O_RDWR | O_CREAT | O_EXCL).cell == "err:EEXIST"
    app = ok(p.open("/new", O_RDWR | O_APPEND))
    assert p.pwrite(app, buf, 5, 0).cell == "ret:5"  # appends despite the offset
    assert k.files["/new"].i_size == 15
    ok(p.open("/new", O_RDWR | O_TRUNC))
    assert k.files["/new"].i_size == 0
