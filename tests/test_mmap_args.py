"""mmap(2) argument handling as x86 sys_mmap / ksys_mmap_pgoff / do_mmap (v5.12, 6.1) do it."""

from __future__ import annotations

import pytest

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import O_RDONLY
from kvmpoison.mm.mm_types import VM
from kvmpoison.mm.mmap import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_SYNC,
)
from kvmpoison.mm.pagetable import TASK_SIZE


@pytest.fixture
def p() -> Process:
    return proc(boot())


def memfd(p: Process) -> int:
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, PAGE))
    return fd


def test_fd_is_used_only_without_map_anonymous(p: Process) -> None:
    assert p.mmap(0, PAGE, RW, MAP_PRIVATE).cell == "err:EBADF"  # no fd, no MAP_ANONYMOUS
    fd = memfd(p)
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED | MAP_ANONYMOUS, fd))  # fd ignored
    (vma,) = [v for v in p.mm.vmas if v.vm_start == addr]
    assert vma.vm_file is not None and vma.vm_file.name == "/dev/zero (deleted)"


def test_offset_is_checked_before_the_fd(p: Process) -> None:
    assert p.mmap(0, PAGE, RW, MAP_SHARED, fd=99, offset=5).cell == "err:EINVAL"


def test_unknown_prot_bits_are_ignored(p: Process) -> None:
    assert p.mmap(0, PAGE, RW | 0x8, ANON).succeeded


def test_hint_address_is_taken_when_free(p: Process) -> None:
    assert ok(p.mmap(0x2000_0000, PAGE, RW, ANON)) == 0x2000_0000
    assert ok(p.mmap(0x2000_0000, PAGE, RW, ANON)) != 0x2000_0000  # taken now: searched
    assert ok(p.mmap(0x1000, PAGE, RW, ANON)) == 0x10000  # rounded up to mmap_min_addr


def test_fixed_range_errors(p: Process) -> None:
    assert p.mmap(TASK_SIZE, PAGE, RW, ANON | MAP_FIXED).cell == "err:ENOMEM"
    assert p.mmap(0x2000_0001, PAGE, RW, ANON | MAP_FIXED).cell == "err:EINVAL"
    addr = ok(p.mmap(0x3000_0000, 2 * PAGE, RW, ANON | MAP_FIXED))
    assert p.mmap(addr + PAGE, PAGE, RW, ANON | MAP_FIXED_NOREPLACE).cell == "err:EEXIST"


def test_map_type_and_validate(p: Process) -> None:
    assert p.mmap(0, PAGE, RW, MAP_SHARED_VALIDATE | MAP_ANONYMOUS).cell == "err:EINVAL"
    fd = memfd(p)
    assert p.mmap(0, PAGE, RW, MAP_SHARED_VALIDATE | MAP_SYNC, fd).cell == "err:EOPNOTSUPP"
    assert p.mmap(0, PAGE, RW, MAP_SHARED | MAP_SYNC, fd).succeeded  # silently dropped
    assert p.mmap(0, PAGE, RW, MAP_SHARED | MAP_GROWSDOWN, fd).cell == "err:EINVAL"
    assert p.mmap(0, PAGE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_GROWSDOWN).cell == "err:EINVAL"


def test_read_only_file_mapped_shared_is_not_vm_shared(p: Process) -> None:
    fd = memfd(p)
    p.task.fds[fd].f_flags = O_RDONLY
    addr = ok(p.mmap(0, PAGE, 0x1, MAP_SHARED, fd))
    (vma,) = [v for v in p.mm.vmas if v.vm_start == addr]
    assert vma.vm_flags & VM.MAYSHARE and not vma.vm_flags & (VM.SHARED | VM.MAYWRITE)
