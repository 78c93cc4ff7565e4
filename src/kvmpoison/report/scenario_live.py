"""A scenario refereed by the running kernel (``kvmpoison run --live``).

The model runs the scenario on the referee design configured like the running
kernel (version from ``uname``, CONFIG_* switches from its config, as the
oracle does); :func:`kvmpoison.backends.kvm.live.run_live` runs the same steps
on /dev/kvm; each step's cells are compared.

A step is *not refereed* when it has no live counterpart (the RFC's hypercalls,
injected hardware faults, host actions the tool must not do on a real host),
when the live kernel could not serve it (an MMIO exit of the emulator), or when
an earlier step that changed state was not run live, since from there on the
two sides no longer start from the same state. Such steps are counted, never
taken as agreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.backends.kvm.live import LiveError, run_live
from kvmpoison.kconfig import KernelConfig, host_kernel_config
from kvmpoison.matrix import protocol as proto
from kvmpoison.matrix.protocol import uffd_msgs_relative
from kvmpoison.mm.madvise import MADV_HWPOISON, MADV_PAGEOUT
from kvmpoison.outcome import Kind
from kvmpoison.scenario.loader import CONFIG_SWITCHES, Scenario, ScenarioError, Step
from kvmpoison.scenario.ops import (
    ADVICE,
    FILE_OPS,
    REF_ARGS,
    UFFD_OPS,
    OpError,
    _access_size,
    _int,
    _u64,
    call_args,
    data_arg,
    parse_ref,
    uffd_call_args,
)
from kvmpoison.scenario.runner import ScenarioRun, StepResult, run_scenario
from kvmpoison.scenario.units import VM_MEMORY_MAX, parse_size

REFEREE_DESIGN = "baseline"  # the unmodified upstream kernel: what /dev/kvm runs
MADV_SOFT_OFFLINE = 101

# Steps with no live counterpart, and why.
_HOST_MEMORY = "would change host memory state (a page out of service); never on a real host"
NOT_LIVE: dict[tuple[str, str], str] = {
    ("guest", "share"): "an RFC hypercall (KVM_HC_MEM_SHARE): upstream KVM has none",
    ("guest", "hypercall"): "an RFC hypercall: the live vCPU runs no RFC guest",
    ("guest", "reboot"): "a guest reboot of the RFC's guest model",
    ("vmm", "exit"): "the live VMMs are one process that runs the rest of the scenario",
    ("vmm", "vfio_pin"): "needs a VFIO device",
    ("vmm", "dma_read"): "needs a VFIO device",
    ("vmm", "dma_write"): "needs a VFIO device",
    ("host", "memory_failure"): f"memory_failure {_HOST_MEMORY}",
    ("host", "soft_offline"): f"soft_offline {_HOST_MEMORY}",
    ("host", "offline_pages"): f"memory offline {_HOST_MEMORY}",
    ("host", "alloc_contig_range"): f"a contiguous allocation {_HOST_MEMORY}",
    ("vmm", "move_pages"): "the live run does not call move_pages",
    ("vmm", "open"): "/dev/mem maps physical memory of this host: never on a real host",
    ("host", "unpoison"): "unpoison needs a page this tool poisoned",
    ("host", "real_memory_error_then_free"): f"an injected memory error {_HOST_MEMORY}",
    ("host", "ksmd"): "ksmd is the host's own thread: the tool does not drive its scans",
    ("host", "khugepaged_scan"): "khugepaged is the host's own thread: the tool does not "
                                 "drive its scans",
    ("host", "deferred_split_scan"): "the deferred-split shrinker runs under the host's memory "
                                     "pressure: the tool does not drive it",
    ("host", "fail_xa_store"): "fault injection into the RFC's kvm_pfn_map",
    ("host", "kvm_read"): "KVM's own access to guest memory has no ioctl of its own",
    ("host", "kvm_write"): "KVM's own access to guest memory has no ioctl of its own",
    ("host", "kernel_read"): "a host kernel access through the direct map",
    ("host", "kernel_write"): "a host kernel write through the direct map",
    ("host", "core_dump_page"): "the live run takes no core dump",
    ("hw", "inject_dram_error"): "an injected hardware fault",
    ("hw", "tamper"): "an injected hardware fault",
    ("hw", "seam_read"): "the TDX module is not on this host",
}
# Of those, the ones that change nothing the later steps see.
READS_ONLY = {("host", "kvm_read"), ("host", "kernel_read"), ("host", "core_dump_page"),
              ("host", "offline_pages"), ("host", "alloc_contig_range"), ("vmm", "move_pages"),
              ("hw", "seam_read"), ("guest", "load")}


@dataclass
class RefereedStep:
    step: Step
    model: str
    live: str | None  # None: not refereed
    verdict: str  # "agree", "DISAGREE" or "not refereed"
    reason: str = ""


@dataclass
class LiveRun:
    scenario: Scenario
    design: str
    kernel: str
    steps: list[RefereedStep] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(1 for s in self.steps if s.verdict == verdict)

    @property
    def refereed(self) -> int:
        return self.count("agree") + self.count("DISAGREE")

    @property
    def not_refereed(self) -> int:
        return self.count("not refereed")

    @property
    def disagreements(self) -> list[RefereedStep]:
        return [s for s in self.steps if s.verdict == "DISAGREE"]


def referee_scenario(sc: Scenario, kcfg: KernelConfig) -> Scenario:
    """The scenario with [machine] set like this host: the running kernel's version and
    switches, no TDX (plain memory: the VMM reads what the guest wrote), and the host's
    two-dimensional paging setting (``[machine] tdp``)."""
    machine = dataclasses.replace(sc.machine, kernel=kcfg.version, integrity=IntegrityMode.OFF,
                                  config={n: getattr(kcfg, n) for n in CONFIG_SWITCHES},
                                  tdp=host_tdp_enabled())
    return dataclasses.replace(sc, machine=machine)


def host_tdp_enabled(params: tuple[str, ...] = ("/sys/module/kvm_intel/parameters/ept",
                                               "/sys/module/kvm_amd/parameters/npt")) -> bool:
    """Whether this host's KVM uses two-dimensional paging: kvm_intel's ``ept`` or
    kvm_amd's ``npt`` is Y (or 1). Neither loaded (this project's machine runs the
    shadow-paging kvm_pvm) or N: shadow paging, as ``[machine] tdp = false``."""
    for path in params:
        try:
            with open(path) as fh:
                return fh.read().strip() in ("Y", "1")
        except OSError:
            continue
    return False


def _value(v: Any) -> Any:
    """A saved-value reference for the live side: ``{"ref": name, "off": n}``."""
    if isinstance(v, str):
        name, off = parse_ref(v)
        return {"ref": name, "off": off}
    return v


def _addr(a: dict[str, Any]) -> dict[str, Any]:
    if "gpa" in a:
        return {"gpa": _int(a, "gpa")}
    if "hva" in a:
        return {"hva": _value(a["hva"])}
    raise OpError("the step needs a gpa or an hva")


def host_has_swap(path: str = "/proc/swaps") -> bool:
    """Whether a swap device is active (a line beyond the header of /proc/swaps)."""
    try:
        with open(path) as fh:
            return len([line for line in fh if line.strip()]) > 1
    except OSError:
        return False


# In the VM guest (``run --live --kernel debian-6.1``): a throwaway VM may lose pages,
# so memory_failure is refereed (hwpoison_inject's corrupt-pfn), but there is no /dev/kvm.
NO_KVM = "no /dev/kvm in the VM guest (no nested virtualisation)"
NEEDS_KVM = {("host", "set_memory_region"), ("vmm", "guest_memfd_create"),
             ("vmm", "set_user_memory_region2")}
# A guest store the model completed is replayed as the VMM's store of the same bytes at the
# same page (slot 0 maps gpa 0 at the start of guest RAM, and the live guest makes no other
# slot): under upstream KVM the store faults the page in through GUP (hva_to_pfn) and writes
# it, as the VMM's own store does. Not refereed (no vCPU ran), but the later steps start
# from the same memory instead of being lost.
STAND_IN = ("no /dev/kvm in the VM guest; replayed as the VMM's store at the same address, "
            "so the later steps stay refereed")
# Likewise a guest load, and KVM's own read of guest memory (kvm_read_guest: copy_from_user
# through the VMM's mapping, or GUP): each faults the page in as the VMM's load of the same
# address does, and the later steps start from the same memory.
LOAD_STAND_IN = ("no /dev/kvm in the VM guest; replayed as the VMM's load at the same "
                 "address, so the later steps stay refereed")


def live_step(step: Step, swap: bool = True, in_vm: bool = False
              ) -> tuple[dict[str, Any] | None, str]:
    """The plain-dict step for the live side, or None and why it has no live counterpart.

    ``in_vm``: the live side is the VM guest of ``backends.vmkernel``, which may poison
    pages (MADV_HWPOISON, memory_failure) and has no /dev/kvm."""
    kind, _, who = step.actor.partition(":")
    op, a = step.op, step.args
    if not step.runs_on(REFEREE_DESIGN):
        return None, f"the step does not run on {REFEREE_DESIGN}"
    if in_vm and (kind, op) == ("guest", "store"):
        return {"index": step.index, "kind": "vmm", "who": who, "op": "store",
                "args": {"gpa": _int(a, "gpa"), "data": data_arg(a).hex()},
                "save": step.save, "stand_in": True}, STAND_IN
    if in_vm and (kind, op) in (("guest", "load"), ("host", "kvm_read")):
        vm = who if kind == "guest" else str(a["vm"]).removeprefix("vmm:")
        return {"index": step.index, "kind": "vmm", "who": vm, "op": "load",
                "args": {"gpa": _int(a, "gpa"), "size": _access_size(a)},
                "save": step.save, "stand_in": True}, LOAD_STAND_IN
    if in_vm and (kind == "guest" or (kind, op) in NEEDS_KVM):
        return None, NO_KVM
    if in_vm and (kind, op) in (("host", "memory_failure"), ("host", "unpoison")):
        return {"index": step.index, "kind": kind, "who": who, "op": op,
                "args": {"vm": str(a["vm"]).removeprefix("vmm:"), "gpa": _int(a, "gpa")},
                "save": step.save}, ""
    reason = NOT_LIVE.get((kind, op))
    if reason is not None:
        return None, reason
    args: dict[str, Any]
    if kind == "guest":
        args = {"gpa": _int(a, "gpa")}
        if op == "load":
            args["size"] = _access_size(a)
        else:
            args["data"] = data_arg(a).hex()
    elif kind == "host":
        if op == "new_vm":
            if a.get("fork_of") is not None:
                return None, "a forked VMM: the live run forks no VMM"
            args = {"name": str(a["name"]), "memory": parse_size(a.get("memory", 4 << 20),
                                                                 "memory", hi=VM_MEMORY_MAX),
                    "backing": str(a.get("backing", "memfd")),
                    "share_ram_with": a.get("share_ram_with")}
        elif op == "set_memory_region":
            args = {k: (_value(a[k]) if k == "hva" else _int(a, k)) for k in
                    ("slot", "guest_phys_addr", "size", "alias_gpa", "hva", "flags") if k in a}
            args["vm"] = str(a["vm"]).removeprefix("vmm:")
        else:  # a remote MATRIX path
            args = {"vm": str(a["target"]).removeprefix("vmm:"), **_addr(a)}
    elif op in FILE_OPS:
        args = {k: _value(v) if k in REF_ARGS else v
                for k, v in call_args(op, a).items()}
    elif op in UFFD_OPS:  # userfaultfd(2) and its ioctls
        args = {k: _value(v) if k == "fd" else v for k, v in uffd_call_args(op, a).items()}
        if op not in ("userfaultfd", "uffdio_api"):
            args.update(_addr(a))
    elif op == "load":
        args = {**_addr(a), "size": _access_size(a)}
    elif op == "store":
        args = {**_addr(a), "data": (data_arg(a) or bytes([0x44]) * 8).hex()}
    elif op in proto.LOCAL_PATHS:
        args = {**_addr(a), "path": op}
        op = "path"
    elif op == "fork_child_load":
        if _access_size(a) != proto.TRANSFER:
            return None, f"the live fork child loads {proto.TRANSFER} bytes"
        args = _addr(a)
    elif op in ("munmap", "mprotect", "madvise"):
        args = {**_addr(a), "size": _u64(a, "size", PAGE_SIZE)}
        if op == "mprotect":
            args["prot"] = _int(a, "prot")
        if op == "madvise":
            advice = a.get("advice")
            code = ADVICE.get(advice) if isinstance(advice, str) else advice
            if code == MADV_SOFT_OFFLINE or (code == MADV_HWPOISON and not in_vm):
                return None, f"MADV_HWPOISON/MADV_SOFT_OFFLINE {_HOST_MEMORY}"
            if code == MADV_PAGEOUT and not swap:
                return None, "this host has no swap: MADV_PAGEOUT leaves anonymous pages resident"
            args["advice"] = _int({"advice": code}, "advice")
    elif op in ("pagecache_read", "punch_hole"):
        args = {"gpa": _int(a, "gpa"), "size": _access_size(a) if op == "pagecache_read"
                else _int(a, "size", PAGE_SIZE)}
    elif op == "pagecache_write":
        args = {"gpa": _int(a, "gpa"), "data": (data_arg(a) or bytes(8)).hex()}
    else:
        return None, f"no live counterpart for {kind}:{op}"
    return {"index": step.index, "kind": kind, "who": who, "op": op, "args": args,
            "save": step.save}, ""


def _compare(model_cell: str, model_data: bytes | None, live: dict[str, Any]) -> tuple[str, str]:
    if live["cell"] != model_cell:
        return "DISAGREE", ""
    if model_data is not None and "data" in live and bytes.fromhex(live["data"]) != model_data:
        return "DISAGREE", f"same cell, different data: live {live['data'][:32]}"
    return "agree", ""


@dataclass
class RefereePlan:
    """A scenario's model run and its live steps, ready for a live side to run."""

    run: LiveRun
    model: ScenarioRun | None
    model_problem: str
    plans: dict[int, tuple[dict[str, Any] | None, str]]
    vms: list[dict[str, Any]]
    model_ram: list[tuple[int, int]] = field(default_factory=list)  # the model VMMs' guest RAM
    uffd_reads: set[int] = field(default_factory=set)  # steps that read a userfaultfd

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [p for p, _ in self.plans.values() if p is not None]


