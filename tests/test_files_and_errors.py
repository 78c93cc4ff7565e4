"""File ABIs (guest_memfd, memfd_secret, memfd) and the errno of bad syscall arguments."""

import pytest

from helpers import ANON, PAGE, RW, anon, boot, ok, proc, some
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.mmap import MAP_PRIVATE, MAP_SHARED, PROT_EXEC, PROT_READ
from kvmpoison.virt.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    kvm_gmem_init,
)

MMAP, SHARED3 = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


@pytest.fixture
def p():  # type: ignore[no-untyped-def]
    kernel = boot(THIS_MACHINE)
    kvm_gmem_init(kernel)
    return proc(kernel)


def gmem(p, flags: int, pages: int = 4) -> int:  # type: ignore[no-untyped-def]
    return ok(p.guest_memfd(object(), pages * PAGE, flags))


def test_gmem_creation_validates_flags_and_size(p) -> None:  # type: ignore[no-untyped-def]
    assert p.guest_memfd(object(), PAGE, 4).cell == "err:EINVAL"
    assert p.guest_memfd(object(), 100, MMAP).cell == "err:EINVAL"
    assert p.guest_memfd(object(), 0, MMAP).cell == "err:EINVAL"


@pytest.mark.parametrize(
    ("op", "cell"),
    [
        (lambda p, fd, b: p.read(fd, b, 8), "err:EINVAL"),
        (lambda p, fd, b: p.write(fd, b, 8), "err:EINVAL"),
        (lambda p, fd, b: p.pread(fd, b, 8, 0), "err:ESPIPE"),
        (lambda p, fd, b: p.pwrite(fd, b, 8, 0), "err:ESPIPE"),
        (lambda p, fd, b: p.ftruncate(fd, 8 * PAGE), "err:EINVAL"),
        (lambda p, fd, b: p.fallocate(fd, 0, 0, PAGE), "err:EOPNOTSUPP"),
        (lambda p, fd, b: p.fallocate(fd, KEEP, 0, 4 * PAGE), "ret:0"),
        (lambda p, fd, b: p.fallocate(fd, KEEP, 4 * PAGE, PAGE), "err:EINVAL"),
        (lambda p, fd, b: p.fallocate(fd, KEEP, 1, PAGE), "err:EINVAL"),
        (lambda p, fd, b: p.fallocate(fd, KEEP, 0, 0), "err:EINVAL"),
        (lambda p, fd, b: p.fallocate(fd, PUNCH, PAGE, PAGE), "ret:0"),
        (lambda p, fd, b: p.fallocate(fd, PUNCH, 8 * PAGE, PAGE), "ret:0"),
        (lambda p, fd, b: p.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, PAGE), "err:EOPNOTSUPP"),
        (lambda p, fd, b: p.fallocate(fd, 0x10 | KEEP, 0, PAGE), "err:EOPNOTSUPP"),
    ],
)
def test_gmem_file_abi(p, op, cell) -> None:  # type: ignore[no-untyped-def]
    fd = gmem(p, SHARED3)
    buf = anon(p, 1, 0)
    assert op(p, fd, buf).cell == cell


@pytest.mark.parametrize(
    ("flags", "prot", "map_flags", "cell"),
    [
        (0, RW, MAP_SHARED, "err:ENODEV"),
        (0, RW, MAP_PRIVATE, "err:ENODEV"),
        (MMAP, RW, MAP_PRIVATE, "err:EINVAL"),
        (SHARED3, RW | PROT_EXEC, MAP_SHARED, "err:EPERM"),
        (0, PROT_READ | PROT_EXEC, MAP_SHARED, "err:EPERM"),
    ],
)
def test_gmem_mmap_refusals(p, flags, prot, map_flags, cell) -> None:  # type: ignore[no-untyped-def]
    fd = gmem(p, flags)
    assert p.mmap(0, PAGE, prot, map_flags, fd).cell == cell


def test_gmem_private_faults_sigbus_and_shared_beyond_size_too(p) -> None:  # type: ignore[no-untyped-def]
    priv = ok(p.mmap(0, PAGE, RW, MAP_SHARED, gmem(p, MMAP)))
    assert p.load(priv, 1).cell == "sig:SIGBUS:BUS_ADRERR"
    q = proc(p.kernel)
    fd = ok(q.guest_memfd(object(), PAGE, SHARED3))
    addr = ok(q.mmap(0, 4 * PAGE, RW, MAP_SHARED, fd))  # longer than the file: allowed
    ok(q.store(addr, b"\xaa"))
    out = q.load(addr + PAGE, 1)
    assert out.cell == "sig:SIGBUS:BUS_ADRERR" and some(out.siginfo).addr == addr + PAGE


def test_gmem_punch_hole_zaps_every_view_and_refaults_zero(p) -> None:  # type: ignore[no-untyped-def]
    fd = gmem(p, SHARED3, pages=4)
    a = ok(p.mmap(0, 4 * PAGE, RW, MAP_SHARED, fd))
    b = ok(p.mmap(0, 4 * PAGE, RW, MAP_SHARED, fd))
    ok(p.store(a, b"\xab" * 4 * PAGE))
    assert p.load(b + PAGE, 1).data == b"\xab"
    assert p.mincore(a, 4 * PAGE).data == b"\x01\x01\x01\x01"
    assert p.fallocate(fd, PUNCH, PAGE, PAGE).cell == "ret:0"
    assert p.mincore(a, 4 * PAGE).data == b"\x01\x00\x01\x01"
    assert p.mincore(b, 4 * PAGE).data == b"\x01\x00\x01\x01"
    assert [p.load(a + i * PAGE, 1).data for i in range(3)] == [b"\xab", b"\x00", b"\xab"]
    assert p.mincore(a, 4 * PAGE).data == b"\x01\x01\x01\x01"


