"""``struct mm_struct``, ``struct vm_area_struct``, ``struct vm_fault`` and their flag values.

Follows ``include/linux/mm_types.h`` and ``include/linux/mm.h`` (v5.12 values;
the VM_* and FAULT_FLAG_* bits used here are unchanged in v6.18).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_NONE,
    PAGE_SHIFT,
)

if TYPE_CHECKING:
    from kvmpoison.mm.core import MmCore
    from kvmpoison.mm.file import File
    from kvmpoison.mm.mmu_notifier import MmuNotifier
    from kvmpoison.mm.pagetable import PageTables
    from kvmpoison.mm.rmap import AnonVma


class VM(enum.IntFlag):
    """``vma->vm_flags`` (include/linux/mm.h)."""

    READ = 0x00000001
    WRITE = 0x00000002
    EXEC = 0x00000004
    SHARED = 0x00000008
    MAYREAD = 0x00000010
    MAYWRITE = 0x00000020
    MAYEXEC = 0x00000040
    MAYSHARE = 0x00000080
    GROWSDOWN = 0x00000100
    UFFD_MISSING = 0x00000200
    PFNMAP = 0x00000400
    UFFD_WP = 0x00001000
    LOCKED = 0x00002000
    IO = 0x00004000
    SEQ_READ = 0x00008000
    RAND_READ = 0x00010000
    DONTCOPY = 0x00020000
    DONTEXPAND = 0x00040000
    LOCKONFAULT = 0x00080000
    ACCOUNT = 0x00100000
    NORESERVE = 0x00200000
    HUGETLB = 0x00400000
    SYNC = 0x00800000
    WIPEONFORK = 0x02000000
    DONTDUMP = 0x04000000
    SOFTDIRTY = 0x08000000
    MIXEDMAP = 0x10000000
    HUGEPAGE = 0x20000000
    NOHUGEPAGE = 0x40000000
    MERGEABLE = 0x80000000


VM_ACCESS_FLAGS = VM.READ | VM.WRITE | VM.EXEC


class VmFault(enum.IntFlag):
    """``vm_fault_t`` bits (include/linux/mm_types.h, v5.12)."""

    OOM = 0x000001
    SIGBUS = 0x000002
    MAJOR = 0x000004
    WRITE = 0x000008
    HWPOISON = 0x000010
    HWPOISON_LARGE = 0x000020
    SIGSEGV = 0x000040
    NOPAGE = 0x000100
    LOCKED = 0x000200
    RETRY = 0x000400
    FALLBACK = 0x000800
    DONE_COW = 0x001000
    NEEDDSYNC = 0x002000


VM_FAULT_ERROR = (VmFault.OOM | VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.HWPOISON
                  | VmFault.HWPOISON_LARGE | VmFault.FALLBACK)


# A vm_fault_t function's "return 0", built once (VmFault(0) is an enum call per fault).
VM_FAULT_0 = VmFault(0)


class FaultFlag(enum.IntFlag):
    """``enum fault_flag`` (include/linux/mm.h)."""

    WRITE = 1 << 0
    MKWRITE = 1 << 1
    ALLOW_RETRY = 1 << 2
    RETRY_NOWAIT = 1 << 3
    KILLABLE = 1 << 4
    TRIED = 1 << 5
    USER = 1 << 6
    REMOTE = 1 << 7
    INSTRUCTION = 1 << 8
    INTERRUPTIBLE = 1 << 9


def vm_get_page_prot(vm_flags: VM) -> int:
    """``protection_map[]`` for x86-64: private writable maps read-only (COW on write)."""
    flags = int(vm_flags)  # plain ints: this runs on every fault and mprotect
    if not flags & _VM_ACCESS:
        return PAGE_NONE
    prot = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
    if flags & _VM_WRITE_SHARED == _VM_WRITE_SHARED:
        prot |= _PAGE_RW
    if not flags & _VM_EXEC:
        prot |= _PAGE_NX
    return prot


_VM_ACCESS = int(VM_ACCESS_FLAGS)
_VM_WRITE_SHARED = int(VM.WRITE | VM.SHARED)
_VM_EXEC = int(VM.EXEC)
# Plain ints for the per-fault tests (IntFlag arithmetic builds enum objects).
VM_WRITE_I, VM_SHARED_I, VM_UFFD_MISSING_I = int(VM.WRITE), int(VM.SHARED), int(VM.UFFD_MISSING)
FAULT_FLAG_WRITE_I = int(FaultFlag.WRITE)


class VmOperations(Protocol):
    """The part of ``struct vm_operations_struct`` the model uses."""

    def fault(self, vmf: VmFaultInfo) -> VmFault: ...


@dataclass(eq=False)
class Vma:
    """``struct vm_area_struct``: [vm_start, vm_end) of one mm."""

    vm_mm: MmStruct
    vm_start: int
    vm_end: int
    vm_flags: VM
    vm_pgoff: int = 0
    vm_file: File | None = None
    anon_vma: AnonVma | None = None
    anon_vma_chain: list[AnonVma] = field(default_factory=list)
    vm_ops: VmOperations | None = None
    uffd_ctx: object | None = None

    @property
    def vm_page_prot(self) -> int:
        """``vma_set_page_prot``: with write-notify a shared writable mapping maps read-only."""
        prot = vm_get_page_prot(self.vm_flags)
        if vma_wants_writenotify(self):
            prot &= ~_PAGE_RW
        return prot

    @property
    def npages(self) -> int:
        return (self.vm_end - self.vm_start) >> PAGE_SHIFT

    def linear_page_index(self, address: int) -> int:
        return ((address - self.vm_start) >> PAGE_SHIFT) + self.vm_pgoff

    def __repr__(self) -> str:
        name = f" {self.vm_file.name}" if self.vm_file is not None else ""
        return f"Vma({self.vm_start:#x}-{self.vm_end:#x} {self.vm_flags!r}{name})"


def vma_wants_writenotify(vma: Vma) -> bool:
    """mm/mmap.c ``vma_wants_writenotify`` (v5.12; v6.18 the same for these cases).

    A shared writable mapping of a file whose mapping does writeback (a
    regular file on a block filesystem: ``page_mkwrite``) takes a write fault
    on the first store, so the page is marked dirty for writeback. shmem has
    neither, so it maps writable at once. Soft-dirty tracking (after
    clear_refs) is not modelled.
    """
    if int(vma.vm_flags) & _VM_WRITE_SHARED != _VM_WRITE_SHARED:
        return False
    return vma.vm_file is not None and vma.vm_file.f_inode.kind == "file"


def vma_is_anonymous(vma: Vma) -> bool:
    return vma.vm_ops is None


def vma_is_accessible(vma: Vma) -> bool:
    return bool(int(vma.vm_flags) & _VM_ACCESS)


@dataclass
class VmFaultInfo:
    """``struct vm_fault``."""

    vma: Vma
    address: int
    flags: FaultFlag
    pgoff: int
    orig_pte: int = 0
    page: int | None = None  # pfn handed back by ->fault


@dataclass(eq=False)
class MmStruct:
    """``struct mm_struct``: page tables, VMAs (sorted by start) and RSS counters."""

    core: MmCore
    pgd: PageTables
    ident: int
    vmas: list[Vma] = field(default_factory=list)
    rss_file: int = 0
    rss_anon: int = 0
    rss_shmem: int = 0
    locked_vm: int = 0
    owner_pid: int = 0
    mmu_notifiers: list[MmuNotifier] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"MmStruct(ident={self.ident}, vmas={len(self.vmas)})"
