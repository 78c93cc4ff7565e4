"""A QEMU-like VMM: a host process that maps guest RAM and runs one virtio device.

Guest RAM is a memfd (shmem) mapped MAP_SHARED, or private anonymous memory;
slot 0 maps it at GPA 0. The device reads requests from, and writes replies
to, the guest's swiotlb bounce buffers through the VMM's own mapping. As an
attacker (or just a buggy VMM) it can touch any GPA through any host path.

Simplified: QEMU's SIGBUS handler (``kvm_arch_on_sigbus_vcpu``) turns a
BUS_MCEERR_AR at a guest-RAM address into a virtual #MC for the guest
(KVM_X86_SET_MCE); the model's VMM only survives the signal, which is the
outcome a scenario sees.
"""

from __future__ import annotations

import errno
import functools
import signal
from dataclasses import dataclass, field

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_HUGEPAGE
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED
from kvmpoison.outcome import Outcome
from kvmpoison.virt.kvm.gmem_memslot import (
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MEM_GUEST_MEMFD,
    KvmUserspaceMemoryRegion2,
    kvm_create_guest_memfd,
    kvm_vm_enable_cap_exit_hypercall,
    kvm_vm_ioctl_set_memory_attributes,
    kvm_vm_ioctl_set_memory_region2,
)
from kvmpoison.virt.kvm.kvm_main import Vm
from kvmpoison.virt.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmpoison.virt.kvm.private_mem import (
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KvmExit,
)
from kvmpoison.virt.kvm.x86.gmem_hypercall import KVM_MAP_GPA_RANGE_ENCRYPTED

RW = 0x3
BACKINGS = ("memfd", "anon", "file")


HPAGE_ALIGN = 2 << 20  # QEMU_VMALLOC_ALIGN on x86-64


def _map_thp_ram(proc: Process, ram_size: int) -> int:
    """Private anonymous guest RAM at a 2 MiB-aligned address, MADV_HUGEPAGE: reserve
    ``ram_size + 2 MiB``, keep the aligned part, give the rest back (``qemu_ram_mmap``)."""
    base = _value(proc.mmap(0, ram_size + HPAGE_ALIGN, RW, MAP_PRIVATE | MAP_ANONYMOUS),
                  "mmap guest RAM")
    hva = (base + HPAGE_ALIGN - 1) & ~(HPAGE_ALIGN - 1)
    if hva > base:
        _value(proc.munmap(base, hva - base), "munmap below guest RAM")
    if base + ram_size + HPAGE_ALIGN > hva + ram_size:
        _value(proc.munmap(hva + ram_size, base + ram_size + HPAGE_ALIGN - hva - ram_size),
               "munmap above guest RAM")
    _value(proc.madvise(hva, ram_size, MADV_HUGEPAGE), "madvise(MADV_HUGEPAGE)")
    return hva


