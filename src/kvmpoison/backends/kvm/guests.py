"""Tiny guests built in Python: real mode and 64-bit long mode.

Both run the same program: load a byte of the data page and ``out`` it on port
0x10, store 0x55 at byte 1, load it back and ``out`` it on port 0x11, ``hlt``.
Code lives in slot 0 (anonymous memory); the data page is slot 1 at GPA
0x10000, backed by anonymous memory or by a guest_memfd mapping. On this host
KVM emulates every instruction and reaches memory through ``userspace_addr``;
an inaccessible hva shows up as an MMIO exit, and :func:`run_program` reports
it as such rather than hiding it.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from kvmpoison.backends.kvm import uapi
from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    libc,
    mmap,
)
from kvmpoison.backends.kvm.system import GuestMemfd, Hlt, Io, Kvm, VcpuExit, VmFd

CODE_GPA = 0x0
CODE_SIZE = 0x10000
DATA_GPA = 0x10000
PAGE = 4096
PML4, PDPT, PD = 0x8000, 0x9000, 0xA000
RW = PROT_READ | PROT_WRITE


def real_mode_code() -> bytes:
    return bytes([
        0xA0, 0x00, 0x00,  # mov al, [0x0000] (ds = 0x1000 -> 0x10000)
        0xE6, 0x10,  # out 0x10, al
        0xC6, 0x06, 0x01, 0x00, 0x55,  # mov byte [0x0001], 0x55
        0xA0, 0x01, 0x00,  # mov al, [0x0001]
        0xE6, 0x11,  # out 0x11, al
        0xF4,  # hlt
    ])


def long_mode_code() -> bytes:
    return (bytes([0x48, 0xBB]) + struct.pack("<Q", DATA_GPA)  # mov rbx, DATA_GPA
            + bytes([0x8A, 0x03, 0xE6, 0x10,  # mov al, [rbx]; out 0x10, al
                     0xC6, 0x43, 0x01, 0x55,  # mov byte [rbx+1], 0x55
                     0x8A, 0x43, 0x01, 0xE6, 0x11,  # mov al, [rbx+1]; out 0x11, al
                     0xF4]))  # hlt


def _setup_real(vcpu_sregs: uapi.kvm_sregs) -> None:
    vcpu_sregs.cs.base, vcpu_sregs.cs.selector = 0, 0
    vcpu_sregs.ds.base, vcpu_sregs.ds.selector = DATA_GPA, DATA_GPA >> 4


def _setup_long(sregs: uapi.kvm_sregs, code: int) -> None:
    """Identity-map the first 2 MiB with one large page and enter 64-bit mode."""
    def put(gpa: int, value: int) -> None:
        ctypes.c_uint64.from_address(code + gpa).value = value

    put(PML4, PDPT | 0x3)
    put(PDPT, PD | 0x3)
    put(PD, 0x83)  # 2 MiB page at 0, present, writable
    sregs.cr3 = PML4
    sregs.cr4 = 1 << 5  # PAE
    sregs.cr0 = 0x80000001 | (1 << 4)  # PG | PE | ET
    sregs.efer = 0x500  # LME | LMA
    seg = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0,
                           db=0, s=1, l=1, g=1)
    sregs.cs = seg
    data = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, dpl=0,
                            db=1, s=1, l=0, g=1)
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = data


@dataclass
class GuestRun:
    exits: list[VcpuExit]
    data_after: bytes  # the first bytes of the data page, read by the host afterwards


def run_program(kvm: Kvm, mode: str = "real", data: str = "anon", fill: int = 0xAA,
                max_exits: int = 16) -> GuestRun:
    """Run the program with its data page from ``data``: "anon", "gmem-shared" or "gmem-private"."""
    if mode not in ("real", "long"):
        raise ValueError(f"mode must be real or long, not {mode!r}")
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        code = mmap(None, CODE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        program = real_mode_code() if mode == "real" else long_mode_code()
        ctypes.memmove(code + 0x1000, program, len(program))
        vm.set_user_memory_region(0, CODE_GPA, CODE_SIZE, code)
        data_hva, gmem = _data_page(vm, data, fill)
        vcpu = vm.create_vcpu(0)
        try:
            sregs = vcpu.get_sregs()
            if mode == "real":
                _setup_real(sregs)
            else:
                _setup_long(sregs, code)
            vcpu.set_sregs(sregs)
            regs = uapi.kvm_regs(rip=0x1000, rflags=0x2)
            vcpu.set_regs(regs)
            exits: list[VcpuExit] = []
            for _ in range(max_exits):
                ex = vcpu.run()
                exits.append(ex)
                if not isinstance(ex, Io):
                    break
            after = ctypes.string_at(data_hva, 2) if data != "gmem-private" else b""
            return GuestRun(exits, after)
        finally:
            vcpu.close()
            if gmem is not None:
                gmem.close()
            libc.munmap(code, CODE_SIZE)


def _data_page(vm: VmFd, data: str, fill: int) -> tuple[int, GuestMemfd | None]:
    if data == "anon":
        hva = mmap(None, PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        ctypes.memset(hva, fill, PAGE)
        vm.set_user_memory_region(1, DATA_GPA, PAGE, hva)
        return hva, None
    if data not in ("gmem-shared", "gmem-private"):
        raise ValueError(f"data must be anon, gmem-shared or gmem-private, not {data!r}")
    flags = uapi.GUEST_MEMFD_FLAG_MMAP
    if data == "gmem-shared":
        flags |= uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    gmem = vm.create_guest_memfd(PAGE, flags)
    hva = mmap(None, PAGE, RW, MAP_SHARED, gmem.fd, 0)
    if data == "gmem-shared":
        ctypes.memset(hva, fill, PAGE)
    vm.set_user_memory_region2(1, DATA_GPA, PAGE, hva, gmem=gmem)
    return hva, gmem


__all__ = ["GuestRun", "Hlt", "run_program"]
