"""guest_memfd memslots: KVM_SET_USER_MEMORY_REGION2, ``kvm_gmem_bind``, ``kvm_gmem_get_pfn``.

Follows v6.18: ``kvm_vm_ioctl_set_memory_region``, ``check_memory_region_flags``
and ``kvm_set_memory_region`` in ``virt/kvm/kvm_main.c``; ``kvm_gmem_bind``,
``kvm_gmem_unbind``, ``__kvm_gmem_invalidate_begin`` and ``kvm_gmem_get_pfn``
in ``virt/kvm/guest_memfd.c`` (read in a later stored tree whose
``gmem_file``/``gmem_inode`` split does not change these rules). Each ioctl
returns 0 or the kernel's -errno.

The rules: a guest_memfd slot needs a page-aligned ``guest_memfd_offset``
that does not wrap; the file must be a guest_memfd created for this VM
(another VM's, or any other file: -EINVAL; no such fd: -EBADF); the slot's
file range must lie inside the file and overlap no other binding of the file
(-EINVAL, not -EEXIST: -EEXIST is for overlapping gfns, checked before the
bind); guest_memfd slots cannot log dirty pages, cannot be read-only, and
cannot be modified, only deleted; no modification may toggle READONLY or
GUEST_MEMFD; a slot must end below ``kvm_mmu_max_gfn()`` (checked after the
bind, as ``kvm_arch_prepare_memory_region`` runs then). This is the one model
of the ioctl: the VMM's calls and the scenario ops (``memslot2``) both come
here, so every slot they bind serves the ``gmem`` design's faults and gets
its punch-hole invalidations. Simplified: one address
space (a VM with private memory has no SMM address space); the model's host
has 48 guest-physical address bits; ``userspace_addr`` must still pass
``access_ok``.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE, PTE_PFN_MASK
from kvmpoison.mm.file import File
from kvmpoison.mm.page import PageHWPoison
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.virt.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GmemBinding,
    GuestMemfd,
    kvm_gmem_create,
)
from kvmpoison.virt.kvm.kvm_main import (
    KVM_MEM_MAX_NR_PAGES,
    TASK_SIZE_MAX,
    Memslot,
    Vm,
    zap_large_sptes,
)
from kvmpoison.virt.kvm.memory_attributes import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    U64_MAX,
    kvm_vm_ioctl_set_mem_attributes,
)
from kvmpoison.virt.kvm.private_mem import KVM_CAP_EXIT_HYPERCALL, GmemVm

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEM_SLOTS_NUM = 0x7FFF  # SHRT_MAX
KVM_USER_MEM_SLOTS_6_18 = KVM_MEM_SLOTS_NUM - 3  # x86: KVM_INTERNAL_MEM_SLOTS = 3
KVM_HC_MAP_GPA_RANGE = 12  # include/uapi/linux/kvm_para.h
# kvm_mmu_max_gfn() + 1: the model's host has 48-bit guest-physical addresses (4-level EPT)
KVM_MMU_MAX_GFN_END = 1 << (48 - PAGE_SHIFT)
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
# The model's mark of an SPTE in the private (TDX: mirror/S-EPT) root. KVM keeps private
# and shared mappings in separate roots; the model keeps one EPT and tags its private
# entries with bit 62, a bit the CPU ignores in an EPT leaf.
SPTE_PRIVATE = 1 << 62


@dataclass(eq=False)
class GmemMemslot(Memslot):
    """``struct kvm_memory_slot`` with its flags and ``gmem.file``/``gmem.pgoff``."""

    flags: int = 0
    gmem_file: File | None = None
    gmem_pgoff: int = 0
    gmem_only: bool = False  # KVM_MEMSLOT_GMEM_ONLY: a guest_memfd with MMAP serves every fault

    def gmem_index(self, gfn: int) -> int:
        """``kvm_gmem_get_index``."""
        return gfn - self.base_gfn + self.gmem_pgoff


@dataclass(frozen=True)
class KvmUserspaceMemoryRegion2:
    """``struct kvm_userspace_memory_region2`` (160 bytes; the pads are not modelled)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0


