"""``kvm_emulate_hypercall`` for the RFC's two hypercalls.

Follows ``arch/x86/kvm/x86.c`` with RFCv2 13/13: KVM_HC_ENABLE_MEM_PROTECTED
(12) and KVM_HC_MEM_SHARE (13, gfn, npages). Upstream, 12 became
KVM_HC_MAP_GPA_RANGE; a VM without the RFC answers -KVM_ENOSYS.
"""

from __future__ import annotations

from kvmpoison.virt.kvm.kvm_main import Protection, Vm
from kvmpoison.virt.kvm.mem_protected import (
    KVM_HC_ENABLE_MEM_PROTECTED,
    KVM_HC_MEM_SHARE,
    kvm_protect_memory,
    kvm_share_memory,
)

KVM_ENOSYS = 1000


def kvm_emulate_hypercall(vm: Vm, nr: int, a0: int = 0, a1: int = 0) -> int:
    """The value the guest finds in RAX."""
    if vm.protection is Protection.NONE:
        return -KVM_ENOSYS
    if nr == KVM_HC_ENABLE_MEM_PROTECTED:
        return kvm_protect_memory(vm)
    if nr == KVM_HC_MEM_SHARE:
        return kvm_share_memory(vm, a0, a1)
    return -KVM_ENOSYS
