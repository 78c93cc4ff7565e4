"""A second live referee: Debian's Linux 6.1 (CONFIG_MEMORY_FAILURE=y) booted under QEMU.

One concept per module: :mod:`.package` fetches the kernel package,
:mod:`.kmod` picks the modules it needs, :mod:`.initramfs` builds the
busybox initramfs, :mod:`.cache` keeps all of it under the user's cache
directory, :mod:`.qemu` boots it, and :mod:`.guest` is the runner that runs
inside the guest: it imports the probes of ``backends.kvm`` (one
implementation of the probes) and prints framed results on the serial console.

Independent of the model: nothing here imports ``mm`` or ``virt``.
"""

from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError

__all__ = ["VmKernelUnavailableError"]
