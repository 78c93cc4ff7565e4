"""``kvm_emulate_hypercall`` for a VM with private memory: KVM_HC_MAP_GPA_RANGE (v6.18).

Follows ``__kvm_emulate_hypercall`` and ``complete_hypercall_exit`` in
``arch/x86/kvm/x86.c`` (v6.18). KVM_HC_MAP_GPA_RANGE (12, a0 = gpa,
a1 = npages, a2 = attributes) is -KVM_ENOSYS unless the VMM enabled
KVM_CAP_EXIT_HYPERCALL for it, -KVM_EINVAL for an unaligned gpa, zero pages
or a wrapping range; otherwise KVM exits with KVM_EXIT_HYPERCALL
(args = gpa, npages, attrs; flags = KVM_EXIT_HYPERCALL_LONG_MODE) and, when
the VMM re-enters, writes ``hypercall.ret`` to RAX. This table is upstream's:
the RFC's 12 (KVM_HC_ENABLE_MEM_PROTECTED) and 13 (KVM_HC_MEM_SHARE) do not
exist here and answer -KVM_ENOSYS, like every hypercall the model leaves out
(CLOCK_PAIRING, SEND_IPI, ...); VAPIC_POLL_IRQ, KICK_CPU and SCHED_YIELD
return 0. The guest's VMCALL reaches this table directly (``Guest.hypercall``).

A VMM that fails the conversion stops the VM in QEMU (RUN_STATE_INTERNAL_ERROR);
the model hands the VMM's negative result to the guest instead.
"""

from __future__ import annotations

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.virt.kvm.gmem_memslot import KVM_HC_MAP_GPA_RANGE
from kvmpoison.virt.kvm.kvm_main import Vm
from kvmpoison.virt.kvm.memory_attributes import U64_MAX
from kvmpoison.virt.kvm.private_mem import (
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KvmExit,
)

KVM_ENOSYS = 1000
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11
KVM_EINVAL = 22
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0


def kvm_emulate_hypercall_gmem(vm: Vm, nr: int, a0: int = 0, a1: int = 0, a2: int = 0) -> int:
    """The value the guest finds in RAX."""
    state = vm.gmem
    if nr in (KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD):
        return 0  # the PV hypercalls that need no state (PV feature CPUID not enforced)
    if state is None or nr != KVM_HC_MAP_GPA_RANGE:
        return -KVM_ENOSYS
    gpa, npages, attrs = a0 & U64_MAX, a1 & U64_MAX, a2 & U64_MAX
    if not state.user_exit_on_hypercall(KVM_HC_MAP_GPA_RANGE):
        return -KVM_ENOSYS
    gfn = gpa >> PAGE_SHIFT
    if gpa & (PAGE_SIZE - 1) or not npages or gfn + npages > U64_MAX:
        return -KVM_EINVAL
    ex = KvmExit(KVM_EXIT_HYPERCALL, nr=KVM_HC_MAP_GPA_RANGE, args=(gpa, npages, attrs),
                 flags=KVM_EXIT_HYPERCALL_LONG_MODE)
    got = state.exit_to_userspace(ex)
    if got is None:
        return -KVM_ENOSYS  # no VMM run loop: nothing would ever re-enter the guest
    return got if got < 0 else ex.ret  # complete_hypercall_exit: RAX = hypercall.ret
