"""The model's guest_memfd binding rules against this machine's kernel (6.18, default VM).

The same sequence of KVM_CREATE_GUEST_MEMFD / KVM_SET_USER_MEMORY_REGION2 calls
runs on the live kernel and on the model; every call's cell must agree. The
live default VM has no private memory, so the model's VM is switched to "no
private memory" too (which is what allows INIT_SHARED).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable

import pytest

from kvmpoison.backends.kvm import GuestMemfd, Kvm, KvmError
from kvmpoison.backends.kvm.ioctl import _IOW
from kvmpoison.backends.kvm.system import _ioctl
from kvmpoison.backends.kvm.uapi import KVMIO
from kvmpoison.config import Config
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.virt.kvm.gmem_memslot import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from kvmpoison.virt.kvm.guest_memfd import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
from kvmpoison.virt.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE

PAGE = 4096
HIGH = 0x1000_0000
G = KVM_MEM_GUEST_MEMFD
# (slot, flags, gpa, pages, which file, file offset); "g" is the VM's own 16-page guest_memfd
CASES: list[tuple[str, tuple[int, int, int, int, str, int]]] = [
    ("bind", (1, G, HIGH, 4, "g", 0)),
    ("bad fd", (2, G, HIGH + 0x10_0000, 1, "none", 0)),
    ("a memfd", (2, G, HIGH + 0x10_0000, 1, "memfd", 0)),
    ("another VM's guest_memfd", (2, G, HIGH + 0x10_0000, 1, "other", 0)),
    ("unaligned offset", (2, G, HIGH + 0x10_0000, 1, "g", 0x800)),
    ("wrapping offset", (2, G, HIGH + 0x10_0000, 1, "g", 2**64 - PAGE)),
    ("past the end", (2, G, HIGH + 0x10_0000, 4, "g", 13 * PAGE)),
    ("file range bound", (2, G, HIGH + 0x10_0000, 1, "g", 3 * PAGE)),
    ("gfns of slot 1", (2, G, HIGH + PAGE, 1, "g", 8 * PAGE)),
    ("dirty logging", (2, G | KVM_MEM_LOG_DIRTY_PAGES, HIGH + 0x10_0000, 1, "g", 8 * PAGE)),
    ("read-only", (2, G | KVM_MEM_READONLY, HIGH + 0x10_0000, 1, "g", 8 * PAGE)),
    ("slot 32764", (32764, G, HIGH + 0x10_0000, 1, "g", 8 * PAGE)),
    ("slot 32763", (32763, G, HIGH + 0x20_0000, 1, "g", 9 * PAGE)),  # the last user slot
    ("modify slot 1", (1, G, HIGH, 4, "g", 0)),
    ("drop GUEST_MEMFD from slot 1", (1, 0, HIGH, 4, "g", 0)),  # not a FLAGS_ONLY change
    ("move slot 1 without GUEST_MEMFD", (1, 0, HIGH + 0x40_0000, 4, "g", 0)),
    ("gfns of slot 1, bad fd", (2, G, HIGH + PAGE, 1, "none", 0)),  # overlap before the bind
    ("bad fd beyond kvm_mmu_max_gfn", (2, G, 1 << 60, 1, "none", 0)),  # the bind first
    ("beyond kvm_mmu_max_gfn", (2, G, 1 << 60, 1, "g", 4 * PAGE)),  # and undone after it
    ("plain slot 5", (5, 0, HIGH + 0x50_0000, 1, "g", 0)),
    ("slot 5 read-only", (5, KVM_MEM_READONLY, HIGH + 0x50_0000, 1, "g", 0)),
    ("slot 5 dirty logging", (5, KVM_MEM_LOG_DIRTY_PAGES, HIGH + 0x50_0000, 1, "g", 0)),
    ("slot 5 becomes guest_memfd", (5, G, HIGH + 0x50_0000, 1, "g", 10 * PAGE)),
    ("next file range", (2, G, HIGH + 0x10_0000, 1, "g", 4 * PAGE)),
    ("delete slot 1", (1, 0, HIGH, 0, "g", 0)),
    ("delete it again", (1, 0, HIGH, 0, "g", 0)),
    ("bind the freed range", (3, G, HIGH, 4, "g", 0)),
]


def _cell(call: Callable[[], object]) -> str:
    try:
        call()
    except KvmError as exc:
        return f"err:{errno.errorcode.get(exc.errno or 0, str(exc.errno))}"
    return "ret:0"


def live_cells() -> list[str]:
    hva = 0x1_0000_0000  # access_ok checks the range only; nothing needs to be mapped there
    memfd = os.memfd_create("not-gmem")
    os.ftruncate(memfd, 16 * PAGE)
    cells = []
    try:
        with Kvm() as kvm, kvm.create_vm() as vm, kvm.create_vm() as other_vm:
            g = vm.create_guest_memfd(16 * PAGE, GUEST_MEMFD_FLAG_MMAP)
            other = other_vm.create_guest_memfd(16 * PAGE, 0)
            files = {"g": g, "other": other, "memfd": GuestMemfd(memfd, 16 * PAGE, 0),
                     "none": GuestMemfd(999, 0, 0)}
            for _, (slot, flags, gpa, pages, which, off) in CASES:
                gm = files[which] if flags & G else None
                call = functools.partial(vm.set_user_memory_region2, slot, gpa, pages * PAGE,
                                         hva, flags & ~G, gm, off)
                cells.append(_cell(call))
            cells.append(_cell(lambda: vm.create_guest_memfd(
                PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).close()))
            g.close()
            other.close()
    finally:
        os.close(memfd)
    return cells


def model_cells() -> list[str]:
    m = Machine(Config(design="gmem"), vms=[VmSpec("a"), VmSpec("b")])
    a, b = m.instances["a"], m.instances["b"]
    assert a.vm.gmem is not None
    a.vm.gmem.has_private_mem = False  # like the live default VM
    vmm = a.vmm
    g = vmm.guest_memfd_create(a.vm, 16 * PAGE, GUEST_MEMFD_FLAG_MMAP).value or 0
    other_b = b.vmm.guest_memfd_create(b.vm, 16 * PAGE, 0).value or 0
    other = vmm.proc.install(b.vmm.proc.task.fds[other_b])
    fds = {"g": g, "other": other, "memfd": vmm.ram_fd or 0, "none": 999}
    cells = [vmm.set_user_memory_region2(a.vm, slot, flags, gpa, pages * PAGE, vmm.ram_hva,
                                         fds[which], off).cell
             for _, (slot, flags, gpa, pages, which, off) in CASES]
    got = vmm.guest_memfd_create(a.vm, PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    cells.append("ret:0" if got.succeeded else got.cell)
    return cells


@pytest.mark.kvm
def test_binding_rules_agree_with_the_live_kernel() -> None:
    live, model = live_cells(), model_cells()
    names = [n for n, _ in CASES] + ["INIT_SHARED on a VM without private memory"]
    disagreements = [(n, lc, mc) for n, lc, mc in zip(names, live, model, strict=True)
                     if lc != mc]
    assert not disagreements, disagreements
    assert live[0] == "ret:0" and "err:EINVAL" in live and "err:EEXIST" in live


class kvm_memory_attributes(ctypes.Structure):  # include/uapi/linux/kvm.h
    _fields_ = [("address", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("attributes", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xD2, kvm_memory_attributes)
ATTR_CASES = [  # (address, size, attributes, flags)
    (0, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),  # PRIVATE: not supported by a default VM
    (0, PAGE, 0, 1),  # flags must be 0
    (0, 0, 0, 0),  # empty
    (0x800, PAGE, 0, 0),  # unaligned
    (2**64 - PAGE, 2 * PAGE, 0, 0),  # wraps
    (0, 16 * PAGE, 0, 0),  # what is already there: nothing to do
]


@pytest.mark.kvm
def test_this_kernel_has_no_memory_attributes_ioctl() -> None:
    """Built without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES (no TDX, SEV or SW_PROTECTED_VM):
    KVM_SET_MEMORY_ATTRIBUTES does not exist, so gmem's conversions cannot be refereed here."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        live = [_cell(functools.partial(_ioctl, vm.fd, KVM_SET_MEMORY_ATTRIBUTES,
                                        kvm_memory_attributes(*args),
                                        "KVM_SET_MEMORY_ATTRIBUTES"))
                for args in ATTR_CASES]
    assert live == ["err:ENOTTY"] * len(ATTR_CASES)