def test_secretmem_file_abi(p) -> None:  # type: ignore[no-untyped-def]
    fd = ok(p.memfd_secret())
    buf = anon(p, 1, 0)
    assert p.read(fd, buf, 8).cell == "err:EINVAL"
    assert p.fallocate(fd, 0, 0, PAGE).cell == "err:EOPNOTSUPP"
    assert p.ftruncate(fd, PAGE).cell == "ret:0"
    assert p.ftruncate(fd, 2 * PAGE).cell == "err:EINVAL"
    assert p.mmap(0, PAGE, RW, MAP_PRIVATE, fd).cell == "err:EINVAL"
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    assert p.mm.vmas[[v.vm_start for v in p.mm.vmas].index(addr)].vm_flags & 0x2000  # LOCKED
    assert p.memfd_secret(0x1234).cell == "err:EINVAL"


def test_memfd_read_write_punch(p) -> None:  # type: ignore[no-untyped-def]
    fd = ok(p.memfd_create("m"))
    buf = anon(p, 1, 0x61)
    assert p.pwrite(fd, buf, 100, 10).cell == "ret:100"
    assert p.task.fds[fd].f_inode.i_size == 110
    other = anon(p, 1, 0)
    assert p.pread(fd, other, 200, 0).cell == "ret:110"  # stops at i_size
    assert p.load(other + 10, 2).data == b"aa" and p.load(other, 1).data == b"\x00"
    assert p.fallocate(fd, PUNCH, 0, PAGE).cell == "ret:0"
    assert p.pread(fd, other, 20, 10).cell == "ret:20"
    assert p.load(other, 1).data == b"\x00"


@pytest.mark.parametrize(
    ("call", "cell"),
    [
        (lambda p, a: p.munmap(a + 1, PAGE), "err:EINVAL"),
        (lambda p, a: p.munmap(a, 0), "err:EINVAL"),
        (lambda p, a: p.mprotect(a + 1, PAGE, RW), "err:EINVAL"),
        (lambda p, a: p.mprotect(0x1000, PAGE, RW), "err:ENOMEM"),
        (lambda p, a: p.mprotect(a, PAGE, 0x80), "err:EINVAL"),
        (lambda p, a: p.mmap(0, 0, RW, ANON), "err:EINVAL"),
        (lambda p, a: p.mmap(0, PAGE, RW, 0x20), "err:EINVAL"),
        (lambda p, a: p.mmap(0, PAGE, RW, MAP_SHARED, fd=99), "err:EBADF"),
        (lambda p, a: p.mmap(0, PAGE, RW, ANON, offset=5), "err:EINVAL"),
        (lambda p, a: p.madvise(a, PAGE, 9999), "err:EINVAL"),
        (lambda p, a: p.madvise(a + 3, PAGE, 4), "err:EINVAL"),
        (lambda p, a: p.madvise(0x1000, PAGE, 4), "err:ENOMEM"),
        (lambda p, a: p.mincore(a + 1, PAGE), "err:EINVAL"),
        (lambda p, a: p.mincore(0x1000, PAGE), "err:ENOMEM"),
        (lambda p, a: p.mlock(0x1000, PAGE), "err:ENOMEM"),
        (lambda p, a: p.read(42, a, 8), "err:EBADF"),
        (lambda p, a: p.pwrite(42, a, 8, 0), "err:EBADF"),
        (lambda p, a: p.fallocate(42, 0, 0, 8), "err:EBADF"),
        (lambda p, a: p.mremap(a, PAGE, PAGE, 0x80), "err:EINVAL"),
        (lambda p, a: p.mremap(0x1000, PAGE, 2 * PAGE, 1), "err:EFAULT"),
        (lambda p, a: p.getrandom(a, 8, 0x80), "err:EINVAL"),
        (lambda p, a: p.getrandom(0x1000, 8), "err:EFAULT"),
        (lambda p, a: p.futex_wait(a + 1, 0, True), "err:EINVAL"),
        (lambda p, a: p.memfd_create("x", 0x100), "err:EINVAL"),
    ],
)
def test_bad_arguments_get_the_kernels_errno(p, call, cell) -> None:  # type: ignore[no-untyped-def]
    addr = anon(p, 1, 0)
    assert call(p, addr).cell == cell
    assert p.task.alive  # a bad argument never kills the caller


def test_guest_memfd_needs_kvm_registered_at_boot() -> None:
    bare = proc(boot(THIS_MACHINE))  # no virt/kvm: the VM ioctl is unknown
    assert bare.guest_memfd(object(), PAGE, MMAP).cell == "err:ENOTTY"
    kernel = boot(THIS_MACHINE)
    kvm_gmem_init(kernel)
    assert proc(kernel).guest_memfd(object(), PAGE, MMAP).succeeded


def test_kernel_layer_imports_nothing_above_it() -> None:
    import ast
    from pathlib import Path

    import kvmpoison

    root = Path(kvmpoison.__file__).parent
    above = ("virt", "machine", "designs", "vmm", "guest", "matrix", "scenario", "cli", "report",
             "backends")
    for layer in ("kernel", "fs", "drivers"):
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    parts = node.module.split(".")
                    assert not (parts[0] == "kvmpoison" and len(parts) > 1
                                and parts[1] in above), f"{path}: imports {node.module}"
