"""A host user task consuming poison: do_machine_check -> kill_me_maybe -> memory_failure(AR).

arch/x86/kernel/cpu/mce/core.c (v5.12; 6.1.192's kill_me_maybe, the same from v5.13) and
mm/memory-failure.c (memory_failure, kill_accessing_process): the signal, if any, comes
from memory_failure's kill_procs or kill_accessing_process; without one the task
re-executes the load.
"""

from __future__ import annotations

import signal

import pytest

from helpers import PAGE, anon, boot, ok, proc
from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable import pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.arch.x86.poison import ConsumptionPolicy
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.mce import MCE_REENTRY_LIMIT
from kvmpoison.kernel.process import Process
from kvmpoison.mm.file import O_RDONLY
from kvmpoison.mm.memory_failure import MfReport
from kvmpoison.mm.mmap import MAP_SHARED, PROT_READ
from kvmpoison.mm.page import PageHWPoison, SetPageHWPoison
from kvmpoison.outcome import Kind
from kvmpoison.uapi.siginfo import SI_KERNEL, BusCode

V5_12 = KernelConfig(version=KernelVersion.V5_12)
V6_1 = KernelConfig(version=KernelVersion.V6_1)
V6_18 = KernelConfig(version=KernelVersion.V6_18, memory_failure=True)


def _mapped_error(kcfg: KernelConfig) -> tuple[Kernel, Process, int, int]:
    """A process with a dirty anonymous page whose first line has a DRAM error."""
    k = boot(kcfg)
    p = proc(k)
    addr = anon(p, 1, fill=7)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    k.core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    return k, p, addr, pfn


@pytest.mark.parametrize("kcfg", [V5_12, V6_1, V6_18])
def test_first_consumption_unmaps_and_signals_once(kcfg: KernelConfig) -> None:
    """memory_failure(MF_ACTION_REQUIRED) poisons and unmaps the dirty page; kill_procs sends
    the consumer BUS_MCEERR_AR at the page's address (page_address_in_vma), lsb 12; it
    returns 0, so kill_me_maybe sends nothing more."""
    k, p, addr, pfn = _mapped_error(kcfg)
    out = p.load(addr + 8, 8)
    assert out.cell == "sig:SIGBUS:BUS_MCEERR_AR", out
    assert out.siginfo is not None and (out.siginfo.addr, out.siginfo.addr_lsb) == (addr, 12)
    assert [i.code for i in p.task.pending] == [BusCode.BUS_MCEERR_AR]
    assert PageHWPoison(k.core.pages[pfn]) and not pte_present(p.mm.pgd.get(addr))
    assert not p.task.alive


@pytest.mark.parametrize(("kcfg", "cell"), [(V5_12, "livelock:mce"),
                                            (V6_1, "sig:SIGBUS:BUS_MCEERR_AR"),
                                            (V6_18, "sig:SIGBUS:BUS_MCEERR_AR")])
def test_already_poisoned_page_still_mapped(kcfg: KernelConfig, cell: str) -> None:
    """PG_hwpoison set but the PTE still maps the page (as the SEAM_NR path leaves it).
    v5.12: memory_failure() returns 0 ("already hardware poisoned"), nothing is sent and the
    task takes the same #MC on every return to user mode. From v5.13 (6.1, 6.18):
    kill_accessing_process() finds the PTE and sends BUS_MCEERR_AR; -EHWPOISON is quiet."""
    k, p, addr, pfn = _mapped_error(kcfg)
    SetPageHWPoison(k.core.pages[pfn])
    out = p.load(addr, 8)
    assert out.cell == cell, out
    if out.kind is Kind.LIVELOCK:
        assert p.task.pending == [] and p.task.alive
        reports = [r for r in k.core.mf_reports
                   if isinstance(r, MfReport) and r.page_type == "already poisoned"]
        assert len(reports) == MCE_REENTRY_LIMIT + 1
    else:
        assert [(i.code, i.addr, i.addr_lsb) for i in p.task.pending] == [
            (BusCode.BUS_MCEERR_AR, addr, 12)]


@pytest.mark.parametrize("kcfg", [V5_12, V6_1, V6_18])
def test_a_clean_file_page_is_dropped_and_the_load_refaults(kcfg: KernelConfig) -> None:
    """A clean page-cache page: "corrupted page was clean: dropped without side effects";
    nobody is signalled and the re-executed load reads the file again from disk."""
    k = boot(kcfg)
    k.create_file("/f", b"on disk!" * 512)
    p = proc(k)
    fd = ok(p.open("/f", O_RDONLY))
    addr = ok(p.mmap(0, PAGE, PROT_READ, MAP_SHARED, fd))
    assert p.load(addr, 8).data == b"on disk!"
    pfn = pte_pfn(p.mm.pgd.get(addr))
    k.core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    out = p.load(addr, 8)
    assert out.cell == "ok" and out.data == b"on disk!", out
    assert p.task.pending == [] and PageHWPoison(k.core.pages[pfn])
    assert pte_pfn(p.mm.pgd.get(addr)) != pfn


def test_kill_me_now_when_memory_failure_fails() -> None:
    """memory_failure() fails (pfn 0: "memory outside kernel control", -ENXIO), so
    kill_me_maybe ends in kill_me_now: SIGBUS with SI_KERNEL, no address."""
    from kvmpoison.kernel.mce import kill_me_maybe

    k, p, _, _ = _mapped_error(V5_12)
    before = len(p.task.pending)
    kill_me_maybe(k.core, p.task, 0, 0x1)
    assert [(i.signo, i.code) for i in p.task.pending[before:]] == [(signal.SIGBUS, SI_KERNEL)]


@pytest.mark.parametrize("kind", ["panic", "shutdown"])
def test_a_panic_or_shutdown_halts_the_machine(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """do_machine_check panics (no CONFIG_MEMORY_FAILURE: no AR rows), or the core cannot
    continue (a long microcode flow: unbreakable shutdown): the machine halts, and every
    later action of any process ends the same way."""
    if kind == "shutdown":
        monkeypatch.setattr(PlatformConfig, "consumption", property(
            lambda self: ConsumptionPolicy(long_flow_shutdown=True)))
    kcfg = KernelConfig(version=KernelVersion.V6_18, memory_failure=kind == "shutdown")
    k = Kernel.boot(kcfg, PlatformConfig(mem_bytes=64 << 20, integrity=IntegrityMode.OFF))
    p, other = proc(k), proc(k, "bystander")
    addr = anon(p, 1, fill=1)
    k.core.hw.inject_dram_error(pte_pfn(p.mm.pgd.get(addr)) << PAGE_SHIFT)
    assert p.load(addr, 8).cell == kind
    assert k.core.halted is not None and k.core.halted.cell == kind
    assert other.load(addr, 8).cell == kind
