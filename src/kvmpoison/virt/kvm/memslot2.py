"""``KVM_SET_USER_MEMORY_REGION2``: a memslot, optionally bound to a guest_memfd.

A thin layer over :meth:`Vm.set_user_memory_region` (the v1 argument checks
and slot bookkeeping) that adds what ``struct kvm_userspace_memory_region2``
brings in v6.18: the slot flags check (``check_memory_region_flags``), the
guest_memfd offset check and the immutability of guest_memfd slots
(``__kvm_set_memory_region``), and ``kvm_gmem_bind`` (virt/kvm/guest_memfd.c),
read in the kvm tree that has ``kvm_arch_nr_memslot_as_ids`` and, for the
bind, ``KVM_MEMSLOT_GMEM_ONLY`` (the 6.18 code). Every errno below was also
measured on this project's 6.18 machine.

Simplified: the bindings are only recorded (which offsets of which guest_memfd
belong to which slot); no guest fault is served from the guest_memfd here
(the ``gmem`` design does that). LOG_DIRTY_PAGES and READONLY pass the flags
check but change nothing, and a bind error is found after the overlap check
and the ``kvm_mmu_max_gfn()`` check, where 6.18 binds before the latter.
"""

from __future__ import annotations

import errno
import weakref
from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.file import File
from kvmpoison.virt.kvm.guest_memfd import GuestMemfd
from kvmpoison.virt.kvm.kvm_main import Vm

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2


@dataclass(frozen=True)
class Binding:
    """One slot's range of a guest_memfd: ``gmem->bindings`` from ``start`` to ``end``."""

    vm: Vm
    slot: int
    start: int  # first page offset in the file
    end: int  # one past the last


# gmem->bindings per guest_memfd, and the guest_memfd slots of each VM (KVM_MEM_GUEST_MEMFD).
_BINDINGS: weakref.WeakKeyDictionary[GuestMemfd, list[Binding]] = weakref.WeakKeyDictionary()
_GMEM_SLOTS: weakref.WeakKeyDictionary[Vm, dict[int, GuestMemfd]] = weakref.WeakKeyDictionary()


def check_memory_region_flags(flags: int) -> int:
    """``check_memory_region_flags`` (virt/kvm/kvm_main.c, 6.18) for a default x86 VM:
    LOG_DIRTY_PAGES and READONLY, or GUEST_MEMFD alone (no dirty logging and no
    read-only slots on private memory)."""
    valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)
    return -errno.EINVAL if flags & ~valid else 0


def kvm_gmem_bind(vm: Vm, file: File | None, slot: int, npages: int, offset: int) -> int:
    """``kvm_gmem_bind`` (virt/kvm/guest_memfd.c, 6.18): -EBADF for no file; -EINVAL for a
    file that is no guest_memfd, one of another VM, an offset beyond i_size, or a range
    another slot already binds."""
    if file is None:
        return -errno.EBADF
    gmem = file.f_op
    if not isinstance(gmem, GuestMemfd) or gmem.owner is not vm:
        return -errno.EINVAL
    if offset < 0 or offset & (PAGE_SIZE - 1) or offset + (npages << PAGE_SHIFT) > \
            file.f_inode.i_size:
        return -errno.EINVAL
    start = offset >> PAGE_SHIFT
    end = start + npages
    bindings = _BINDINGS.setdefault(gmem, [])
    if any(b.start < end and start < b.end for b in bindings):
        return -errno.EINVAL
    bindings.append(Binding(vm, slot, start, end))
    _GMEM_SLOTS.setdefault(vm, {})[slot] = gmem
    return 0


def _unbind(vm: Vm, slot: int) -> None:
    """``kvm_gmem_unbind``: the slot's range is free again."""
    gmem = _GMEM_SLOTS.get(vm, {}).pop(slot, None)
    if gmem is not None:
        _BINDINGS[gmem] = [b for b in _BINDINGS.get(gmem, []) if not (b.vm is vm
                                                                      and b.slot == slot)]


def set_user_memory_region2(vm: Vm, file_of: dict[int, File], slot: int, flags: int, gpa: int,
                            size: int, hva: int, gmem_fd: int, gmem_offset: int) -> int:
    """``KVM_SET_USER_MEMORY_REGION2`` (``kvm_set_memory_region`` and
    ``__kvm_set_memory_region``, virt/kvm/kvm_main.c, 6.18): 0 or -errno.

    ``file_of`` is the calling task's fd table (``fget`` in ``kvm_gmem_bind``).
    """
    if not 0 <= flags < 1 << 32:
        return -errno.EINVAL
    if err := check_memory_region_flags(flags):
        return err
    gmem = bool(flags & KVM_MEM_GUEST_MEMFD)
    if gmem and (gmem_offset & (PAGE_SIZE - 1) or gmem_offset + size >= 1 << 64):
        return -errno.EINVAL
    old = next((s for s in vm.memslots if s.slot == slot), None)
    # "Private memslots are immutable, they can only be deleted". Dropping the flag from a
    # guest_memfd slot (a KVM_MR_FLAGS_ONLY change) is -EINVAL too on the 6.18 machine,
    # from past __kvm_set_memory_region; the model refuses it here.
    if old is not None and size and (gmem or slot in _GMEM_SLOTS.get(vm, {})):
        return -errno.EINVAL
    err = vm.set_user_memory_region(slot, gpa, size, hva)
    if err or not size:
        if not err:
            _unbind(vm, slot)
        return err
    if gmem:
        # kvm_gmem_bind runs on the new slot before kvm_set_memslot; undo the slot on error
        # (it is new and nothing has faulted through it yet).
        err = kvm_gmem_bind(vm, file_of.get(gmem_fd), slot, size >> PAGE_SHIFT,
                            gmem_offset - (1 << 64) if gmem_offset >= 1 << 63 else gmem_offset)
        if err:
            vm.set_user_memory_region(slot, gpa, 0, hva)
    return err
