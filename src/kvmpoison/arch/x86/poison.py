"""What happens when software consumes poisoned data.

The hardware produces an SRAR machine-check record (or, in SEAM root, an
unbreakable shutdown); Linux grades it (``mce_severity``) and acts. Sources:
TDX Module Base Architecture Spec ch. 16 (16.5.1, 16.6), summarised in
docs/hardware.md, and ``arch/x86/kernel/cpu/mce``
(v6.18) for the host's reaction.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from kvmpoison.arch.x86.mce import (
    TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE,
    Severity,
    mce_severity,
    srar_record,
)
from kvmpoison.outcome import McKind, Outcome


class Ctx(enum.Enum):
    """Who consumed the data."""

    HOST_USER = "host-user"
    HOST_KERNEL = "host-kernel"
    HOST_KERNEL_MC_SAFE = "host-kernel-mc-safe"  # copy_mc_* / EX_TYPE_*MCE_SAFE
    GUEST = "guest"  # an ordinary (non-TD) VM
    TD = "td"  # SEAM non-root
    SEAM_ROOT = "seam-root"  # the TDX module itself


@dataclass(frozen=True, slots=True)
class ConsumptionPolicy:
    """Platform facts that decide a consumption's fate."""

    seam_nr: bool = True  # MCG_CAP.SEAM_NR: the host can tell a TD consumed it
    lmce: bool = True  # local MCE; without it every logical CPU sees the #MC
    long_flow_shutdown: bool = False  # the core cannot continue (long microcode flow)
    memory_failure: bool = True  # the host kernel's CONFIG_MEMORY_FAILURE (its AR rows)


def consume_poison(
    pa: int,
    ctx: Ctx,
    policy: ConsumptionPolicy,
    *,
    vaddr: int | None = None,
    instruction_fetch: bool = False,
    mc_safe_errno: int = errno.EFAULT,
) -> Outcome:
    """The outcome of ``ctx`` consuming the poisoned line at ``pa``.

    The record and its grading (``mce_severity``); then, as ``do_machine_check``
    acts on it: a panic, an unbreakable shutdown, a FATAL TD, an EX_TYPE_*MCE_SAFE
    copy's errno, or, for a host user task and a non-TD guest, the raw
    recoverable #MC: the task work ``kill_me_maybe`` decides what follows
    (``kernel/mce.py`` for a task, ``virt/kvm/x86/vcpu.kvm_machine_check`` for a
    vCPU). The grading assumes CONFIG_MEMORY_FAILURE as ``policy`` says
    (without it an SRAR error panics).
    """
    seam_nr = ctx is Ctx.TD and policy.seam_nr
    rec = srar_record(pa, instruction_fetch=instruction_fetch, lmce=policy.lmce, seam_nr=seam_nr)
    broadcast = "" if policy.lmce else "; broadcast #MC: every running TD becomes FATAL"
    if ctx is Ctx.SEAM_ROOT or policy.long_flow_shutdown:
        return Outcome.shutdown(rec, "unbreakable shutdown; TDX disabled platform-wide")
    kernel_mode = ctx in (Ctx.HOST_KERNEL, Ctx.HOST_KERNEL_MC_SAFE, Ctx.TD)
    sev = mce_severity(rec, kernel_mode=kernel_mode, mc_safe=ctx is Ctx.HOST_KERNEL_MC_SAFE,
                       memory_failure=policy.memory_failure)
    if sev is Severity.PANIC:
        why = ("Data load in unrecoverable area of kernel" if policy.memory_failure
               else "Action required: unknown MCACOD (no CONFIG_MEMORY_FAILURE)")
        return Outcome.panic(why + broadcast, rec)
    match ctx:
        case Ctx.TD:
            return Outcome.machine_check(
                rec,
                McKind.TD_FATAL,
                f"TD marked FATAL; TDH.VP.ENTER returns {TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE:#x};"
                f" host marks the page HWPoison{broadcast}",
            )
        case Ctx.HOST_USER:
            # An AR error in user mode: do_machine_check queues kill_me_maybe on the task;
            # what it ends with (a signal, or a re-executed load) is kernel/mce.py's.
            at = f" at user address {vaddr:#x}" if vaddr is not None else ""
            return Outcome.machine_check(rec, McKind.RECOVERABLE,
                                         f"#MC in user mode{at}: kill_me_maybe queued")
        case Ctx.HOST_KERNEL_MC_SAFE:
            return Outcome.error(mc_safe_errno, "machine check in an MC-safe copy")
        case Ctx.GUEST:
            # VMX non-root: the #MC is a VM exit (EXCEPTION_NMI, vector 18), never delivered
            # to the guest; the host's handling is KVM's (virt/kvm/x86/vcpu.kvm_machine_check).
            return Outcome.machine_check(rec, McKind.RECOVERABLE, "#MC VM exit of a non-TD guest")
    raise AssertionError(f"{ctx} graded {sev}")
