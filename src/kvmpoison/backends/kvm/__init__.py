"""The real kernel: pure-Python KVM (with guest_memfd) and the oracle probes.

Independent of the model: nothing here imports ``mm`` or ``virt``.
"""

from kvmpoison.backends.kvm.errors import KvmError
from kvmpoison.backends.kvm.system import GuestMemfd, Kvm, VcpuFd, VmFd

__all__ = ["GuestMemfd", "Kvm", "KvmError", "VcpuFd", "VmFd"]
