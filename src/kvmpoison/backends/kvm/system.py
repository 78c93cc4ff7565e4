"""Handles on /dev/kvm, a VM, a vCPU and a guest_memfd: one method per ioctl.

The API shape follows rust-vmm's kvm-ioctls (``Kvm``, ``VmFd``, ``VcpuFd``,
``VcpuExit`` values); errors are :class:`KvmError` carrying the errno and the
ioctl's name. Handles are context managers that close their fds.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as mmap_mod
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from kvmpoison.backends.kvm import uapi
from kvmpoison.backends.kvm.errors import KvmError
from kvmpoison.backends.kvm.libc import libc

EHWPOISON = 133


def _ioctl(fd: int, request: int, arg: ctypes._CData | int | None, name: str) -> int:
    if isinstance(arg, int) or arg is None:
        ret = libc.ioctl(fd, request, ctypes.c_void_p(arg or 0))
    else:
        ret = libc.ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        raise KvmError(ctypes.get_errno(), name)
    return int(ret)


class _Fd:
    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Kvm(_Fd):
    """/dev/kvm."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(exc.errno or errno.ENODEV, "open", path) from None
        super().__init__(fd)

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        obj = cls.__new__(cls)
        _Fd.__init__(obj, fd)
        return obj

    def get_api_version(self) -> int:
        return _ioctl(self.fd, uapi.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self, vm_type: int = 0) -> VmFd:
        fd = _ioctl(self.fd, uapi.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        return VmFd(fd, self)

    def caps(self) -> dict[str, int]:
        return {cap.name: self.check_extension(cap) for cap in uapi.Cap}


class VmFd(_Fd):
    def __init__(self, fd: int, kvm: Kvm):
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, uapi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int,
                               flags: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                  memory_size=size, userspace_addr=hva)
        _ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_user_memory_region2(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                                gmem: GuestMemfd | None = None, gmem_offset: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region2(
            slot=slot, flags=flags | (uapi.KVM_MEM_GUEST_MEMFD if gmem is not None else 0),
            guest_phys_addr=gpa, memory_size=size, userspace_addr=hva,
            guest_memfd_offset=gmem_offset, guest_memfd=gmem.fd if gmem is not None else 0)
        _ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION2, region, "KVM_SET_USER_MEMORY_REGION2")

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        arg = uapi.kvm_create_guest_memfd(size=size, flags=flags)
        fd = _ioctl(self.fd, uapi.KVM_CREATE_GUEST_MEMFD, arg, "KVM_CREATE_GUEST_MEMFD")
        return GuestMemfd(fd, size, flags)

    def create_vcpu(self, vcpu_id: int = 0) -> VcpuFd:
        fd = _ioctl(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, self.kvm.get_vcpu_mmap_size())


class GuestMemfd(_Fd):
    def __init__(self, fd: int, size: int, flags: int):
        super().__init__(fd)
        self.size = size
        self.flags = flags

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if libc.fallocate(self.fd, mode, offset, length) != 0:
            raise KvmError(ctypes.get_errno(), "fallocate")


# -- vCPU exits (tagged values) --------------------------------------------------------------


@dataclass(frozen=True)
class Io:
    port: int
    direction: int
    data: bytes


@dataclass(frozen=True)
class Mmio:
    gpa: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class Hlt:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class InternalError:
    suberror: int
    ndata: int


@dataclass(frozen=True)
class MemoryFault:
    flags: int
    gpa: int
    size: int
    errno: int = 0  # set when KVM_RUN itself failed (EFAULT, EHWPOISON)


@dataclass(frozen=True)
class Other:
    reason: int


VcpuExit = Io | Mmio | Hlt | Shutdown | InternalError | MemoryFault | Other


class VcpuFd(_Fd):
    def __init__(self, fd: int, mmap_size: int):
        super().__init__(fd)
        self._map = mmap_mod.mmap(fd, mmap_size, mmap_mod.MAP_SHARED,
                                  mmap_mod.PROT_READ | mmap_mod.PROT_WRITE)
        self.run_struct = uapi.kvm_run.from_buffer(self._map)

    def close(self) -> None:
        del self.run_struct
        self._map.close()
        super().close()

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        _ioctl(self.fd, uapi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        _ioctl(self.fd, uapi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        _ioctl(self.fd, uapi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        _ioctl(self.fd, uapi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def run(self) -> VcpuExit:
        """KVM_RUN; a -1 with EFAULT/EHWPOISON and exit 39 is a MemoryFault, not an error."""
        self.run_struct.exit_reason = 0xDEAD  # KVM always overwrites it
        ret = libc.ioctl(self.fd, uapi.KVM_RUN, ctypes.c_void_p(0))
        return decode_exit(self.run_struct, ret, ctypes.get_errno() if ret < 0 else 0)


def decode_exit(run: uapi.kvm_run, ret: int, err: int) -> VcpuExit:
    """Turn KVM_RUN's return and the shared ``kvm_run`` into a tagged exit."""
    if ret < 0:
        if err in (errno.EFAULT, EHWPOISON) and run.exit_reason == uapi.ExitReason.MEMORY_FAULT:
            mf = run.u.memory_fault
            return MemoryFault(mf.flags, mf.gpa, mf.size, err)
        raise KvmError(err, "KVM_RUN")
    reason = run.exit_reason
    if reason == uapi.ExitReason.IO:
        io = run.u.io
        raw = ctypes.string_at(ctypes.addressof(run) + io.data_offset, io.size * io.count)
        return Io(io.port, io.direction, raw)
    if reason == uapi.ExitReason.MMIO:
        m = run.u.mmio
        return Mmio(m.phys_addr, bool(m.is_write), bytes(m.data)[: m.len])
    if reason == uapi.ExitReason.HLT:
        return Hlt()
    if reason == uapi.ExitReason.SHUTDOWN:
        return Shutdown()
    if reason == uapi.ExitReason.INTERNAL_ERROR:
        return InternalError(run.u.internal.suberror, run.u.internal.ndata)
    if reason == uapi.ExitReason.MEMORY_FAULT:
        mf = run.u.memory_fault
        return MemoryFault(mf.flags, mf.gpa, mf.size)
    return Other(reason)


__all__ = ["EHWPOISON", "GuestMemfd", "Hlt", "InternalError", "Io", "Kvm", "MemoryFault",
           "Mmio", "Other", "Shutdown", "VcpuExit", "VcpuFd", "VmFd", "decode_exit"]
