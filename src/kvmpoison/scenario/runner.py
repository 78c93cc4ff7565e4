"""Run a scenario on a design: steps, outcomes, expectations, and a JSONL trace.

Each trace record names the step and its outcome and lists what the step
changed about the page it addressed: the frame, its struct page fields, the
VMM's PTE and the VM's EPT entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.config import DEFAULT_INTEGRITY, Config
from kvmpoison.designs import design as get_design
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.matrix.designs import backing_pfn
from kvmpoison.mm.huge_memory import ThpSettings
from kvmpoison.mm.page import compound_head, page_count, page_mapcount
from kvmpoison.mm.ptdump import decode_kind
from kvmpoison.mm.userfaultfd_k import UserfaultBlocked
from kvmpoison.outcome import Halt, Kind, Outcome
from kvmpoison.scenario.loader import Scenario, ScenarioError, Step
from kvmpoison.scenario.ops import OPS, SAVES_REF, OpError, RunCtx, data_arg
from kvmpoison.virt.kvm.kvm_main import ept_spte_4k


@dataclass
class StepResult:
    step: Step
    outcome: Outcome
    expected: str | None
    met: bool | None  # None: no expectation for this design
    data_met: bool | None
    changed: dict[str, Any] = field(default_factory=dict)
    violation_met: bool | None = None  # None: the step expects no violation on this design

    @property
    def ok(self) -> bool:
        return self.met is not False and self.data_met is not False \
            and self.violation_met is not False


class Monitor(Protocol):
    """Checks invariants around every step (``[scenario] invariants``; explore provides one)."""

    def before(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any]) -> None: ...

    def after(self, ctx: RunCtx, actor: str, op: str, args: dict[str, Any],
              out: Outcome) -> list[str]: ...


@dataclass
class ScenarioRun:
    scenario: Scenario
    design: str
    results: list[StepResult]
    violations: list[tuple[int, str]] = field(default_factory=list)  # (step, "I1: ...")
    # ... and those a step's ``expect_violation`` names (they do not fail the run)
    expected_violations: list[tuple[int, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.results) and not self.violations


def perform(ctx: RunCtx, actor: str, op: str, args: dict[str, Any]) -> Outcome:
    """One step on the machine: its outcome, or the machine's halt. Raises OpError."""
    kind, _, who = actor.partition(":")
    core = ctx.machine.kernel.core
    if core.halted is not None:
        return core.halted
    try:
        return OPS[(kind, op)].run(ctx, who, op, args)
    except Halt as halt:
        core.halted = halt.outcome
        return halt.outcome
    except UserfaultBlocked as blocked:  # the thread sleeps in handle_userfault (or read)
        if blocked.waiter is None:
            return Outcome.blocked("read(2) of the userfaultfd sleeps: no message")
        blocked.waiter.token = (actor, op, args)  # re-run when a UFFDIO_COPY/ZEROPAGE wakes it
        return Outcome.blocked(f"UFFD_EVENT_PAGEFAULT at {blocked.waiter.address:#x} queued; "
                               "the thread sleeps in handle_userfault")


def build_machine(sc: Scenario, design_name: str,
                  integrity: IntegrityMode | None = None) -> Machine:
    """``integrity`` (the CLI's ``--integrity``) overrides ``[machine] integrity``."""
    d = get_design(design_name)
    spec = sc.machine
    kcfg = d.kernel
    if spec.kernel is not None:
        version = spec.kernel
        if d.kernel_floor is not None and version < d.kernel_floor:
            version = d.kernel_floor  # the design cannot run older kernels (hardened: markers)
        kcfg = dataclasses.replace(kcfg, version=version)
    overrides: dict[str, Any] = dict(spec.config)
    kcfg = dataclasses.replace(kcfg, **overrides)
    platform = PlatformConfig(mem_bytes=spec.memory,
                              integrity=integrity or spec.integrity or DEFAULT_INTEGRITY,
                              mac_bits=spec.mac_bits, seed=spec.seed,
                              seam_nr=spec.seam_nr)
    config = Config(design=design_name, kernel=kcfg, platform=platform, seed=spec.seed,
                    thp=ThpSettings(enabled=spec.thp) if spec.thp else None, tdp=spec.tdp)
    vms = [VmSpec(v.name, v.memory, v.backing, v.share_ram_with, thp=v.thp) for v in sc.vms]
    return Machine(config, vms=vms, kvm_id_bits=spec.kvm_id_bits)