def plan(sc: Scenario, kcfg: KernelConfig, swap: bool, in_vm: bool = False) -> RefereePlan:
    """Run ``sc`` on the model (the referee design, configured as ``kcfg``) and plan the
    live side's steps."""
    run = LiveRun(sc, REFEREE_DESIGN, kcfg.version.value)
    model: ScenarioRun | None
    model_problem = ""
    seen: list[Any] = []
    try:
        model = run_scenario(referee_scenario(sc, kcfg), REFEREE_DESIGN,
                             observe=lambda m: seen.append(m) if not seen else None)
    except ScenarioError as exc:
        model, model_problem = None, f"the model cannot run it as this kernel: {exc}"
    plans: dict[int, tuple[dict[str, Any] | None, str]] = {}
    for step in sc.steps:
        try:
            plans[step.index] = live_step(step, swap, in_vm)
        except (OpError, ValueError) as exc:
            raise ScenarioError(sc.source, str(exc), step.index) from None
    if in_vm:
        _vm_pairs(sc.steps, plans)
    if any(v.thp for v in sc.vms):
        plans = dict.fromkeys(plans, (None, THP_RAM))
    vms = [{"name": v.name, "memory": v.memory, "backing": v.backing,
            "share_ram_with": v.share_ram_with} for v in sc.vms]
    ram = [(i.vmm.ram_hva, i.vmm.ram_size) for i in seen[0].instances.values()] if seen else []
    uffds = {f"${s.save}" for s in sc.steps if s.op == "userfaultfd" and s.save}
    reads = {s.index for s in sc.steps if s.op == "read" and s.args.get("fd") in uffds}
    return RefereePlan(run, model, model_problem, plans, vms, ram, reads)


