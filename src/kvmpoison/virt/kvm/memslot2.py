"""``KVM_SET_USER_MEMORY_REGION2`` for the scenario ops: a thin adapter.

The ioctl has one model, :func:`~kvmpoison.virt.kvm.gmem_memslot.kvm_vm_ioctl_set_memory_region2`
(``kvm_set_memory_region`` in virt/kvm/kvm_main.c and ``kvm_gmem_bind`` in
virt/kvm/guest_memfd.c, 6.18): a slot bound here is the same ``GmemMemslot`` the
``gmem`` design's faults, punch-hole invalidations and conversions go through.
This module only turns the ops' positional fields into ``struct
kvm_userspace_memory_region2`` and the caller's fd table into ``fget``.
"""

from __future__ import annotations

from kvmpoison.mm.file import File
from kvmpoison.virt.kvm.gmem_memslot import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KvmUserspaceMemoryRegion2,
    kvm_vm_ioctl_set_memory_region2,
)
from kvmpoison.virt.kvm.kvm_main import Vm


def set_user_memory_region2(vm: Vm, file_of: dict[int, File], slot: int, flags: int, gpa: int,
                            size: int, hva: int, gmem_fd: int, gmem_offset: int) -> int:
    """``KVM_SET_USER_MEMORY_REGION2`` on ``vm``: 0 or -errno.

    ``file_of`` is the calling task's fd table (``fget`` in ``kvm_gmem_bind``).
    """
    mem = KvmUserspaceMemoryRegion2(slot, flags, gpa, size, hva, gmem_offset, gmem_fd)
    return kvm_vm_ioctl_set_memory_region2(vm, mem, file_of.get)


__all__ = ["KVM_MEM_GUEST_MEMFD", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY",
           "set_user_memory_region2"]