def _gmem(vm: Vm) -> GmemVm:
    if vm.gmem is None:
        raise ValueError(f"{vm!r} has no private-memory state (design gmem only)")
    return vm.gmem


def kvm_gmem_of(file: File) -> GuestMemfd | None:
    return file.f_op if isinstance(file.f_op, GuestMemfd) else None


def check_memory_region_flags(mem: KvmUserspaceMemoryRegion2) -> int:
    valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD
    if mem.flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES  # dirty logging private memory: not supported
    else:
        valid |= KVM_MEM_READONLY  # GUEST_MEMFD is incompatible with read-only memslots
    return -errno.EINVAL if mem.flags & ~valid else 0


def kvm_vm_ioctl_set_memory_region2(vm: Vm, mem: KvmUserspaceMemoryRegion2,
                                    fget: Callable[[int], File | None]) -> int:
    """``KVM_SET_USER_MEMORY_REGION2``; ``fget`` resolves the caller's fds."""
    fields = (mem.guest_phys_addr, mem.memory_size, mem.userspace_addr, mem.guest_memfd_offset)
    if not (all(0 <= f < 1 << 32 for f in (mem.slot, mem.flags, mem.guest_memfd))
            and all(0 <= f <= U64_MAX for f in fields)):
        return -errno.EINVAL  # the uapi fields are u32/u64
    if (mem.slot & 0xFFFF) >= KVM_USER_MEM_SLOTS_6_18:
        return -errno.EINVAL
    return kvm_set_memory_region(vm, mem, fget)


