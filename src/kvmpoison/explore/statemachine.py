"""A hypothesis ``RuleBasedStateMachine`` over one Machine, one class per design.

Every rule is one scenario step (actor, op, arguments), run by the scenario runner's own
``perform``; the monitor checks the invariants after it. A violation raises
:class:`InvariantError` carrying the steps so far, which hypothesis then shrinks; the
shrunk steps are a scenario that ``kvmpoison run`` replays.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import reject
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.explore.monitor import InvariantMonitor
from kvmpoison.machine import Machine
from kvmpoison.matrix import protocol as proto
from kvmpoison.matrix.designs import backing_pfn
from kvmpoison.scenario.loader import Scenario, load_text
from kvmpoison.scenario.ops import OpError, RunCtx
from kvmpoison.scenario.runner import build_machine, perform
from kvmpoison.virt.kvm.kvm_main import Protection

VM = "vm0"
VM2 = "vm1"  # a second VM on the same RAM file (KVM_CREATE_VM + a memslot on vm0's memfd)
# A few gfns, so that steps collide: three private pages and the first swiotlb page (shared
# at boot by the RFC guests and gmem's).
GFNS = (0x30, 0x31, 0x32, 0x10)
MACHINE_MEMORY = 16 << 20
VM_MEMORY = 1 << 20

Recorded = tuple[str, str, dict[str, Any], str]  # actor, op, args, the outcome's cell


class InvariantError(AssertionError):
    def __init__(self, problems: list[str], steps: list[Recorded]):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.steps = steps

    @property
    def invariant(self) -> str:
        return self.problems[0].partition(":")[0]


class ModelError(InvariantError):
    """A step made the model raise (a model bug, not a design's): reported as ``MODEL``."""


def machine_header(design: str, seed: int = 0) -> str:
    """The ``[machine]`` and ``[[vm]]`` tables of every explored (and replayed) machine."""
    return (f"[machine]\nmemory = {MACHINE_MEMORY}\nseed = {seed}\n\n"
            f"[[vm]]\nname = \"{VM}\"\nmemory = {VM_MEMORY}\n")


def base_scenario(design: str) -> Scenario:
    text = (f"[scenario]\nname = \"explore-{design}\"\ndesigns = [\"{design}\"]\n\n"
            + machine_header(design) + "\n[[step]]\nactor = \"guest:vm0\"\nop = \"reboot\"\n")
    return load_text(text, f"<explore {design}>")


GPAS = tuple(gfn << PAGE_SHIFT for gfn in GFNS)
gpas = st.sampled_from(GPAS)
# The host's and the hardware's steps on a frame pick among the gpas a frame backs
# (``pick`` modulo their number): a gpa nothing backs yet could only be refused.
picks = st.integers(0, len(GFNS) - 1)


# Preconditions are named functions, not lambdas: hypothesis describes each one it checks
# (its observability record), and a lambda's description is read from its source.


def vm0_usable(machine: ExploreMachine) -> bool:
    return machine.usable(VM)


def vm1_usable(machine: ExploreMachine) -> bool:
    return machine.usable(VM2)


def gmem_vm0_usable(machine: ExploreMachine) -> bool:
    return machine.gmem and machine.usable(VM)


def a_page_pinned(machine: ExploreMachine) -> bool:
    return bool(machine.ctx.pins) and machine.usable(VM)


def a_frame_backed(machine: ExploreMachine) -> bool:
    return machine.framed()


def no_second_vm_yet(machine: ExploreMachine) -> bool:
    return VM2 not in machine.m.instances and machine.usable(VM)


class ExploreMachine(RuleBasedStateMachine):
    """Subclassed per design by :func:`state_machine` (``design`` and ``checked`` set)."""

    design: ClassVar[str] = "rfc-v1"
    checked: ClassVar[tuple[str, ...]] = ()
    base: ClassVar[Machine | None] = None
    steps_run: ClassVar[int] = 0  # every step the model performed, in every example
    refused: ClassVar[int] = 0  # draws the model refused (no page yet): no step
    found_at: ClassVar[int | None] = None  # steps_run when the first violation was seen

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        self.m = cls.base_machine().copy()
        self.ctx = RunCtx(self.m)
        self.monitor = InvariantMonitor(cls.checked)
        self.trace: list[Recorded] = []
        self._backed: tuple[int, ...] | None = None  # the gpas a frame backs, this step

    @classmethod
    def base_machine(cls) -> Machine:
        """The machine every example copies (built once per class)."""
        if cls.base is None:
            cls.base = build_machine(base_scenario(cls.design), cls.design)
        return cls.base

    @property
    def gmem(self) -> bool:
        return self.m.vm.protection is Protection.GMEM

    def usable(self, name: str) -> bool:
        """The VM exists, its VMM neither exited nor was killed, and a memslot gives it RAM
        (a second VM's can be refused): its steps can run."""
        inst = self.m.instances.get(name)
        return inst is not None and inst.vmm.proc.task.mm is not None \
            and inst.vmm.proc.task.alive and bool(inst.vm.memslots)

    def backed(self) -> tuple[int, ...]:
        """vm0's gpas that a frame backs (once per step: preconditions ask many times)."""
        if self._backed is None:
            inst = self.m.instances[VM]
            found = []
            for gpa in GPAS:
                try:
                    backing_pfn(self.m, gpa, inst.vmm, inst.vm)
                except ValueError:
                    continue
                found.append(gpa)
            self._backed = tuple(found)
        return self._backed

    def framed(self) -> bool:
        return self.usable(VM) and bool(self.backed())

    def step(self, actor: str, op: str, **args: Any) -> None:
        if self.m.kernel.halted is not None:
            return  # the host panicked: every later step would only answer "panic" (no step)
        self._backed = None
        self.monitor.before(self.ctx, actor, op, args)
        try:
            out = perform(self.ctx, actor, op, args)
        except (OpError, ValueError, MemoryError):
            type(self).refused += 1
            return  # not applicable here (no page yet, no pin of it): not a step
        except Exception as exc:  # a model bug: report it with the steps that reach it
            type(self).steps_run += 1
            steps = [*self.trace, (actor, op, args, "raises")]
            self._found()
            raise ModelError([f"MODEL: {type(exc).__name__}: {exc}"], steps) from exc
        type(self).steps_run += 1
        self.trace.append((actor, op, args, out.cell))
        problems = self.monitor.after(self.ctx, actor, op, args, out)
        if problems:
            self._found()
            raise InvariantError(problems, list(self.trace))
        if currently_in_test_context() and (
                self.m.kernel.halted is not None
                or not any(self.usable(name) for name in self.m.instances)):
            # Nothing is left to act on (the host panicked, every VMM is gone): end the
            # example here rather than draw steps the model can only refuse.
            reject()

    def _found(self) -> None:
        cls = type(self)
        if cls.found_at is None:
            cls.found_at = cls.steps_run

    # Hypothesis sorts the rules by their number of arguments, then by name, and its choices
    # favour the first: about one draw in eight, more when others are refused. Every rule
    # takes an argument (``st.just`` where there is nothing to choose, which draws nothing) so
    # that the first is the guest's load; with the reboot first, one step in five to two in
    # five was a reboot, which undid what the steps before it built.

    # -- guest -----------------------------------------------------------------------------

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def guest_load(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "load", gpa=gpa, size=8)

    @precondition(vm0_usable)
    @rule(gpa=gpas, byte=st.integers(1, 255))
    def guest_store(self, gpa: int, byte: int) -> None:
        self.step(f"guest:{VM}", "store", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def guest_share(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "share", gpa=gpa)

    @precondition(gmem_vm0_usable)
    @rule(gpa=gpas)
    def guest_unshare(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "unshare", gpa=gpa)

    @precondition(vm0_usable)
    @rule(vm=st.just(VM))
    def guest_reboot(self, vm: str) -> None:
        self.step(f"guest:{vm}", "reboot")

    # The second VM's guest, once the host has created it on vm0's RAM.
    @precondition(vm1_usable)
    @rule(gpa=gpas, byte=st.integers(1, 255))
    def guest_vm1_store(self, gpa: int, byte: int) -> None:
        self.step(f"guest:{VM2}", "store", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @precondition(vm1_usable)
    @rule(gpa=gpas)
    def guest_vm1_load(self, gpa: int) -> None:
        self.step(f"guest:{VM2}", "load", gpa=gpa, size=8)

    @precondition(vm1_usable)
    @rule(gpa=gpas)
    def guest_vm1_share(self, gpa: int) -> None:
        self.step(f"guest:{VM2}", "share", gpa=gpa)

    # -- the VMM and other host processes: every MATRIX path ---------------------------------

    @precondition(vm0_usable)
    @rule(path=st.sampled_from(proto.LOCAL_PATHS), gpa=gpas)
    def vmm_path(self, path: str, gpa: int) -> None:
        self.step(f"vmm:{VM}", path, gpa=gpa)

    @precondition(vm0_usable)
    @rule(path=st.sampled_from(proto.REMOTE_PATHS), gpa=gpas)
    def host_path(self, path: str, gpa: int) -> None:
        self.step("host", path, target=VM, gpa=gpa)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def vmm_fork_child_load(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "fork_child_load", gpa=gpa)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def vmm_punch_hole(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "punch_hole", gpa=gpa)

    @precondition(vm0_usable)
    @rule(gpa=gpas, advice=st.sampled_from(("dontneed", "pageout", "mergeable")))
    def vmm_madvise(self, gpa: int, advice: str) -> None:
        self.step(f"vmm:{VM}", "madvise", gpa=gpa, advice=advice)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def vmm_munmap(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "munmap", gpa=gpa)

    @precondition(vm0_usable)
    @rule(gpa=gpas, prot=st.sampled_from((0, 1, 3)))
    def vmm_mprotect(self, gpa: int, prot: int) -> None:
        self.step(f"vmm:{VM}", "mprotect", gpa=gpa, prot=prot)

    @precondition(vm0_usable)
    @rule(size=st.sampled_from((GFNS[1] << 12, VM_MEMORY)))
    def vmm_ftruncate(self, size: int) -> None:
        """Shrink the RAM file to cut off gfns 0x31 and above, or grow it back."""
        self.step(f"vmm:{VM}", "ftruncate", size=size)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def vmm_vfio_pin(self, gpa: int) -> None:
        """A device assigned with VFIO pins the page long-term (FOLL_LONGTERM)."""
        self.step(f"vmm:{VM}", "vfio_pin", gpa=gpa)

    # DMA goes through a pinned page: none pinned, nothing to draw.
    @precondition(a_page_pinned)
    @rule(gpa=gpas, byte=st.integers(1, 255))
    def vmm_dma_write(self, gpa: int, byte: int) -> None:
        self.step(f"vmm:{VM}", "dma_write", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @precondition(a_page_pinned)
    @rule(gpa=gpas)
    def vmm_dma_read(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "dma_read", gpa=gpa, size=8)

    # One draw in four exits: an exit ends most of what follows in the example.
    @precondition(vm0_usable)
    @rule(roll=st.integers(0, 3))
    def vmm_exit(self, roll: int) -> None:
        if roll == 0:
            self.step(f"vmm:{VM}", "exit")

    # -- the host kernel and the hardware ---------------------------------------------------

    @precondition(a_frame_backed)
    @rule(pick=picks)
    def host_memory_failure(self, pick: int) -> None:
        gpa = self.backed()[pick % len(self.backed())]
        self.step("host", "memory_failure", vm=VM, gpa=gpa)

    @precondition(a_frame_backed)
    @rule(pick=picks)
    def host_soft_offline(self, pick: int) -> None:
        gpa = self.backed()[pick % len(self.backed())]
        self.step("host", "soft_offline", vm=VM, gpa=gpa)

    @precondition(vm0_usable)
    @rule(gpa=gpas)
    def host_kvm_read(self, gpa: int) -> None:
        self.step("host", "kvm_read", vm=VM, gpa=gpa)

    @rule(actor=st.just("host"))
    def host_ksmd(self, actor: str) -> None:
        """One pass of ksmd over every MADV_MERGEABLE range."""
        self.step(actor, "ksmd")

    @precondition(no_second_vm_yet)
    @rule(name=st.just(VM2))
    def host_second_vm(self, name: str) -> None:
        self.step("host", "new_vm", name=name, memory=VM_MEMORY, share_ram_with=VM)

    @precondition(a_frame_backed)
    @rule(pick=picks)
    def hw_dram_error(self, pick: int) -> None:
        gpa = self.backed()[pick % len(self.backed())]
        self.step("hw", "inject_dram_error", vm=VM, gpa=gpa)

    @precondition(a_frame_backed)
    @rule(pick=picks)
    def hw_tamper(self, pick: int) -> None:
        """A physical attack: a ciphertext bit flipped in DRAM, the MAC left alone."""
        gpa = self.backed()[pick % len(self.backed())]
        self.step("hw", "tamper", vm=VM, gpa=gpa)

    @precondition(a_frame_backed)
    @rule(pick=picks, byte=st.integers(1, 255))
    def host_direct_map_write(self, pick: int, byte: int) -> None:
        """A host write with the wrong KeyID: the kernel's direct map (KeyID 0) over the
        page, as a stray pointer or a hibernation resume would."""
        gpa = self.backed()[pick % len(self.backed())]
        self.step("host", "kernel_write", vm=VM, gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)


_CLASSES: dict[tuple[str, tuple[str, ...]], type[ExploreMachine]] = {}


def state_machine(design: str, invariants: tuple[str, ...]) -> type[ExploreMachine]:
    """The state machine class of ``design`` checking ``invariants`` (one per pair, cached:
    its base machine is built once and copied for every example)."""
    key = (design, invariants)
    cls = _CLASSES.get(key)
    if cls is None:
        name = "Explore_" + design.replace("-", "_")
        cls = type(name, (ExploreMachine,), {"design": design, "checked": invariants,
                                             "base": None, "steps_run": 0, "refused": 0,
                                             "found_at": None})
        _CLASSES[key] = cls
    return cls
