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

import signal
from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED
from kvmpoison.outcome import Outcome

RW = 0x3
BACKINGS = ("memfd", "anon", "file")


@dataclass(eq=False)
class Vmm:
    proc: Process
    ram_hva: int
    ram_size: int
    backing: str
    ram_fd: int | None

    @classmethod
    def start(cls, proc: Process, ram_size: int, backing: str = "memfd") -> Vmm:
        """Map guest RAM. Like QEMU, the VMM handles SIGBUS (``sigbus_handler``) and lives on."""
        proc.task.handled = frozenset({signal.SIGBUS})
        if backing not in BACKINGS:
            known = ", ".join(BACKINGS)
            raise ValueError(f"unknown guest RAM backing {backing!r} (known: {known})")
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


def _value(out: Outcome, what: str) -> int:
    if not out.succeeded:
        raise RuntimeError(f"VMM set-up step {what!r} failed: {out}")
    return out.value or 0
