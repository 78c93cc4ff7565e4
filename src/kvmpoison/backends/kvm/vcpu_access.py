"""One guest load or store at any guest-physical address, through a real vCPU.

The vCPU runs a 64-bit program from a code slot of its own (slot CODE_SLOT at
CODE_GPA, anonymous memory): ``rep movsb`` between the target and a scratch
area of the code slot, then ``hlt``. Page tables (2 MiB pages) are rebuilt in
the code slot for each access and map only the code slot and the target.
The vCPU has no CPUID set, so its MAXPHYADDR is KVM's default of 36 bits:
targets must lie below 64 GiB.

On a host where KVM emulates the guest's instructions, guest memory is read
through the memslot's ``userspace_addr``; an access KVM cannot serve that way
comes back as an MMIO exit, which :func:`guest_access` reports as such.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from kvmpoison.backends.kvm import uapi
from kvmpoison.backends.kvm.errors import KvmError
from kvmpoison.backends.kvm.libc import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap
from kvmpoison.backends.kvm.system import Hlt, MemoryFault, Mmio, VcpuFd, VmFd

CODE_SLOT = 500
CODE_GPA = 0xE_0000_0000  # 56 GiB: above any scenario's guest RAM, below 2^36
CODE_SIZE = 2 << 20
TABLES, TABLES_END = 0x1000, 0x20000  # page-table pages inside the code slot
SCRATCH = 0x100000  # the data of a load lands here; a store's data comes from here
ACCESS_MAX = 1 << 20
GPA_LIMIT = 1 << 36
LARGE = 2 << 20


@dataclass
class GuestVcpu:
    """A VM's vCPU and its code slot (created on the first guest access)."""

    vcpu: VcpuFd
    code: int  # hva of the code slot


def attach(vm: VmFd) -> GuestVcpu:
    code = mmap(None, CODE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    vm.set_user_memory_region(CODE_SLOT, CODE_GPA, CODE_SIZE, code)
    return GuestVcpu(vm.create_vcpu(0), code)


def _map(code: int, regions: list[int]) -> int:
    """Identity-map each 2 MiB region in fresh tables; the PML4's gpa."""
    ctypes.memset(code + TABLES, 0, TABLES_END - TABLES)
    next_page = [TABLES + 0x1000]

    def table(entry_addr: int) -> int:
        entry = ctypes.c_uint64.from_address(entry_addr)
        if not entry.value:
            entry.value = CODE_GPA + next_page[0] | 0x3
            next_page[0] += 0x1000
        return code + (entry.value & ~0xFFF) - CODE_GPA

    for base in regions:
        pdpt = table(code + TABLES + ((base >> 39) & 511) * 8)
        pd = table(pdpt + ((base >> 30) & 511) * 8)
        ctypes.c_uint64.from_address(pd + ((base >> 21) & 511) * 8).value = base | 0x83
    return CODE_GPA + TABLES


def _long_mode(sregs: uapi.kvm_sregs, cr3: int) -> None:
    sregs.cr3 = cr3
    sregs.cr4 = 1 << 5  # PAE
    sregs.cr0 = 0x80000001 | (1 << 4)  # PG | PE | ET
    sregs.efer = 0x500  # LME | LMA
    sregs.cs = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0,
                                db=0, s=1, l=1, g=1)
    data = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, dpl=0,
                            db=1, s=1, l=0, g=1)
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = data


def guest_access(g: GuestVcpu, gpa: int, size: int, data: bytes | None) -> dict[str, str]:
    """A guest load (``data`` None) or store: ``{"cell", "data"}`` or ``{"skip": why}``."""
    n = len(data) if data is not None else size
    if not 1 <= n <= ACCESS_MAX or gpa < 0 or gpa + n > GPA_LIMIT:
        return {"skip": f"the live vCPU reaches only {ACCESS_MAX} bytes below 64 GiB"}
    if gpa < CODE_GPA + CODE_SIZE and gpa + n > CODE_GPA:
        return {"skip": "the address is the live vCPU's own code slot"}
    scratch = CODE_GPA + SCRATCH
    if data is not None:
        ctypes.memmove(g.code + SCRATCH, data, n)
    src, dst = (scratch, gpa) if data is not None else (gpa, scratch)
    program = (b"\x48\xbe" + struct.pack("<Q", src) + b"\x48\xbf" + struct.pack("<Q", dst)
               + b"\x48\xb9" + struct.pack("<Q", n) + b"\xf3\xa4\xf4")  # rep movsb; hlt
    ctypes.memmove(g.code, program, len(program))
    first, last = gpa & ~(LARGE - 1), (gpa + n - 1) & ~(LARGE - 1)
    cr3 = _map(g.code, sorted({CODE_GPA, first, last}))
    sregs = g.vcpu.get_sregs()
    _long_mode(sregs, cr3)
    g.vcpu.set_sregs(sregs)
    g.vcpu.set_regs(uapi.kvm_regs(rip=CODE_GPA, rflags=0x2))
    try:
        ex = g.vcpu.run()
    except KvmError as exc:
        return {"skip": f"KVM_RUN failed: {exc}"}
    if isinstance(ex, Hlt):
        got = ctypes.string_at(g.code + SCRATCH, n) if data is None else b""
        return {"cell": "ok", "data": got.hex()} if data is None else {"cell": "ok"}
    if isinstance(ex, Mmio):
        return {"skip": f"KVM_EXIT_MMIO at gpa {ex.gpa:#x}: KVM's instruction emulator found "
                        "no usable userspace_addr there"}
    if isinstance(ex, MemoryFault):
        return {"skip": f"KVM_EXIT_MEMORY_FAULT at gpa {ex.gpa:#x} (flags {ex.flags:#x})"}
    return {"skip": f"the vCPU exited with {ex}"}
