"""Machine: one host (hardware, kernel, KVM) running VMs, each for its own VMM process.

Built from a :class:`~kvmpoison.config.Config`; the same config and the same
steps give the same trace.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

from kvmpoison import statecopy
from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.config import Config
from kvmpoison.designs import Design, design
from kvmpoison.guest.guest import Guest
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.uapi.errno import errno_name
from kvmpoison.virt.kvm.guest_memfd import kvm_gmem_init
from kvmpoison.virt.kvm.hardened import kvm_hardened_free_hook
from kvmpoison.virt.kvm.kvm_main import Kvm, Vm
from kvmpoison.virt.kvm.mem_protected import kvm_unpoison_page_hook
from kvmpoison.vmm.vmm import Vmm

DEFAULT_HOST_MEM = 64 << 20


class VmSetupError(RuntimeError):
    """The VMM could not give its VM guest RAM: KVM_SET_USER_MEMORY_REGION said -errno
    (the hardened design refuses a second VM on a bound file with -EBUSY)."""

    def __init__(self, err: int, vm: Vm, what: str = ""):
        super().__init__(what or f"KVM_SET_USER_MEMORY_REGION failed: -{errno_name(err)}")
        self.errno = err
        self.vm = vm  # created, without guest RAM


def _check_shadow_paging(platform: PlatformConfig) -> None:
    """Refuse a TD with ``ept=0`` (shadow paging) as a bad set-up: TDX requires EPT
    (6.18 ``tdx_bringup``, arch/x86/kvm/vmx/tdx.c, needs the TDP MMU)."""
    if platform.integrity is not IntegrityMode.OFF:
        raise ValueError("tdp = false needs integrity = \"off\": a TD cannot run without EPT "
                         "(TDX requires the TDP MMU)")


# KVM_CREATE_VM of the gmem design's VM without the TDP MMU: a guest_memfd VM with private
# memory is a KVM_X86_SW_PROTECTED_VM, which kvm_is_vm_type_supported (arch/x86/kvm/x86.c,
# 6.18) accepts only with tdp_mmu_enabled.
NO_TDP_GMEM = ("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM) failed: -EINVAL without the TDP MMU "
               "(ept=0)")


@dataclass(frozen=True)
class VmSpec:
    """One VM and its VMM: guest RAM size, backing, and optionally another VM's RAM file."""

    name: str = "vm0"
    memory: int = 4 << 20
    backing: str = "memfd"
    share_ram_with: str | None = None
    fork_of: str | None = None  # the VMM is a fork of another VM's VMM (inherits its mappings)
    thp: bool = False  # anonymous guest RAM, 2 MiB-aligned, MADV_HUGEPAGE (QEMU's THP case)


@dataclass(eq=False)
class Instance:
    spec: VmSpec
    vmm: Vmm
    vm: Vm
    guest: Guest


