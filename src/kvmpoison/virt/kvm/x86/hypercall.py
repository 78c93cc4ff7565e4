"""``kvm_emulate_hypercall`` for the RFC's two hypercalls and the PV ones that just return.

Follows ``kvm_emulate_hypercall`` (arch/x86/kvm/x86.c, v5.12) with RFCv2
13/13 (the same two cases in v1 7/7): KVM_HC_ENABLE_MEM_PROTECTED (12)
returns ``kvm_protect_memory()``, KVM_HC_MEM_SHARE (13, gfn, npages)
``kvm_share_memory()``; the hardened design's share and unshare (14, the
2020 RFC's KVM_HC_MEM_UNSHARE) are in virt/kvm/hardened.py. Without the
RFC both are unknown: -KVM_ENOSYS (12
became KVM_HC_MAP_GPA_RANGE in 5.14, which still answers -KVM_ENOSYS unless
the VMM enabled its exit). The PV hypercalls that need no state
(VAPIC_POLL_IRQ, KICK_CPU, SCHED_YIELD) return 0, as they do while
KVM_CAP_ENFORCE_PV_FEATURE_CPUID is off. Simplified: the guest always runs
at CPL 0 (no -KVM_EPERM) in 64-bit mode (no 32-bit truncation);
CLOCK_PAIRING (9) and SEND_IPI (10) are not modelled and answer -KVM_ENOSYS.
"""

from __future__ import annotations

from kvmpoison.virt.kvm.hardened import (
    KVM_HC_MEM_UNSHARE,
    kvm_share_memory_hardened,
    kvm_unshare_memory_hardened,
)
from kvmpoison.virt.kvm.kvm_main import Protection, Vm
from kvmpoison.virt.kvm.mem_protected import (
    KVM_HC_ENABLE_MEM_PROTECTED,
    KVM_HC_MEM_SHARE,
    kvm_protect_memory,
    kvm_share_memory,
)

KVM_ENOSYS = 1000
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11
_RETURN_ZERO = (KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD)


def kvm_emulate_hypercall(vm: Vm, nr: int, a0: int = 0, a1: int = 0) -> int:
    """The value the guest finds in RAX (as a signed long)."""
    if nr in _RETURN_ZERO:
        return 0
    if vm.protection is Protection.HARDENED:  # the design: 12, 13 and 2020's 14
        if nr == KVM_HC_ENABLE_MEM_PROTECTED:
            return kvm_protect_memory(vm)
        if nr == KVM_HC_MEM_SHARE:
            return kvm_share_memory_hardened(vm, a0, a1)
        if nr == KVM_HC_MEM_UNSHARE:
            return kvm_unshare_memory_hardened(vm, a0, a1)
    elif vm.protection is not Protection.NONE:
        if nr == KVM_HC_ENABLE_MEM_PROTECTED:
            return kvm_protect_memory(vm)
        if nr == KVM_HC_MEM_SHARE:
            return kvm_share_memory(vm, a0, a1)
    return -KVM_ENOSYS