def _page_of(ctx: RunCtx, step: Step) -> tuple[str, int] | None:
    """The (VM, page-aligned gpa) a step addresses, or None if it names none."""
    a = step.args
    gpa = a.get("gpa")
    if not isinstance(gpa, int):
        return None
    name = str(a.get("vm") or a.get("target") or step.actor.partition(":")[2] or "")
    name = name.removeprefix("vmm:").removeprefix("guest:")
    inst = ctx.machine.instances.get(name)
    if inst is None:
        return None
    gpa &= ~(PAGE_SIZE - 1)
    if not 0 <= gpa < inst.vmm.ram_size:
        return None
    return name, gpa


def _page_state(ctx: RunCtx, page: tuple[str, int] | None) -> dict[str, Any]:
    """What is known about a step's page (empty if it names none)."""
    if page is None:
        return {}
    name, gpa = page
    inst = ctx.machine.instances[name]
    core = ctx.machine.kernel.core
    state: dict[str, Any] = {"vm": name, "gpa": f"{gpa:#x}"}
    mm = inst.vmm.proc.task.mm
    if mm is None:  # the VMM exited
        return state
    pte = mm.pgd.get(inst.vmm.gpa_to_hva(gpa))
    state["vmm_pte"] = f"{pte:#018x}"
    state["vmm_pte_kind"] = decode_kind(pte, core.kcfg)
    if mm.pgd.nr_pmd_leaves and mm.pgd.pmd_leaf(inst.vmm.gpa_to_hva(gpa)):
        state["vmm_pmd"] = f"{mm.pgd.pmd_leaf(inst.vmm.gpa_to_hva(gpa)):#018x}"  # a THP
    state["ept"] = f"{ept_spte_4k(inst.vm.ept, gpa):#018x}"
    try:
        pfn = backing_pfn(ctx.machine, gpa, inst.vmm, inst.vm)
    except ValueError:
        return state
    mem = core.pages
    struct_page = mem[pfn]
    kvm = inst.vm.kvm
    owner = kvm.kvm_pfn_map.get(pfn)
    if inst.vm.hardened_shared is not None:  # the hardened design: the page's binding
        binding = int(kvm.hardened_owner[pfn])
        owner = None if binding == kvm.NO_BINDING else binding
    # page_count/page_mapcount: a THP's subpage reads its head's references and PMD mappings.
    state.update(pfn=f"{pfn:#x}", flags=mem.bits.names(int(mem.flags[pfn])),
                 refcount=page_count(struct_page), mapcount=page_mapcount(struct_page),
                 owner=owner)
    if mem.order[pfn]:
        state["compound_head"] = f"{compound_head(struct_page).pfn:#x}"
    return state


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out = {k: {"before": before.get(k), "after": v} for k, v in after.items()
           if before.get(k) != v and k not in ("vm", "gpa")}
    if out and "gpa" in after:
        out["page"] = {"vm": after["vm"], "gpa": after["gpa"]}
    return out


def _check_data(ctx: RunCtx, step: Step, design: str, out: Outcome) -> bool | None:
    want = step.expected_data(design)
    if want is None:
        return None
    if want.startswith("$"):
        expected = ctx.values.get(want[1:])
        if expected is None:
            return False
    else:
        expected = bytes.fromhex(want[4:]) if want.startswith("hex:") else want.encode()
    return out.data == expected


