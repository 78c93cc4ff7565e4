"""What a VM with private memory (6.18) adds to ``struct kvm``, and its exits to userspace.

The fields follow ``include/linux/kvm_host.h`` and ``arch/x86/include/asm/kvm_host.h``
(v6.18): ``mem_attr_array`` (per-gfn attributes), ``arch.hypercall_exit_enabled``
(KVM_CAP_EXIT_HYPERCALL), ``arch.has_private_mem``. The exits are the parts
of ``struct kvm_run`` (include/uapi/linux/kvm.h) that KVM_EXIT_HYPERCALL and
KVM_EXIT_MEMORY_FAULT fill in.

The model runs a vCPU synchronously: where KVM_RUN would return to the VMM,
KVM calls the VMM's exit handler (``userspace``, the VMM's run loop) and,
when it returns 0, re-enters the guest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmpoison.virt.kvm.memory_attributes import MemAttrArray

KVM_EXIT_HYPERCALL = 3
KVM_EXIT_MEMORY_FAULT = 39
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
KVM_CAP_EXIT_HYPERCALL = 201


@dataclass
class KvmExit:
    """The ``struct kvm_run`` fields of one exit (``hypercall`` or ``memory_fault``)."""

    exit_reason: int
    nr: int = 0  # hypercall.nr
    args: tuple[int, ...] = ()  # hypercall.args[0..2]
    ret: int = 0  # hypercall.ret, written by the VMM
    flags: int = 0  # hypercall.flags or memory_fault.flags
    gpa: int = 0  # memory_fault.gpa
    size: int = 0  # memory_fault.size

    def describe(self) -> str:
        if self.exit_reason == KVM_EXIT_MEMORY_FAULT:
            kind = "PRIVATE" if self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else "shared"
            return f"KVM_EXIT_MEMORY_FAULT gpa={self.gpa:#x} size={self.size:#x} {kind}"
        return f"KVM_EXIT_HYPERCALL nr={self.nr} args={[hex(a) for a in self.args]}"


ExitHandler = Callable[[KvmExit], int]


@dataclass(eq=False)
class GmemVm:
    """The private-memory state of one VM (a VM type with ``kvm_arch_has_private_mem``)."""

    mem_attr_array: MemAttrArray = field(default_factory=MemAttrArray)
    has_private_mem: bool = True
    hypercall_exit_enabled: int = 0  # bit n: hypercall n exits to userspace
    userspace: ExitHandler | None = None  # the VMM's KVM_RUN loop
    exits: list[KvmExit] = field(default_factory=list)  # every exit, in order

    def user_exit_on_hypercall(self, nr: int) -> bool:
        return bool(self.hypercall_exit_enabled & (1 << nr))

    def exit_to_userspace(self, ex: KvmExit) -> int | None:
        """KVM_RUN returns to the VMM; its handler's result, or None with no VMM loop."""
        self.exits.append(ex)
        if self.userspace is None:
            return None
        return self.userspace(ex)
