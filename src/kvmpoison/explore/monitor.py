"""The invariant monitor: checks the named invariants around every scenario step.

The explorer and ``kvmpoison run`` (a scenario with ``[scenario] invariants``) use the same
monitor, so a violation the explorer writes out fails the same way when it is replayed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.explore.invariants import (
    INVARIANTS,
    PINS,
    STATE_CHECKS,
    Cache,
    ViewSource,
    check_i2,
    check_i6,
    guest_private_mask,
    intrusions,
    seen_poison,
    view_of,
    view_source,
    view_sources,
    vmm_pfns,
)
from kvmpoison.machine import Instance
from kvmpoison.matrix import protocol as proto
from kvmpoison.outcome import Outcome
from kvmpoison.scenario.loader import Scenario, ScenarioError
from kvmpoison.scenario.ops import RunCtx, data_arg
from kvmpoison.virt.kvm.kvm_main import Protection

# Host paths that move data to or from the page at the address (straddling ones are left
# out: they succeed short on the page before); mincore, mlock, futex and populate do not.
DATA_PATHS = frozenset({
    "load", "store", "read_pipe_to_buf", "write_buf_to_pipe", "pread_file_to_buf",
    "pwrite_buf_to_file", "odirect_pread", "odirect_pwrite", "vmsplice_buf_to_pipe",
    "vmsplice_pipe_to_buf", "proc_self_mem_read", "proc_self_mem_write", "getrandom",
    "process_vm_readv", "process_vm_writev", "proc_pid_mem_read", "proc_pid_mem_write",
    "ptrace_peek", "ptrace_poke", "fork_child_load",
})
assert {*proto.PATHS, "fork_child_load"} >= DATA_PATHS

# Tampering: a physical attack, and a host write with the wrong KeyID through the kernel's
# direct map (E29: every design keeps it). No design can stop either from reaching a line,
# so I2 leaves them out; what integrity owes the guest is that it never reads the damage
# as data (I3).
TAMPERING = frozenset({("hw", "tamper"), ("host", "kernel_write")})

Shadow = tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]


def _vm_name(actor: str, args: dict[str, Any]) -> str:
    name = args.get("target") or args.get("vm") or actor.partition(":")[2]
    return str(name).removeprefix("vmm:").removeprefix("guest:")


class InvariantMonitor:
    """Checks ``names`` after every step; keeps the shadow of guest writes that I3 needs."""

    def __init__(self, names: tuple[str, ...]):
        unknown = [n for n in names if n not in INVARIANTS]
        if unknown:
            raise ValueError(f"unknown invariant {', '.join(unknown)} "
                             f"(known: {', '.join(INVARIANTS)})")
        self.names = names
        self.shadow: dict[tuple[str, int], Shadow] = {}
        self._probe: tuple[str, int, int] | None = None  # (vm, gfn, private pfn) for I7
        self.seen_poison: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)  # for I6
        # Before the step, for I2: the intrusions, and what the private pages were made of.
        self._i2: tuple[dict[int, int], list[ViewSource]] | None = None
        self._conversions: dict[str, int] = {}  # per VM, its guest's conversions so far
        self._logs = (0, 0)  # memory_failure's reports and the #MC log before the step (I6)

    # -- around a step ---------------------------------------------------------------------

    def _inst(self, ctx: RunCtx, actor: str, args: dict[str, Any]) -> Instance | None:
        inst = ctx.machine.instances.get(_vm_name(actor, args))
        if inst is None or inst.vmm.proc.task.mm is None:
            return None
        return inst

    def before(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any]) -> None:
        self._probe = None
        self._i2 = None
        core = ctx.machine.kernel.core
        self._logs = (len(core.mf_reports), len(core.mce_log))
        self._conversions = {name: len(inst.guest.conversions)
                             for name, inst in ctx.machine.instances.items()}
        if "I2" in self.names and (actor.partition(":")[0], op) not in TAMPERING:
            self._i2 = (intrusions(ctx.machine), view_sources(ctx.machine))
        gpa = args.get("gpa")
        if "I7" not in self.names or op not in DATA_PATHS or actor.startswith("guest") \
                or not isinstance(gpa, int):
            return
        inst = self._inst(ctx, actor, args)
        if inst is None or not 0 <= gpa < inst.vmm.ram_size:
            return
        v = view_of(view_source(inst, copy=False, gfn=gpa >> PAGE_SHIFT))  # that gfn's
        if len(v.gfns) and v.private[0]:
            self._probe = (inst.spec.name, gpa >> PAGE_SHIFT, int(v.pfns[0]))

    def after(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any],
              out: Outcome) -> list[str]:
        found: list[str] = []
        cache: Cache = {PINS: tuple(ctx.pins.values())}
        if actor.startswith("guest"):
            found += self._guest_step(ctx, actor, op, args, out)
        if self._probe is not None and out.succeeded:
            found += self._reached(ctx, op, out)
        if ctx.machine.kernel.halted is not None:
            # A panicked host stopped mid-operation (a pin still held, a lock still taken):
            # its state is no kernel's, so no state invariant applies.
            return found
        for name in self.names:
            check = STATE_CHECKS.get(name)
            if check is None:
                continue
            problem = check(ctx.machine, cache)
            if problem is not None:
                found.append(problem)
        if self._i2 is not None:
            problem = check_i2(ctx.machine, *self._i2, cache)
            if problem is not None:
                found.append(problem)
        if "I6" in self.names:
            problem = check_i6(ctx.machine, self.seen_poison)
            if problem is not None:
                found.append(problem)
            seen = seen_poison(ctx.machine, *self._logs)
            if len(seen):
                self.seen_poison = np.union1d(self.seen_poison, seen)
        return found

    # -- I3: the shadow of guest writes ----------------------------------------------------

    def _guest_step(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any],
                    out: Outcome) -> list[str]:
        inst = self._inst(ctx, actor, args)
        if inst is None:
            return []
        name = inst.spec.name
        # Every conversion the step made (a share or unshare, or the ones a reboot's boot
        # makes: the hardened guest accepts all RAM afresh) ends what I3 knows of those
        # gfns: shared data is the VMM's to change, and a gfn accepted afresh starts anew.
        # The shadow is sparse, so walk its keys.
        for lo, hi in inst.guest.conversions[self._conversions.get(name, 0):]:
            for key in [k for k in self.shadow if k[0] == name and lo <= k[1] < hi]:
                del self.shadow[key]
        if op in ("share", "unshare"):
            return []
        gpa = args.get("gpa")
        if op not in ("load", "store") or not isinstance(gpa, int) or not out.succeeded:
            return []
        gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
        private = guest_private_one(inst, gfn)
        if op == "store":
            data = np.frombuffer(data_arg(args), dtype=np.uint8)[: PAGE_SIZE - off]
            if not private:
                self.shadow.pop((name, gfn), None)
                return []
            shadow = self.shadow.get((name, gfn))
            if shadow is None:
                shadow = self.shadow[name, gfn] = (np.zeros(PAGE_SIZE, dtype=np.uint8),
                                                   np.zeros(PAGE_SIZE, dtype=np.bool_))
            page, known = shadow
            page[off : off + len(data)] = data
            known[off : off + len(data)] = True
            return []
        entry = self.shadow.get((name, gfn))
        if "I3" not in self.names or not private or entry is None or out.data is None:
            return []
        got = np.frombuffer(out.data, dtype=np.uint8)[: PAGE_SIZE - off]
        page, known = entry
        want, mask = page[off : off + len(got)], known[off : off + len(got)]
        if (got[mask] != want[mask]).any():
            return [f"I3: the guest of {name} read {bytes(got).hex()} at gpa {gpa:#x}, "
                    f"but last wrote {bytes(want).hex()} there (known bytes differ)"]
        return []

    # -- I7: a private gfn's page reached by the host ----------------------------------------

    def _reached(self, ctx: RunCtx, op: str, out: Outcome) -> list[str]:
        assert self._probe is not None
        name, gfn, pfn = self._probe
        if "I7" not in self.names:
            return []
        inst = ctx.machine.instances[name]
        vmm = inst.vmm
        page: int | None = None
        if vmm.ram_fd is not None and vmm.proc.task.mm is not None:
            mapping = vmm.proc.task.fds[vmm.ram_fd].f_mapping
            page = mapping.lookup(gfn) if mapping is not None else None
        if page is None:
            mapped = vmm_pfns(inst)
            page = int(mapped[gfn]) if gfn < len(mapped) and mapped[gfn] >= 0 else None
        if page == pfn:
            return [f"I7: {op} by the host at private gfn {gfn:#x} of {name} succeeded "
                    f"({out.cell}) on the guest's private page pfn {pfn:#x}"]
        return []


def scenario_monitor(sc: Scenario) -> InvariantMonitor | None:
    """The monitor of a scenario's ``[scenario] invariants`` (None if it names none), as
    ``kvmpoison run`` checks them. ScenarioError if it names an unknown invariant."""
    if not sc.invariants:
        return None
    try:
        return InvariantMonitor(sc.invariants)
    except ValueError as exc:
        raise ScenarioError(sc.source, f"[scenario] invariants: {exc}") from None


def guest_private_one(inst: Instance, gfn: int) -> bool:
    """:func:`guest_private_mask` of one gfn (outside gmem: a test per shared range, in
    Python, as numpy's per-call cost is all a one-element array would pay)."""
    if inst.vm.protection is Protection.GMEM:
        return bool(guest_private_mask(inst, np.array([gfn], dtype=np.int64))[0])
    return not any(lo <= gfn < hi for lo, hi in inst.guest.shared)
