"""Scenarios refereed by Debian's Linux 6.1 under QEMU (``run --live --kernel debian-6.1``).

The same plan and judgement as :mod:`.scenario_live`, with the live side in
the VM guest of ``backends.vmkernel``: one boot runs every scenario of the
invocation (``backends.kvm.live.run_live`` inside the guest, results framed
on the serial console). The model is configured as that kernel (its version
and the package's /boot/config, MEMORY_FAILURE=y). The guest is a throwaway VM,
so MADV_HWPOISON and memory_failure are refereed there; it has no /dev/kvm, so
the KVM steps are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmpoison.backends.vmkernel import session
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.report.scenario_live import LiveRun, RefereePlan, judge, plan
from kvmpoison.report.vm_oracle import KERNELS, kconfig_from_text
from kvmpoison.scenario.loader import Scenario, ScenarioError

GUEST_SWAP = False  # the guest has no swap device: MADV_PAGEOUT is not refereed


@dataclass
class VmLives:
    """The verdicts of one boot, and what the boot measured."""

    lives: list[LiveRun]
    kernel: str
    kcfg: KernelConfig
    accel: str
    boot_seconds: float  # power-on to the runner's start, guest clock
    wall_seconds: float  # the whole qemu run, host clock
    notes: list[str] = field(default_factory=list)


def referee_in_vm(scenarios: list[Scenario], kernel: str = "debian-6.1",
                  accel: str = "auto") -> VmLives:
    if kernel not in KERNELS:
        raise ValueError(f"unknown VM kernel {kernel!r} (known: {', '.join(KERNELS)})")
    files = session.prepare()
    release = files.release
    kcfg = kconfig_from_text(files.config.read_text(), KernelVersion.parse(release))
    if not kcfg.memory_failure:
        raise VmKernelUnavailableError(f"{release} has no CONFIG_MEMORY_FAILURE")
    plans: list[RefereePlan] = [plan(sc, kcfg, GUEST_SWAP, in_vm=True) for sc in scenarios]
    jobs: list[dict[str, object]] = [{"vms": p.vms, "steps": p.sent} for p in plans]
    booted = session.run_scenarios(jobs, accel, kernel=files)
    out = VmLives([], str(booted.info.get("release", release)), kcfg, booted.accel,
                  booted.boot_seconds, booted.wall_seconds)
    if not booted.info.get("hwpoison_inject"):
        out.notes.append("hwpoison_inject did not load: memory_failure steps fail")
    for i, p in enumerate(plans):
        got = booted.scenarios.get(i)
        if got is None or "error" in got:
            why = "no console line" if got is None else str(got["error"])
            raise ScenarioError(p.run.scenario.source, f"--live in the VM: {why}")
        results = got["results"]
        assert isinstance(results, dict)
        out.lives.append(judge(p, {int(k): v for k, v in results.items()}))
    return out
