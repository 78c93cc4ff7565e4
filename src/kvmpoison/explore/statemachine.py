"""A hypothesis ``RuleBasedStateMachine`` over one Machine, one class per design.

Every rule is one scenario step (actor, op, arguments), run by the scenario runner's own
``perform``; the monitor checks the invariants after it. A violation raises
:class:`InvariantError` carrying the steps so far, which hypothesis then shrinks; the
shrunk steps are a scenario that ``kvmpoison run`` replays.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from kvmpoison.explore.monitor import InvariantMonitor
from kvmpoison.machine import Machine
from kvmpoison.matrix import protocol as proto
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


gpas = st.sampled_from(GFNS).map(lambda gfn: gfn << 12)


class ExploreMachine(RuleBasedStateMachine):
    """Subclassed per design by :func:`state_machine` (``design`` and ``checked`` set)."""

    design: ClassVar[str] = "rfc-v1"
    checked: ClassVar[tuple[str, ...]] = ()
    base: ClassVar[Machine | None] = None
    steps_run: ClassVar[int] = 0  # every step of every example, for steps/s
    found_at: ClassVar[int | None] = None  # steps_run when the first violation was seen

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        if cls.base is None:
            cls.base = build_machine(base_scenario(cls.design), cls.design)
        self.m = cls.base.copy()
        self.ctx = RunCtx(self.m)
        self.monitor = InvariantMonitor(cls.checked)
        self.trace: list[Recorded] = []

    @property
    def gmem(self) -> bool:
        return self.m.vm.protection is Protection.GMEM

    def step(self, actor: str, op: str, **args: Any) -> None:
        if self.m.kernel.halted is not None:
            return  # the host panicked: every later step would only answer "panic" (no step)
        type(self).steps_run += 1
        self.monitor.before(self.ctx, actor, op, args)
        try:
            out = perform(self.ctx, actor, op, args)
        except (OpError, ValueError, MemoryError):
            self.monitor.forget()
            return  # not applicable here (no page yet, the VMM is gone): not a step
        except Exception as exc:  # a model bug: report it with the steps that reach it
            steps = [*self.trace, (actor, op, args, "raises")]
            self._found()
            raise ModelError([f"MODEL: {type(exc).__name__}: {exc}"], steps) from exc
        self.trace.append((actor, op, args, out.cell))
        problems = self.monitor.after(self.ctx, actor, op, args, out)
        if problems:
            self._found()
            raise InvariantError(problems, list(self.trace))

    def _found(self) -> None:
        cls = type(self)
        if cls.found_at is None:
            cls.found_at = cls.steps_run

    # -- guest -----------------------------------------------------------------------------

    @rule(gpa=gpas, byte=st.integers(1, 255))
    def guest_store(self, gpa: int, byte: int) -> None:
        self.step(f"guest:{VM}", "store", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @rule(gpa=gpas)
    def guest_load(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "load", gpa=gpa, size=8)

    @rule(gpa=gpas)
    def guest_share(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "share", gpa=gpa)

    @precondition(lambda self: self.gmem)
    @rule(gpa=gpas)
    def guest_unshare(self, gpa: int) -> None:
        self.step(f"guest:{VM}", "unshare", gpa=gpa)

    @rule()
    def guest_reboot(self) -> None:
        self.step(f"guest:{VM}", "reboot")

    # The second VM's guest, once the host has created it on vm0's RAM.
    @precondition(lambda self: VM2 in self.m.instances)
    @rule(gpa=gpas, byte=st.integers(1, 255))
    def guest2_store(self, gpa: int, byte: int) -> None:
        self.step(f"guest:{VM2}", "store", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @precondition(lambda self: VM2 in self.m.instances)
    @rule(gpa=gpas)
    def guest2_load(self, gpa: int) -> None:
        self.step(f"guest:{VM2}", "load", gpa=gpa, size=8)

    @precondition(lambda self: VM2 in self.m.instances)
    @rule(gpa=gpas)
    def guest2_share(self, gpa: int) -> None:
        self.step(f"guest:{VM2}", "share", gpa=gpa)

    # -- the VMM and other host processes: every MATRIX path ---------------------------------

    @rule(path=st.sampled_from(proto.LOCAL_PATHS), gpa=gpas)
    def vmm_path(self, path: str, gpa: int) -> None:
        self.step(f"vmm:{VM}", path, gpa=gpa)

    @rule(path=st.sampled_from(proto.REMOTE_PATHS), gpa=gpas)
    def host_path(self, path: str, gpa: int) -> None:
        self.step("host", path, target=VM, gpa=gpa)

    @rule(gpa=gpas)
    def vmm_fork_child_load(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "fork_child_load", gpa=gpa)

    @rule(gpa=gpas)
    def vmm_punch_hole(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "punch_hole", gpa=gpa)

    @rule(gpa=gpas, advice=st.sampled_from(("dontneed", "pageout", "mergeable")))
    def vmm_madvise(self, gpa: int, advice: str) -> None:
        self.step(f"vmm:{VM}", "madvise", gpa=gpa, advice=advice)

    @rule(gpa=gpas)
    def vmm_munmap(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "munmap", gpa=gpa)

    @rule(gpa=gpas, prot=st.sampled_from((0, 1, 3)))
    def vmm_mprotect(self, gpa: int, prot: int) -> None:
        self.step(f"vmm:{VM}", "mprotect", gpa=gpa, prot=prot)

    @rule(size=st.sampled_from((GFNS[1] << 12, VM_MEMORY)))
    def vmm_ftruncate(self, size: int) -> None:
        """Shrink the RAM file to cut off gfns 0x31 and above, or grow it back."""
        self.step(f"vmm:{VM}", "ftruncate", size=size)

    @rule(gpa=gpas)
    def vmm_vfio_pin(self, gpa: int) -> None:
        """A device assigned with VFIO pins the page long-term (FOLL_LONGTERM)."""
        self.step(f"vmm:{VM}", "vfio_pin", gpa=gpa)

    @rule(gpa=gpas, byte=st.integers(1, 255))
    def vmm_dma_write(self, gpa: int, byte: int) -> None:
        self.step(f"vmm:{VM}", "dma_write", gpa=gpa, data="hex:" + bytes([byte]).hex() * 8)

    @rule(gpa=gpas)
    def vmm_dma_read(self, gpa: int) -> None:
        self.step(f"vmm:{VM}", "dma_read", gpa=gpa, size=8)

    # One draw in four exits: an exit ends most of what follows in the example.
    @rule(roll=st.integers(0, 3))
    def vmm_exit(self, roll: int) -> None:
        if roll == 0:
            self.step(f"vmm:{VM}", "exit")

    # -- the host kernel and the hardware ---------------------------------------------------

    @rule(gpa=gpas)
    def host_memory_failure(self, gpa: int) -> None:
        self.step("host", "memory_failure", vm=VM, gpa=gpa)

    @rule(gpa=gpas)
    def host_soft_offline(self, gpa: int) -> None:
        self.step("host", "soft_offline", vm=VM, gpa=gpa)

    @rule(gpa=gpas)
    def host_kvm_read(self, gpa: int) -> None:
        self.step("host", "kvm_read", vm=VM, gpa=gpa)

    @rule()
    def host_ksmd(self) -> None:
        """One pass of ksmd over every MADV_MERGEABLE range."""
        self.step("host", "ksmd")

    @precondition(lambda self: VM2 not in self.m.instances)
    @rule()
    def host_second_vm(self) -> None:
        self.step("host", "new_vm", name=VM2, memory=VM_MEMORY, share_ram_with=VM)

    @rule(gpa=gpas)
    def hw_dram_error(self, gpa: int) -> None:
        self.step("hw", "inject_dram_error", vm=VM, gpa=gpa)

    @rule(gpa=gpas)
    def hw_tamper(self, gpa: int) -> None:
        """A physical attack: a ciphertext bit flipped in DRAM, the MAC left alone."""
        self.step("hw", "tamper", vm=VM, gpa=gpa)

    @rule(gpa=gpas, byte=st.integers(1, 255))
    def host_direct_map_write(self, gpa: int, byte: int) -> None:
        """A host write with the wrong KeyID: the kernel's direct map (KeyID 0) over the
        page, as a stray pointer or a hibernation resume would."""
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
                                             "base": None, "steps_run": 0, "found_at": None})
        _CLASSES[key] = cls
    return cls
