"""The uapi structs and constants the backend uses, as ctypes types.

Follows ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``
(v6.18). Every field is annotated for mypy as well as listed in ``_fields_``.
"""

from __future__ import annotations

import ctypes
import enum

from kvmpoison.backends.kvm.ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_userspace_memory_region(ctypes.Structure):
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_userspace_memory_region2(ctypes.Structure):
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int
    guest_memfd: int
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64), ("guest_memfd_offset", u64), ("guest_memfd", u32),
                ("pad1", u32), ("pad2", u64 * 14)]


class kvm_create_guest_memfd(ctypes.Structure):
    size: int
    flags: int
    _fields_ = [("size", u64), ("flags", u64), ("reserved", u64 * 6)]


class kvm_regs(ctypes.Structure):
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    rip: int
    rflags: int
    _fields_ = [(name, u64) for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                         "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the uapi field name
    g: int
    avl: int
    unusable: int
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    base: int
    limit: int
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    cs: kvm_segment
    ds: kvm_segment
    es: kvm_segment
    fs: kvm_segment
    gs: kvm_segment
    ss: kvm_segment
    tr: kvm_segment
    ldt: kvm_segment
    gdt: kvm_dtable
    idt: kvm_dtable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment), ("gdt", kvm_dtable),
                ("idt", kvm_dtable), ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64),
                ("cr8", u64), ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_run_io(ctypes.Structure):
    direction: int
    size: int
    port: int
    count: int
    data_offset: int
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    phys_addr: int
    len: int
    is_write: int
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(ctypes.Structure):
    suberror: int
    ndata: int
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_memory_fault(ctypes.Structure):
    flags: int
    gpa: int
    size: int
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class kvm_run_exit(ctypes.Union):
    io: kvm_run_io
    mmio: kvm_run_mmio
    internal: kvm_run_internal
    memory_fault: kvm_run_memory_fault
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("memory_fault", kvm_run_memory_fault), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    """The head of the shared ``struct kvm_run`` page."""

    immediate_exit: int
    exit_reason: int
    u: kvm_run_exit
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", kvm_run_exit)]


KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers the backend probes."""

    USER_MEMORY = 3
    NR_MEMSLOTS = 10
    READONLY_MEM = 31
    EXIT_HYPERCALL = 201
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    PRE_FAULT_MEMORY = 236
    GUEST_MEMFD_FLAGS = 244


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    MEMORY_FAULT = 39