def kvm_set_memory_region(vm: Vm, mem: KvmUserspaceMemoryRegion2,
                          fget: Callable[[int], File | None]) -> int:
    r = check_memory_region_flags(mem)
    if r:
        return r
    as_id, ident = mem.slot >> 16, mem.slot & 0xFFFF
    size, gpa, hva = mem.memory_size, mem.guest_phys_addr, mem.userspace_addr
    if size & (PAGE_SIZE - 1) or gpa & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if hva & (PAGE_SIZE - 1) or hva + size > TASK_SIZE_MAX:  # access_ok
        return -errno.EINVAL
    if mem.flags & KVM_MEM_GUEST_MEMFD and (mem.guest_memfd_offset & (PAGE_SIZE - 1)
                                            or mem.guest_memfd_offset + size > U64_MAX):
        return -errno.EINVAL
    if as_id >= 1 or ident >= KVM_MEM_SLOTS_NUM:
        return -errno.EINVAL
    if gpa + size > U64_MAX:
        return -errno.EINVAL
    if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
        return -errno.EINVAL
    old = next((s for s in vm.memslots if s.slot == ident), None)
    if size == 0:
        if old is None:
            return -errno.EINVAL
        kvm_delete_memslot(vm, old)
        return 0
    base, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    old_flags = old.flags if isinstance(old, GmemMemslot) else 0
    if old is not None:  # modify an existing slot
        if mem.flags & KVM_MEM_GUEST_MEMFD:
            return -errno.EINVAL  # "Private memslots are immutable, they can only be deleted."
        # Nor may a modification toggle GUEST_MEMFD: dropping it from a guest_memfd slot
        # is -EINVAL too ("KVM: Disallow toggling KVM_MEM_GUEST_MEMFD on an existing
        # memslot", Dec 2025, in 6.18.y; measured on 6.18.44), not a KVM_MR_FLAGS_ONLY change.
        if hva != old.userspace_addr or npages != old.npages or \
                (mem.flags ^ old_flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
            return -errno.EINVAL
        if base == old.base_gfn:
            if isinstance(old, GmemMemslot):
                old.flags = mem.flags  # KVM_MR_FLAGS_ONLY
            return 0
    if any(s is not old and base < s.base_gfn + s.npages and s.base_gfn < base + npages
           for s in vm.memslots):
        return -errno.EEXIST  # kvm_check_memslot_overlap (CREATE and MOVE)
    new = GmemMemslot(ident, base, npages, hva, flags=mem.flags)
    if mem.flags & KVM_MEM_GUEST_MEMFD:
        r = kvm_gmem_bind(vm, new, mem.guest_memfd, mem.guest_memfd_offset, fget)
        if r:
            return r
    if base + npages > KVM_MMU_MAX_GFN_END:  # kvm_arch_prepare_memory_region, after the bind
        kvm_gmem_unbind(new)
        return -errno.EINVAL
    if old is not None:  # KVM_MR_MOVE: the old gfns go
        kvm_delete_memslot(vm, old)
    vm.memslots.append(new)
    return 0


def kvm_delete_memslot(vm: Vm, slot: Memslot) -> None:
    kvm_unmap_gfn_range(vm, slot.base_gfn, slot.base_gfn + slot.npages)
    vm.memslots = [s for s in vm.memslots if s is not slot]
    if isinstance(slot, GmemMemslot):
        kvm_gmem_unbind(slot)


def _live_bindings(gmem: GuestMemfd) -> list[GmemBinding]:
    """Bindings whose memslot still exists (a slot deleted with the v1 ioctl leaves none)."""
    vm = gmem.owner
    slots = vm.memslots if isinstance(vm, Vm) else []
    gmem.bindings = [b for b in gmem.bindings if any(b.slot is s for s in slots)]
    return gmem.bindings


def kvm_gmem_bind(vm: Vm, slot: GmemMemslot, fd: int, offset: int,
                  fget: Callable[[int], File | None]) -> int:
    """Bind file pages [offset, offset + slot size) to ``slot``: 0 or -errno."""
    file = fget(fd)
    if file is None:
        return -errno.EBADF
    gmem = kvm_gmem_of(file)
    if gmem is None or gmem.owner is not vm:
        return -errno.EINVAL
    if offset < 0 or offset & (PAGE_SIZE - 1) or offset + (slot.npages << PAGE_SHIFT) > \
            file.f_inode.i_size:
        return -errno.EINVAL
    start = offset >> PAGE_SHIFT
    end = start + slot.npages
    if any(b.start < end and start < b.end for b in _live_bindings(gmem)):
        return -errno.EINVAL
    slot.gmem_file = file
    slot.gmem_pgoff = start
    slot.gmem_only = bool(gmem.flags & GUEST_MEMFD_FLAG_MMAP)
    private_only = not gmem.flags & GUEST_MEMFD_FLAG_INIT_SHARED  # else KVM_FILTER_SHARED
    # A partial of a module function, not a closure: Machine.copy() deep-copies its VM and
    # slot, where a closure would zap the original machine's EPT from every copy.
    invalidate = functools.partial(_invalidate_binding, vm, slot, private_only)
    gmem.bindings.append(GmemBinding(start, end, slot, invalidate))
    return 0


def _invalidate_binding(vm: Vm, slot: GmemMemslot, private_only: bool, lo: int, hi: int) -> None:
    """``__kvm_gmem_invalidate_begin`` for one binding: zap the SPTEs of file pages [lo, hi)."""
    kvm_gmem_zap(vm, slot, lo, hi, private_only)


def kvm_gmem_unbind(slot: GmemMemslot) -> None:
    if slot.gmem_file is None:
        return
    gmem = kvm_gmem_of(slot.gmem_file)
    if gmem is not None:
        gmem.bindings = [b for b in gmem.bindings if b.slot is not slot]
    slot.gmem_file = None


def kvm_gmem_zap(vm: Vm, slot: GmemMemslot, lo: int, hi: int, private_only: bool) -> None:
    """``__kvm_gmem_invalidate_begin`` for file pages [lo, hi) of ``slot``.

    A guest_memfd created without INIT_SHARED zaps private SPTEs only
    (KVM_FILTER_PRIVATE); one with INIT_SHARED zaps shared ones
    (KVM_FILTER_SHARED, as its pages back shared memory).
    """
    first = slot.base_gfn + lo - slot.gmem_pgoff
    last = slot.base_gfn + hi - slot.gmem_pgoff
    kvm_unmap_gfn_range(vm, first, last, private=private_only, shared=not private_only)
    mapping = slot.gmem_file.f_mapping if slot.gmem_file is not None else None
    if vm.td_keyid is not None and mapping is not None:
        # Every TD-owned page of the range is removed, even one whose SPTE the model's
        # MMU notifier already zapped (6.18's notifier leaves private SPTEs alone).
        idx = mapping.cached_indices()
        tdx_reclaim_pages(vm, mapping.pages[idx[(idx >= lo) & (idx < hi)]])


def kvm_unmap_gfn_range(vm: Vm, first: int, last: int, private: bool = True,
                        shared: bool = True) -> None:
    """Zap the SPTEs of gfns [first, last), private ones, shared ones or both (vectorised).

    For a TD, removing a private page is TDH.MEM.PAGE.REMOVE and the host then
    clears the frame with MOVDIR64B under KeyID 0 (``tdx_reclaim_pages``), so the
    frame goes back to the host clean.
    """
    if shared and vm.ept.nr_pmd_leaves:  # 2M SPTEs map only shared (THP) memory here
        zap_large_sptes(vm.ept, first, last)
    rows = vm.ept.store.rows
    for chunk in vm.ept.chunks(first << PAGE_SHIFT, last << PAGE_SHIFT):
        sptes = rows[chunk.rows, chunk.cols]
        is_private = (sptes & np.uint64(SPTE_PRIVATE)) != 0
        hit = (sptes != 0) & ((is_private & private) | (~is_private & shared))
        if vm.td_keyid is not None:
            pfns = (sptes[hit & is_private] & np.uint64(PTE_PFN_MASK)) >> np.uint64(PAGE_SHIFT)
            tdx_reclaim_pages(vm, pfns.astype(np.int64))  # TDH.MEM.PAGE.REMOVE per page
        rows[chunk.rows[hit], chunk.cols[hit]] = 0


def tdx_reclaim_pages(vm: Vm, pfns: npt.NDArray[np.int64]) -> None:
    """The host's side of TDH.MEM.PAGE.REMOVE for each TD-owned pfn, in bulk: the frame is
    cleared under KeyID 0 (``tdx_reclaim_page``'s MOVDIR64B of zeros, arch/x86/virt/vmx/
    tdx/tdx.c, 6.18) and no longer counts as the TD's. Pfns the TD does not own are left."""
    if vm.td_keyid is None or not len(pfns) or not vm.td_pages:
        return
    # sorted_unique: np.unique would import numpy.ma (10-30 ms) on a run's first reclaim.
    owned = sorted_unique(pfns[np.isin(pfns, np.fromiter(vm.td_pages, dtype=np.int64,
                                                         count=len(vm.td_pages)))])
    if not len(owned):
        return
    vm.core.hw.clear_frames(owned)  # whole-page zero stores under KeyID 0, as MOVDIR64B's
    vm.td_pages.difference_update(owned.tolist())


def kvm_gmem_get_pfn(vm: Vm, slot: Memslot, gfn: int) -> tuple[int, int]:
    """(pfn, 0) or (-1, -errno): the guest_memfd page behind private ``gfn``."""
    if not isinstance(slot, GmemMemslot) or slot.gmem_file is None:
        return -1, -errno.EFAULT
    gmem = kvm_gmem_of(slot.gmem_file)
    if gmem is None:
        return -1, -errno.EFAULT
    index = slot.gmem_index(gfn)
    if not any(b.slot is slot and b.start <= index < b.end for b in gmem.bindings):
        return -1, -errno.EIO
    pfn, err = gmem.kvm_gmem_get_folio(slot.gmem_file.f_inode, index)
    if err or pfn is None:
        return -1, err or -errno.EFAULT
    if PageHWPoison(vm.core.pages[pfn]):  # __kvm_gmem_get_pfn: folio_test_hwpoison
        return -1, -EHWPOISON
    return pfn, 0


def kvm_gmem_cached_pfn(vm: Vm, gfn: int) -> int | None:
    """The guest_memfd frame cached for private ``gfn`` (no allocation), or None."""
    slot = vm.gfn_to_memslot(gfn)
    if not isinstance(slot, GmemMemslot) or slot.gmem_file is None:
        return None
    mapping = slot.gmem_file.f_mapping
    return None if mapping is None else mapping.lookup(slot.gmem_index(gfn))


def kvm_slot_has_gmem(slot: Memslot | None) -> bool:
    return isinstance(slot, GmemMemslot) and bool(slot.flags & KVM_MEM_GUEST_MEMFD)


def kvm_memslot_is_gmem_only(slot: Memslot | None) -> bool:
    return isinstance(slot, GmemMemslot) and slot.gmem_only


def kvm_mem_is_private(vm: Vm, gfn: int) -> bool:
    state = vm.gmem
    return state is not None and bool(state.mem_attr_array.get(gfn)
                                      & KVM_MEMORY_ATTRIBUTE_PRIVATE)


def kvm_vm_ioctl_set_memory_attributes(vm: Vm, address: int, size: int, attributes: int,
                                       flags: int = 0) -> int:
    """``KVM_SET_MEMORY_ATTRIBUTES``: 0 or -errno; the VM's SPTEs of the range go."""
    state = vm.gmem
    if state is None:
        return -errno.ENOTTY  # no KVM_CAP_MEMORY_ATTRIBUTES: the ioctl does not exist

    def zap(first: int, last: int) -> None:
        kvm_unmap_gfn_range(vm, first, last)

    return kvm_vm_ioctl_set_mem_attributes(state.mem_attr_array, state.has_private_mem, zap,
                                           address, size, attributes, flags)


def kvm_vm_enable_cap_exit_hypercall(vm: Vm, mask: int) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, args[0] = mask)``."""
    state = _gmem(vm)
    if mask & ~KVM_EXIT_HYPERCALL_VALID_MASK:
        return -errno.EINVAL
    state.hypercall_exit_enabled = mask
    return 0


def kvm_gmem_get_supported_flags(vm: Vm) -> int:
    """MMAP always; INIT_SHARED only for a VM without private memory (x86 6.18:
    ``kvm_arch_supports_gmem_init_shared`` is ``!kvm_arch_has_private_mem``)."""
    state = _gmem(vm)
    return GUEST_MEMFD_FLAG_MMAP | (0 if state.has_private_mem else GUEST_MEMFD_FLAG_INIT_SHARED)


def kvm_create_guest_memfd(vm: Vm, size: int, flags: int) -> File | int:
    """``KVM_CREATE_GUEST_MEMFD`` on the VM fd: the file, or -errno."""
    if not 0 <= flags < 1 << 64 or flags & ~kvm_gmem_get_supported_flags(vm):
        return -errno.EINVAL
    return kvm_gmem_create(vm.core, vm, size, flags)


__all__ = ["KVM_CAP_EXIT_HYPERCALL", "KVM_HC_MAP_GPA_RANGE", "KVM_MEM_GUEST_MEMFD",
           "GmemMemslot", "KvmUserspaceMemoryRegion2", "kvm_create_guest_memfd",
           "kvm_gmem_cached_pfn", "kvm_gmem_get_pfn", "kvm_mem_is_private", "kvm_slot_has_gmem",
           "kvm_vm_enable_cap_exit_hypercall", "kvm_vm_ioctl_set_memory_attributes",
           "kvm_vm_ioctl_set_memory_region2"]