def run_scenario(sc: Scenario, design: str, integrity: IntegrityMode | None = None,
                 observe: Callable[[Machine], None] | None = None,
                 monitor: Monitor | None = None) -> ScenarioRun:
    """``observe`` sees the machine before the first step and after every step;
    ``monitor`` checks invariants around every step (a violation fails the run, unless
    the step's ``expect_violation`` names it on this design); without one, no invariant
    and no ``expect_violation`` is checked (``explore.monitor.scenario_monitor`` makes the
    monitor of a scenario's ``[scenario] invariants``)."""
    try:
        m = build_machine(sc, design, integrity)
    except (ValueError, RuntimeError, MemoryError) as exc:
        raise ScenarioError(sc.source, f"cannot build the machine on {design}: {exc}") from None
    if observe is not None:
        observe(m)
    ctx = RunCtx(m)
    results = []
    violations: list[tuple[int, str]] = []
    expected_violations: list[tuple[int, str]] = []
    # A step's page state after it is the next step's before it, when both address the
    # same page and nothing runs in between (no observer or monitor, which may fault).
    reuse = observe is None and monitor is None
    last: tuple[tuple[str, int] | None, dict[str, Any]] | None = None
    for step in sc.steps:
        if not step.runs_on(design):
            continue
        page = _page_of(ctx, step)
        if reuse and last is not None and last[0] == page:
            before = last[1]
        else:
            before = _page_state(ctx, page)
        if monitor is not None:
            monitor.before(ctx, step.actor, step.op, step.args)
        try:
            out = perform(ctx, step.actor, step.op, step.args)
        except (OpError, ValueError) as exc:  # the model refuses the arguments
            raise ScenarioError(sc.source, str(exc), step.index) from None
        except MemoryError as exc:  # the modelled host has no frame left for a page table
            raise ScenarioError(sc.source, f"the modelled machine ran out of memory ({exc}); "
                                "give [machine] more memory", step.index) from None
        breaks = step.expected_violation(design)
        if breaks is not None and ":" not in breaks:
            breaks += ":"  # any violation of the invariant
        violation_met = None
        if monitor is not None:
            for v in monitor.after(ctx, step.actor, step.op, step.args, out):
                if breaks is not None and v.startswith(breaks):
                    expected_violations.append((step.index, v))
                    violation_met = True
                else:
                    violations.append((step.index, v))
            if breaks is not None and violation_met is None:
                violation_met = False  # the invariant held where the step says it breaks
        if step.save and step.op in SAVES_REF:  # an fd or an address, for "$name" later
            if out.kind is Kind.OK and out.value is not None:
                ctx.refs[step.save] = out.value
        elif step.save:
            # A load saves what it read; a store saves what it wrote.
            if out.data is not None:
                ctx.values[step.save] = out.data
            elif "data" in step.args:
                ctx.values[step.save] = data_arg(step.args)
        expected = step.expected(design)
        met = None if expected is None else out.cell == expected
        after = _page_state(ctx, _page_of(ctx, step))
        last = (page, after)
        results.append(StepResult(step, out, expected, met, _check_data(ctx, step, design, out),
                                  _diff(before, after), violation_met))
        if observe is not None:
            observe(m)
    return ScenarioRun(sc, design, results, violations, expected_violations)


def trace_records(run: ScenarioRun) -> list[dict[str, Any]]:
    records = []
    for r in run.results:
        rec: dict[str, Any] = {
            "scenario": run.scenario.name, "design": run.design, "step": r.step.index,
            "actor": r.step.actor, "op": r.step.op, "cell": r.outcome.cell,
            "expected": r.expected, "met": r.met, "data_met": r.data_met,
            "changed": r.changed,
        }
        if r.violation_met is not None:
            rec["expect_violation"] = r.step.expected_violation(run.design)
            rec["violation_met"] = r.violation_met
        if r.outcome.detail:
            rec["detail"] = r.outcome.detail
        if r.outcome.data is not None:
            rec["data"] = r.outcome.data.hex()
        if r.outcome.siginfo is not None:
            rec["si_addr"] = f"{r.outcome.siginfo.addr:#x}"
        records.append(rec)
    return records


__all__ = ["PAGE_SHIFT", "Monitor", "ScenarioRun", "StepResult", "perform", "run_scenario",
           "trace_records"]
