"""vfs_fallocate's early answers for files that are not regular (fs/open.c)."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process

SYS_USERFAULTFD = 323  # x86-64


def proc(version: KernelVersion) -> Process:
    k = Kernel.boot(KernelConfig(version=version),
                    PlatformConfig(mem_bytes=16 << 20, integrity=IntegrityMode.OFF))
    return Process.spawn(k, "vmm")


@pytest.mark.parametrize(("version", "want"), [(KernelVersion.V5_12, "err:ENODEV"),
                                               (KernelVersion.V6_1, "err:EBADF"),
                                               (KernelVersion.V6_18, "err:EBADF")])
def test_fallocate_of_a_userfaultfd(version: KernelVersion, want: str) -> None:
    """v5.12 opens the userfaultfd O_RDWR, so its typeless anon inode gives -ENODEV; from
    6.1 it is O_RDONLY and FMODE_WRITE's check gives -EBADF first."""
    p = proc(version)
    fd = p.sys_userfaultfd(os.O_NONBLOCK).value
    assert fd is not None
    assert p.fallocate(fd, 0, 0, 4096).cell == want


def test_fallocate_of_dev_mem_is_enodev() -> None:
    p = proc(KernelVersion.V6_18)
    fd = p.open("/dev/mem", os.O_RDWR).value
    assert fd is not None
    assert p.fallocate(fd, 0, 0, 4096).cell == "err:ENODEV"


def test_this_kernel_agrees_on_the_userfaultfd() -> None:
    """The running kernel referees the 6.18 cell (user-mode-only needs no privilege)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | 1)  # UFFD_USER_MODE_ONLY
    if fd < 0:
        pytest.skip(f"userfaultfd(2) refused here: {os.strerror(ctypes.get_errno())}")
    try:
        ret = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096))
        live = f"err:{errno.errorcode[ctypes.get_errno()]}" if ret < 0 else f"ret:{ret}"
    finally:
        os.close(fd)
    if os.uname().release.startswith(("6.18", "6.19")):
        assert live == "err:EBADF"
    p = proc(KernelVersion.V6_18)
    fd2 = p.sys_userfaultfd(os.O_NONBLOCK).value
    assert fd2 is not None
    assert p.fallocate(fd2, 0, 0, 4096).cell == live