@dataclass(eq=False)
class Vmm:
    proc: Process
    ram_hva: int
    ram_size: int
    backing: str
    ram_fd: int | None
    gmem_fd: int | None = None  # the guest_memfd of private guest RAM (design gmem)
    conversions: list[str] = field(default_factory=list)  # kvm_convert_memory calls

    @classmethod
    def start(cls, proc: Process, ram_size: int, backing: str = "memfd",
              thp: bool = False) -> Vmm:
        """Map guest RAM. Like QEMU, the VMM handles SIGBUS (``sigbus_handler``) and lives on.

        ``thp`` (anonymous RAM only) is QEMU's usual THP case: ``qemu_ram_mmap``
        reserves the RAM 2 MiB-aligned (QEMU_VMALLOC_ALIGN) and ``ram_block_add``
        asks for ``qemu_madvise(QEMU_MADV_HUGEPAGE)``; what the host then maps
        with huge pages depends on its THP mode (``madvise`` by default).
        """
        proc.task.handled = frozenset({signal.SIGBUS})
        if backing not in BACKINGS:
            known = ", ".join(BACKINGS)
            raise ValueError(f"unknown guest RAM backing {backing!r} (known: {known})")
        if thp and backing != "anon":
            raise ValueError(f"THP guest RAM needs backing anon, not {backing!r}")
        if thp:
            return cls(proc, _map_thp_ram(proc, ram_size), ram_size, backing, None)
        fd = None
        if backing == "memfd":
            fd = _value(proc.memfd_create("qemu-guest-ram"), "memfd_create")
            _value(proc.ftruncate(fd, ram_size), "ftruncate")
            hva = _value(proc.mmap(0, ram_size, RW, MAP_SHARED, fd), "mmap guest RAM")
        elif backing == "file":
            path = f"/var/lib/kvmpoison/guest-{proc.pid}.img"
            proc.kernel.create_file(path, b"")
            fd = _value(proc.open(path, O_RDWR), "open guest image")
            _value(proc.ftruncate(fd, ram_size), "ftruncate")
            hva = _value(proc.mmap(0, ram_size, RW, MAP_SHARED, fd), "mmap guest RAM")
        else:
            hva = _value(proc.mmap(0, ram_size, RW, MAP_PRIVATE | MAP_ANONYMOUS), "mmap guest RAM")
        return cls(proc, hva, ram_size, backing, fd)

    @classmethod
    def share(cls, proc: Process, other: Vmm) -> Vmm:
        """A second VMM mapping another VMM's guest-RAM file (vhost-user, a new VM on old RAM)."""
        proc.task.handled = frozenset({signal.SIGBUS})
        if other.ram_fd is None:
            raise ValueError("anonymous guest RAM cannot be shared with another VMM")
        fd = proc.install(other.proc.task.fds[other.ram_fd])
        hva = _value(proc.mmap(0, other.ram_size, RW, MAP_SHARED, fd), "mmap shared guest RAM")
        return cls(proc, hva, other.ram_size, other.backing, fd)

    @classmethod
    def fork(cls, parent: Vmm) -> Vmm:
        """A forked child of a VMM: same guest-RAM address, copied page tables and fds."""
        child = parent.proc.fork()
        return cls(child, parent.ram_hva, parent.ram_size, parent.backing, parent.ram_fd)

    def gpa_to_hva(self, gpa: int) -> int:
        if not 0 <= gpa < self.ram_size:
            raise ValueError(f"gpa {gpa:#x} is outside guest RAM (0..{self.ram_size:#x})")
        return self.ram_hva + gpa

    # -- the virtio device --------------------------------------------------------------

    def device_read(self, gpa: int, size: int) -> Outcome:
        return self.proc.load(self.gpa_to_hva(gpa), size)

    def device_write(self, gpa: int, data: bytes) -> Outcome:
        return self.proc.store(self.gpa_to_hva(gpa), data)

    # -- as an attacker -------------------------------------------------------------------

    def load(self, gpa: int, size: int = 8) -> Outcome:
        return self.proc.load(self.gpa_to_hva(gpa), size)

    def store(self, gpa: int, data: bytes) -> Outcome:
        return self.proc.store(self.gpa_to_hva(gpa), data)

    def pread_ram(self, gpa: int, buf: int, size: int) -> Outcome:
        """pread on the guest-RAM file (the page-cache path)."""
        if self.ram_fd is None:
            raise ValueError("guest RAM is anonymous: there is no file to pread")
        return self.proc.pread(self.ram_fd, buf, size, gpa)

    def pwrite_ram(self, gpa: int, buf: int, size: int) -> Outcome:
        if self.ram_fd is None:
            raise ValueError("guest RAM is anonymous: there is no file to pwrite")
        return self.proc.pwrite(self.ram_fd, buf, size, gpa)

    def scratch(self, pages: int = 1) -> int:
        addr = _value(self.proc.mmap(0, pages * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS),
                      "mmap scratch")
        _value(self.proc.store(addr, bytes(pages * PAGE_SIZE)), "touch scratch")
        return addr


    # -- the KVM ioctls of a VM with private memory (6.18), one method per call ----------------

    def guest_memfd_create(self, vm: Vm, size: int, flags: int = 0) -> Outcome:
        """``KVM_CREATE_GUEST_MEMFD`` on ``vm``: ret:FD or err (ENOTTY before 6.8)."""
        if vm.gmem is None:
            return Outcome.error(errno.ENOTTY, "this kernel has no KVM_CREATE_GUEST_MEMFD")
        got = kvm_create_guest_memfd(vm, size, flags)
        return _ret(got) if isinstance(got, int) else Outcome.ret(self.proc.install(got))

    def set_user_memory_region2(self, vm: Vm, slot: int, flags: int, gpa: int, size: int,
                                hva: int, guest_memfd: int = 0,
                                guest_memfd_offset: int = 0) -> Outcome:
        """``KVM_SET_USER_MEMORY_REGION2``: ret:0 or err."""
        if vm.gmem is None:
            return Outcome.error(errno.ENOTTY, "this kernel has no KVM_SET_USER_MEMORY_REGION2")
        mem = KvmUserspaceMemoryRegion2(slot, flags, gpa, size, hva, guest_memfd_offset,
                                        guest_memfd)
        return _ret(kvm_vm_ioctl_set_memory_region2(vm, mem, self.proc.task.fds.get))

    def set_memory_attributes(self, vm: Vm, address: int, size: int, attributes: int,
                              flags: int = 0) -> Outcome:
        """``KVM_SET_MEMORY_ATTRIBUTES``: ret:0 or err."""
        return _ret(kvm_vm_ioctl_set_memory_attributes(vm, address, size, attributes, flags))

    def setup_private_memory(self, vm: Vm) -> int:
        """What QEMU does for a guest_memfd machine: 0, or the failing call's -errno.

        Guest RAM gets a guest_memfd of the same size, slot 0 binds both backings
        (KVM_MEM_GUEST_MEMFD), the whole range starts private
        (``kvm_set_memory_attributes_private`` in ``kvm_set_phys_mem``), and
        KVM_HC_MAP_GPA_RANGE exits to the VMM (KVM_CAP_EXIT_HYPERCALL).
        """
        fd = self.guest_memfd_create(vm, self.ram_size, 0)
        if not fd.succeeded:
            return -(fd.value or errno.EINVAL)
        self.gmem_fd = fd.value
        for got in (
            self.set_user_memory_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, self.ram_size,
                                         self.ram_hva, fd.value or 0, 0),
            _ret(kvm_vm_enable_cap_exit_hypercall(vm, KVM_EXIT_HYPERCALL_VALID_MASK)),
            self.set_memory_attributes(vm, 0, self.ram_size, KVM_MEMORY_ATTRIBUTE_PRIVATE),
        ):
            if not got.succeeded:
                return -(got.value or errno.EINVAL)
        assert vm.gmem is not None
        # A partial, not a lambda: Machine.copy() deep-copies it with the VMM and the VM, where
        # a closure would be shared and send every copy's exits to the original VMM.
        vm.gmem.userspace = functools.partial(self.kvm_handle_exit, vm)
        return 0

    def kvm_handle_exit(self, vm: Vm, ex: KvmExit) -> int:
        """QEMU's run loop for the two exits: 0 re-enters the guest.

        KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE) converts [gpa, gpa + npages pages)
        to private when the attributes say ENCRYPTED (``kvm_handle_hc_map_gpa_range``);
        KVM_EXIT_MEMORY_FAULT converts the faulting page to what the guest asked
        for (``kvm_cpu_exec``). QEMU copies the result into ``hypercall.ret``.
        """
        if ex.exit_reason == KVM_EXIT_HYPERCALL and ex.nr == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = ex.args
            ret = self.kvm_convert_memory(vm, gpa, npages << PAGE_SHIFT,
                                          bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED))
            ex.ret = ret
            return ret
        if ex.exit_reason == KVM_EXIT_MEMORY_FAULT:
            return self.kvm_convert_memory(vm, ex.gpa, ex.size,
                                           bool(ex.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE))
        return -errno.EINVAL

    def kvm_convert_memory(self, vm: Vm, start: int, size: int, to_private: bool) -> int:
        """QEMU's ``kvm_convert_memory``: set the attribute, then discard the other backing.

        To private, the shared page is discarded (``ram_block_discard_range``:
        fallocate PUNCH_HOLE on the RAM file, MADV_DONTNEED on anonymous RAM);
        to shared, the private page is (``ram_block_discard_guest_memfd_range``:
        fallocate PUNCH_HOLE on the guest_memfd). Either way the old content
        is gone: a conversion never preserves data. -1 on a bad range, as QEMU.
        """
        if start & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1) or not size:
            return -1
        if start + size > self.ram_size:
            return 0 if not to_private else -1  # MMIO converted to shared is ignored
        self.conversions.append(f"{start:#x}+{size:#x} -> {'private' if to_private else 'shared'}")
        got = self.set_memory_attributes(vm, start, size,
                                         KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        if not got.succeeded:
            return -1
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if not to_private:
            assert self.gmem_fd is not None
            got = self.proc.fallocate(self.gmem_fd, punch, start, size)
        elif self.ram_fd is not None:
            got = self.proc.fallocate(self.ram_fd, punch, start, size)
        else:
            got = self.proc.madvise(self.gpa_to_hva(start), size, MADV_DONTNEED)
        return 0 if got.succeeded else -1


def _ret(value: int) -> Outcome:
    return Outcome.error(-value) if value < 0 else Outcome.ret(value)


def _value(out: Outcome, what: str) -> int:
    if not out.succeeded:
        raise RuntimeError(f"VMM set-up step {what!r} failed: {out}")
    return out.value or 0
