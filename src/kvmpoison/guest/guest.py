"""The guest OS: its vCPU accesses, its boot-time hypercalls, swiotlb and virtio.

Follows the guest side of the RFC series (RFCv2 02-05/13): at
``kvm_init_platform`` the guest issues KVM_HC_ENABLE_MEM_PROTECTED and
panics if that fails; DMA is forced through swiotlb bounce buffers, which
``__set_memory_enc_dec`` shares with KVM_HC_MEM_SHARE; the kvmclock page is
shared too. Virtio I/O copies through the bounce buffers. There is no
unshare ("TODO: Unsharing"); the hardened design's guest has one
(KVM_HC_MEM_UNSHARE, 14) and makes all of RAM private first at every boot.
Not modelled: 06/13 (sharing the real-mode trampoline) and the guest's own
#MC handling (KVM never injects one; QEMU would, from its SIGBUS handler).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.outcome import Halt, Outcome
from kvmpoison.virt.kvm.gmem_memslot import KVM_HC_MAP_GPA_RANGE
from kvmpoison.virt.kvm.hardened import KVM_HC_MEM_UNSHARE
from kvmpoison.virt.kvm.kvm_main import EPT_MAX_GFN, Protection, Vm
from kvmpoison.virt.kvm.mem_protected import KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE
from kvmpoison.virt.kvm.memory_attributes import MemAttrArray
from kvmpoison.virt.kvm.x86.gmem_hypercall import (
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    kvm_emulate_hypercall_gmem,
)
from kvmpoison.virt.kvm.x86.gmem_mmu import gmem_vcpu_access
from kvmpoison.virt.kvm.x86.hypercall import kvm_emulate_hypercall
from kvmpoison.virt.kvm.x86.vcpu import vcpu_access


@dataclass(frozen=True)
class GuestLayout:
    """Where the guest kernel keeps its shared pages (gfns)."""

    kvmclock: int = 0x0F
    swiotlb: int = 0x10
    swiotlb_pages: int = 16

    @property
    def swiotlb_gpa(self) -> int:
        return self.swiotlb << PAGE_SHIFT


@dataclass(eq=False)
class Guest:
    vm: Vm
    layout: GuestLayout = field(default_factory=GuestLayout)
    shared: list[tuple[int, int]] = field(default_factory=list)  # [gfn, end) used as shared
    log: list[str] = field(default_factory=list)
    panicked: str | None = None
    # gmem: the gfns this guest touches through the shared alias (value 1), TDX's shared bit
    gmem_alias: MemAttrArray = field(default_factory=MemAttrArray)
    # every conversion that succeeded, [gfn, end), in order: a checker of guest data (the
    # explorer's I3) learns from it which gfns the guest gave up or accepted afresh
    conversions: list[tuple[int, int]] = field(default_factory=list)

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0) -> int:
        if self.vm.gmem is not None:  # a 6.18 VM: upstream's hypercall table, not the RFC's
            return kvm_emulate_hypercall_gmem(self.vm, nr, a0, a1, a2)
        return kvm_emulate_hypercall(self.vm, nr, a0, a1)

    def share(self, gfn: int, npages: int) -> int:
        """``__set_memory_enc_dec(..., enc=false)``: KVM_HC_MEM_SHARE, then use the shared alias.

        Under gmem the guest asks with KVM_HC_MAP_GPA_RANGE(gpa, npages, DECRYPTED), as a
        TD's MapGPA reaches KVM.
        """
        if self.vm.protection is Protection.GMEM:
            return self.map_gpa_range(gfn, npages, private=False)
        ret = self.hypercall(KVM_HC_MEM_SHARE, gfn, npages)
        if ret == 0 and npages:
            self.shared.append((gfn, gfn + npages))  # ranges: a huge npages costs nothing
            self.conversions.append((gfn, gfn + npages))
        self.log.append(f"KVM_HC_MEM_SHARE({gfn:#x}, {npages}) = {ret}")
        return ret

    def unshare(self, gfn: int, npages: int) -> int:
        """``__set_memory_enc_dec(..., enc=true)`` of the hardened design: KVM_HC_MEM_UNSHARE
        (14, the 2020 RFC's number), then the guest uses the range as private again."""
        ret = self.hypercall(KVM_HC_MEM_UNSHARE, gfn, npages)
        if ret == 0 and npages:
            end = gfn + npages
            self.conversions.append((gfn, end))
            left: list[tuple[int, int]] = []
            for lo, hi in self.shared:  # cut [gfn, end) out of every shared range
                if lo < gfn:
                    left.append((lo, min(hi, gfn)))
                if hi > end:
                    left.append((max(lo, end), hi))
            self.shared = left
        self.log.append(f"KVM_HC_MEM_UNSHARE({gfn:#x}, {npages}) = {ret}")
        return ret

    def map_gpa_range(self, gfn: int, npages: int, private: bool) -> int:
        """KVM_HC_MAP_GPA_RANGE; on success the guest uses the private or the shared alias."""
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED
        ret = self.hypercall(KVM_HC_MAP_GPA_RANGE, gfn << PAGE_SHIFT, npages, attrs)
        if ret == 0:
            self.use_shared_alias(gfn, npages, not private)
            if npages:
                self.conversions.append((gfn, gfn + npages))
        kind = "ENCRYPTED" if private else "DECRYPTED"
        self.log.append(f"KVM_HC_MAP_GPA_RANGE({gfn << PAGE_SHIFT:#x}, {npages}, {kind}) = {ret}")
        return ret

    def use_shared_alias(self, gfn: int, npages: int, shared: bool) -> None:
        """gmem: from now on the guest touches gfns [gfn, gfn + npages) through the shared
        alias (or the private one), whatever KVM's attributes say."""
        self.gmem_alias.store(gfn, gfn + npages, int(shared))

    def boot(self) -> None:
        if self.vm.protection is Protection.GMEM:  # all private at reset; share the buffers
            self.gmem_alias = MemAttrArray()
            self.share(self.layout.kvmclock, 1)
            self.share(self.layout.swiotlb, self.layout.swiotlb_pages)
        elif self.vm.protection is not Protection.NONE:
            ret = self.hypercall(KVM_HC_ENABLE_MEM_PROTECTED)
            self.log.append(f"KVM_HC_ENABLE_MEM_PROTECTED = {ret}")
            if ret:
                self.panicked = "Failed to enable KVM memory protection"
                return
            if self.vm.protection is Protection.HARDENED:
                # The hardened guest starts all-private whatever an earlier kernel shared
                # (reboot, kexec: E11, E12), as a TD's memory is private at reset.
                self.unshare(0, EPT_MAX_GFN)
            self.share(self.layout.kvmclock, 1)
            self.share(self.layout.swiotlb, self.layout.swiotlb_pages)
        elif self.vm.td_keyid is not None:
            # A TD without the RFC: TDG.VP.VMCALL<MapGPA> converts the buffers to shared;
            # the host changes nothing, the guest uses the shared alias (KeyID 0).
            for gfn, n in ((self.layout.kvmclock, 1),
                           (self.layout.swiotlb, self.layout.swiotlb_pages)):
                self.shared.append((gfn, gfn + n))
                self.log.append(f"MapGPA({gfn:#x}, {n}) -> shared")
        # The host writes pvclock data into the (shared) kvmclock page.
        self.vm.write_guest(self.layout.kvmclock << PAGE_SHIFT, b"pvclock\0" + bytes(24))

    def reboot(self) -> None:
        """A guest reset or kexec: the new kernel knows nothing of the old one's shares.

        KVM keeps ``mem_protected`` and ``shared_ranges`` (the RFC can clear
        neither, E11/E12) and guest RAM is not wiped; the new kernel boots as
        the first one did (the enable hypercall is idempotent).
        """
        self.shared.clear()
        self.panicked = None
        self.log.append("reboot")
        self.boot()

    def _shared(self, gpa: int) -> bool:
        gfn = gpa >> PAGE_SHIFT
        return any(lo <= gfn < hi for lo, hi in self.shared)

    def _run(self, gpa: int, size: int, data: bytes | None) -> Outcome:
        core = self.vm.core
        if core.halted is not None:
            return core.halted
        try:
            if self.vm.gmem is not None:
                alias = bool(self.gmem_alias.get(gpa >> PAGE_SHIFT))
                return gmem_vcpu_access(self.vm, gpa, size, data, alias)
            return vcpu_access(self.vm, gpa, size, data, self._shared(gpa))
        except Halt as halt:
            core.halted = halt.outcome
            return halt.outcome

    def load(self, gpa: int, size: int = 8) -> Outcome:
        return self._run(gpa, size, None)

    def store(self, gpa: int, data: bytes) -> Outcome:
        return self._run(gpa, len(data), data)

    # -- virtio through swiotlb -------------------------------------------------------------

    def virtio_send(self, src_gpa: int, size: int) -> Outcome:
        """Bounce ``size`` private bytes at ``src_gpa`` into slot 0 of swiotlb for the device."""
        data = self.load(src_gpa, size)
        if not data.succeeded or data.data is None:
            return data
        return self.store(self.layout.swiotlb_gpa, data.data)

    def virtio_recv(self, dst_gpa: int, size: int) -> Outcome:
        """Copy the device's reply from swiotlb slot 1 into private memory."""
        reply = self.load(self.layout.swiotlb_gpa + PAGE_SIZE, size)
        if not reply.succeeded or reply.data is None:
            return reply
        return self.store(dst_gpa, reply.data)