THP_RAM = ("THP guest RAM (thp = true): the live runner maps guest RAM without 2 MiB alignment "
           "and MADV_HUGEPAGE, so its cells would not be THP cells")
DRAM_STAND_IN = ("an injected hardware fault; the next step's memory_failure of the same page "
                 "takes it out of service on both sides, so the later steps stay refereed")
SIMULATED = ("follows a memory_failure: the model's is a real error report (hw_memory_failure "
             "set, unpoison refused), the guest's corrupt-pfn is MF_SW_SIMULATED")


def _vm_pairs(steps: Sequence[Step], plans: dict[int, tuple[dict[str, Any] | None, str]]) -> None:
    """In the VM guest: an injected DRAM error that the next step hands to memory_failure
    (same VM, same page) stands in as nothing, since the page leaves service before anyone
    reads it; an unpoison after a memory_failure is not comparable (see SIMULATED)."""
    failed = False
    for i, step in enumerate(steps):
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if (step.actor, step.op) == ("hw", "inject_dram_error") and nxt is not None \
                and (nxt.actor, nxt.op) == ("host", "memory_failure") \
                and nxt.args.get("vm") == step.args.get("vm") \
                and _int(nxt.args, "gpa") // PAGE_SIZE == _int(step.args, "gpa") // PAGE_SIZE:
            plans[step.index] = ({"index": step.index, "kind": "host", "who": "",
                                  "op": "nothing", "args": {}, "save": None,
                                  "stand_in": True}, DRAM_STAND_IN)
        if (step.actor, step.op) == ("host", "unpoison") and failed:
            plans[step.index] = (None, SIMULATED)
        failed = failed or (step.actor, step.op) == ("host", "memory_failure")


