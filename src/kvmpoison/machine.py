"""Machine: one host (hardware, kernel, KVM) running one VM for a VMM process.

Built from a :class:`~kvmpoison.config.Config`; the same config and the same
steps give the same trace.
"""

from __future__ import annotations

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.config import Config
from kvmpoison.designs import Design, design
from kvmpoison.guest.guest import Guest
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.virt.kvm.kvm_main import Kvm, Vm
from kvmpoison.virt.kvm.mem_protected import kvm_unpoison_page_hook
from kvmpoison.vmm.vmm import Vmm

DEFAULT_HOST_MEM = 64 << 20


class Machine:
    def __init__(self, config: Config | None = None):
        self.config = config = config or Config()
        self.design: Design = design(config.design)
        kcfg = config.kernel if config.kernel is not None else self.design.kernel
        self.platform = config.platform or PlatformConfig(mem_bytes=DEFAULT_HOST_MEM,
                                                          integrity=self.design.integrity,
                                                          seed=config.seed)
        self.kernel = Kernel.boot(kcfg, self.platform, config.seed)
        core = self.kernel.core
        core.hooks = self.design.hooks()
        self.kvm = Kvm(core)
        if self.design.unpoison_on_free:
            core.buddy.free_pages_prepare_hooks.append(kvm_unpoison_page_hook(self.kvm))
        self.vmm = Vmm.start(Process.spawn(self.kernel, "qemu"), config.vm_mem, config.backing)
        self.vm: Vm = self.new_vm(self.vmm)
        self.guest = Guest(self.vm)
        self.guest.boot()

    def new_vm(self, vmm: Vmm) -> Vm:
        td_keyid = None
        if self.platform.integrity is not IntegrityMode.OFF:
            space = self.platform.keyids
            td_keyid = space.private_range.start + 1 + len(self.kvm.vms)  # [0] is the TDX global
            self.kernel.core.hw.keys.program_key(td_keyid)
        vm = self.kvm.create_vm(vmm.proc.task, self.design.protection, td_keyid)
        ret = vm.set_user_memory_region(0, 0, vmm.ram_size, vmm.ram_hva)
        if ret:
            raise RuntimeError(f"KVM_SET_USER_MEMORY_REGION failed: {ret}")
        return vm

    def process(self, comm: str = "proc") -> Process:
        """Another host process (an attacker, a helper)."""
        return Process.spawn(self.kernel, comm)

    @property
    def halted(self) -> bool:
        return self.kernel.halted is not None