class Machine:
    def __init__(self, config: Config | None = None, vms: list[VmSpec] | None = None,
                 kvm_id_bits: int = 63):
        self.config = config = config or Config()
        self.design: Design = design(config.design)
        kcfg = config.kernel if config.kernel is not None else self.design.kernel
        floor = self.design.kernel_floor
        if floor is not None and kcfg.version < floor:
            raise ValueError(f"design {self.design.name} needs kernel {floor.value} or later "
                             f"(PTE markers), not {kcfg.version.value}")
        self.platform = config.platform or PlatformConfig(mem_bytes=DEFAULT_HOST_MEM,
                                                          integrity=config.integrity,
                                                          seed=config.seed)
        self.kernel = Kernel.boot(kcfg, self.platform, config.seed)
        if config.thp is not None:
            self.kernel.core.thp = config.thp
        kvm_gmem_init(self.kernel)
        core = self.kernel.core
        core.hooks = self.design.hooks()
        if not config.tdp:
            _check_shadow_paging(self.platform)
        self.kvm = Kvm(core, id_bits=kvm_id_bits, tdp_enabled=config.tdp)
        if self.design.unpoison_on_free:
            core.buddy.free_pages_prepare_hooks.append(kvm_unpoison_page_hook(self.kvm))
        if self.design.scrub_on_free:
            core.buddy.free_pages_prepare_hooks.append(kvm_hardened_free_hook(self.kvm))
        self.instances: dict[str, Instance] = {}
        for spec in vms or [VmSpec(memory=config.vm_mem, backing=config.backing)]:
            try:
                self.add_vm(spec)
            except VmSetupError as failed:
                if not failed.vm.create_error:
                    raise
                # KVM refused to create the VM (gmem with ept=0): the VMM process stays,
                # and every guest step of the VM shows the refusal (scenario/ops.py).

    # The first VM, for the common one-VM case.
    @property
    def vmm(self) -> Vmm:
        return next(iter(self.instances.values())).vmm

    @property
    def vm(self) -> Vm:
        return next(iter(self.instances.values())).vm

    @property
    def guest(self) -> Guest:
        return next(iter(self.instances.values())).guest

    def add_vm(self, spec: VmSpec) -> Instance:
        """Start a VMM, create its VM, boot the guest."""
        if spec.name in self.instances:
            raise ValueError(f"a VM named {spec.name!r} already exists")
        vmm = self._start_vmm(spec)
        try:
            vm = self.new_vm(vmm)
        except VmSetupError as failed:
            # The VMM process lives on with the RAM file mapped, its VM without guest RAM
            # (QEMU would give up; the model keeps the process for the steps that follow).
            self.instances[spec.name] = Instance(spec, vmm, failed.vm, Guest(failed.vm))
            raise
        guest = Guest(vm)
        guest.boot()
        inst = Instance(spec, vmm, vm, guest)
        self.instances[spec.name] = inst
        return inst

    def _start_vmm(self, spec: VmSpec) -> Vmm:
        if spec.fork_of is not None:
            parent = self.instances.get(spec.fork_of)
            if parent is None:
                raise ValueError(f"fork_of names no VM: {spec.fork_of!r}")
            return Vmm.fork(parent.vmm)
        if spec.share_ram_with is not None:
            other = self.instances.get(spec.share_ram_with)
            if other is None:
                raise ValueError(f"share_ram_with names no VM: {spec.share_ram_with!r}")
            if other.vmm.ram_fd not in other.vmm.proc.task.fds:
                # The file is passed on from the VMM's fd: one that exited has none.
                raise ValueError(f"share_ram_with: the VMM of {spec.share_ram_with!r} has "
                                 "exited, its RAM file is closed")
            return Vmm.share(Process.spawn(self.kernel, f"qemu-{spec.name}"), other.vmm)
        proc = Process.spawn(self.kernel, f"qemu-{spec.name}")
        return Vmm.start(proc, spec.memory, spec.backing, spec.thp)

    def destroy_vm(self, name: str) -> None:
        """The VMM exits: its mm goes (MMU notifier release), the VM is dead."""
        inst = self.instances[name]
        self.kernel.exit(inst.vmm.proc.task)

    def new_vm(self, vmm: Vmm) -> Vm:
        td_keyid = None
        if self.platform.integrity is not IntegrityMode.OFF:
            space = self.platform.keyids
            td_keyid = space.private_range.start + 1 + len(self.kvm.vms)  # [0] is the TDX global
            self.kernel.core.hw.keys.program_key(td_keyid)
        vm = self.kvm.create_vm(vmm.proc.task, self.design.protection, td_keyid)
        if vm.gmem is not None and not self.kvm.tdp_enabled:
            vm.create_error = errno.EINVAL  # the model keeps the Vm object to report it
            vm.dead = True
            raise VmSetupError(errno.EINVAL, vm, NO_TDP_GMEM)
        if vm.gmem is not None:  # guest_memfd for private RAM, KVM_SET_USER_MEMORY_REGION2
            ret = vmm.setup_private_memory(vm)
        else:
            ret = vm.set_user_memory_region(0, 0, vmm.ram_size, vmm.ram_hva)
        if ret:
            raise VmSetupError(-ret, vm)
        return vm

    def process(self, comm: str = "proc") -> Process:
        """Another host process (an attacker, a helper)."""
        return Process.spawn(self.kernel, comm)

    @property
    def halted(self) -> bool:
        return self.kernel.halted is not None

    def copy(self) -> Machine:
        """An independent copy of this machine: every layer's state, nothing shared.

        A deep copy; the big arrays copy only what is in use (frame slots handed
        out, page-table rows ever used), and key caches start empty.
        """
        memo: dict[int, object] = {}
        # random.Random deep-copies its 625-word state one int at a time; copy it whole.
        rng = self.kernel.rng
        twin = random.Random(0)  # seeded cheaply, then given the state
        twin.setstate(rng.getstate())
        memo[id(rng)] = twin
        return statecopy.deepcopy(self, memo)

    def snapshot(self) -> Machine:
        """The state to :meth:`restore` later (a copy: the machine runs on unchanged)."""
        return self.copy()

    def restore(self, snapshot: Machine) -> None:
        """Go back to ``snapshot`` (which stays reusable). Every layer is replaced, so
        references taken into this machine before (``m.vmm``, a process) go stale."""
        self.__dict__.clear()
        self.__dict__.update(snapshot.copy().__dict__)
