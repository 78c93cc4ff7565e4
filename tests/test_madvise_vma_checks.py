"""madvise(2) per-VMA checks and MADV_REMOVE (mm/madvise.c, v5.12 and 6.18)."""

from __future__ import annotations

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.mm.madvise import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_PAGEOUT,
    MADV_REMOVE,
)
from kvmpoison.mm.mm_types import VM
from kvmpoison.mm.mmap import MAP_PRIVATE, MAP_SHARED
from kvmpoison.virt.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    kvm_gmem_init,
)


def test_madv_remove_punches_the_shared_file_and_refuses_the_rest() -> None:
    p = proc(boot())
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, 2 * PAGE))
    addr = ok(p.mmap(0, 2 * PAGE, RW, MAP_SHARED, fd))
    ok(p.store(addr, b"\x01" * 2 * PAGE))
    assert p.madvise(addr + PAGE, PAGE, MADV_REMOVE).cell == "ret:0"
    assert p.task.fds[fd].f_mapping.nrpages == 1  # type: ignore[union-attr]
    assert p.load(addr, 1).data == b"\x01" and p.load(addr + PAGE, 1).data == b"\x00"
    priv = ok(p.mmap(0, PAGE, RW, MAP_PRIVATE, fd))
    assert p.madvise(priv, PAGE, MADV_REMOVE).cell == "err:EACCES"
    assert p.madvise(anon(p, 1, fill=1), PAGE, MADV_REMOVE).cell == "err:EINVAL"


def test_madv_dofork_refuses_vm_io_and_dontfork_does_not() -> None:
    p = proc(boot())
    addr = anon(p, 1)
    (vma,) = [v for v in p.mm.vmas if v.vm_start == addr]
    vma.vm_flags |= VM.IO
    assert p.madvise(addr, PAGE, MADV_DONTFORK).cell == "ret:0"
    assert p.madvise(addr, PAGE, MADV_DOFORK).cell == "err:EINVAL"


def test_madv_pageout_refuses_a_locked_vma() -> None:
    p = proc(boot())
    addr = anon(p, 1, fill=2)
    ok(p.mlock(addr, PAGE))
    assert p.madvise(addr, PAGE, MADV_PAGEOUT).cell == "err:EINVAL"
    assert p.load(addr, 1).data == b"\x02"


def test_guard_markers_refused_on_vm_special_mappings() -> None:
    k = boot(THIS_MACHINE)
    kvm_gmem_init(k)
    p = proc(k)
    fd = ok(p.guest_memfd(object(), PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))  # guest_memfd sets VM_DONTEXPAND
    assert p.madvise(addr, PAGE, MADV_GUARD_INSTALL).cell == "err:EINVAL"
    assert p.madvise(addr, PAGE, MADV_GUARD_REMOVE).cell == "err:EINVAL"
    plain = ok(p.mmap(0, PAGE, RW, ANON))
    assert p.madvise(plain, PAGE, MADV_GUARD_INSTALL).cell == "ret:0"