def referee(sc: Scenario, kcfg: KernelConfig | None = None) -> LiveRun:
    """Run ``sc`` on the model (the referee design, configured like this kernel) and live."""
    p = plan(sc, kcfg or host_kernel_config().config, host_has_swap())
    if p.model is None:
        return judge(p, {})
    try:
        live = run_live(p.vms, p.sent)
    except LiveError as exc:
        raise ScenarioError(sc.source, f"--live: {exc}") from None
    return judge(p, live)


def _faulted_in(res: StepResult) -> bool:
    """Whether a read changed its page on the model (KVM's read or a guest load faulting
    the VMM's page in): the page state the runner records changed."""
    return any(k != "page" for k in res.changed)


def judge(p: RefereePlan, live: dict[int, dict[str, Any]]) -> LiveRun:
    """Compare the model's cells with the live side's, step by step."""
    run, model, plans = p.run, p.model, p.plans
    if model is None:
        run.steps = [RefereedStep(s, "", None, "not refereed", p.model_problem)
                     for s in run.scenario.steps]
        return run
    tainted = ""
    for res in model.results:
        step = res.step
        key = (step.actor.partition(":")[0], step.op)
        plan_, why = plans[step.index]
        got = live.get(step.index)
        cell = res.outcome.cell
        if tainted:
            run.steps.append(RefereedStep(step, cell, None, "not refereed", tainted))
            continue
        if res.outcome.kind in (Kind.SHUTDOWN, Kind.PANIC):
            tainted = f"the modelled host stopped at step {step.index} ({cell})"
            run.steps.append(RefereedStep(step, cell, None, "not refereed", tainted))
            continue
        if plan_ is None or got is None or "skip" in got:
            reason = why if plan_ is None else (got or {}).get("skip", "the live run ended early")
            run.steps.append(RefereedStep(step, cell, None, "not refereed", reason))
            if key not in READS_ONLY or _faulted_in(res):
                tainted = (f"follows step {step.index}, which changed state the live kernel "
                           "did not see")
            continue
        if plan_.get("stand_in"):
            run.steps.append(RefereedStep(step, cell, None, "not refereed", why))
            if cell != "ok" or got.get("cell") != "ok":  # the two memories may differ now
                tainted = (f"follows step {step.index}, a {step.op} the live side could "
                           f"only replay (model {cell}, replay {got.get('cell', 'error')})")
            continue
        if "error" in got:
            run.steps.append(RefereedStep(step, cell, "error", "DISAGREE", got["error"]))
            continue
        data = res.outcome.data
        if data is not None and step.index in p.uffd_reads:  # uffd_msg addresses: RAM offsets
            data = uffd_msgs_relative(data, p.model_ram)
        verdict, note = _compare(cell, data, got)
        run.steps.append(RefereedStep(step, cell, got["cell"], verdict, note))
    return run


def records(run: LiveRun) -> list[dict[str, Any]]:
    return [{"step": s.step.index, "actor": s.step.actor, "op": s.step.op, "model": s.model,
             "live": s.live, "verdict": s.verdict, **({"reason": s.reason} if s.reason else {})}
            for s in run.steps]
