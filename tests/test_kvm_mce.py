"""A non-TD guest consuming poison: KVM's machine-check VM exit, per kernel version.

KVM never injects the #MC: ``kvm_machine_check`` runs the host handler as for a
user-mode fault and ``kill_me_maybe`` calls ``memory_failure(MF_ACTION_REQUIRED)``.
"""

import signal

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.mce import MCE_REENTRY_LIMIT
from kvmpoison.machine import Machine
from kvmpoison.mm.memory_failure import MF_ACTION_REQUIRED, memory_failure
from kvmpoison.mm.page import PageHWPoison
from kvmpoison.outcome import Kind, LivelockOn
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import SI_KERNEL, BusCode

PAGE = 4096
GPA = 0x30 * PAGE
V6_18 = KernelConfig(version=KernelVersion.V6_18)


def _poisoned(design: str, kernel: KernelConfig | None = None, handled: bool = True,
              integrity: IntegrityMode = IntegrityMode.OFF) -> tuple[Machine, int]:
    """A guest page with a real DRAM error; a non-TD guest unless ``integrity`` says."""
    platform = PlatformConfig(mem_bytes=64 << 20, integrity=integrity)
    m = Machine(Config(design=design, kernel=kernel, platform=platform))
    assert m.guest.store(GPA, b"guest data").kind is Kind.OK
    pfn = int(m.vm.ept.get(GPA)) >> PAGE_SHIFT & ((1 << 40) - 1)
    core = m.kernel.core
    core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    if handled:
        memory_failure(core, pfn, 0)  # the error was found (patrol scrub) before the guest reads
    return m, pfn


def _already_poisoned(m: Machine) -> int:
    return sum(1 for r in m.kernel.core.mf_reports if getattr(r, "page_type", "") ==
               "already poisoned")


def test_v5_12_protected_page_livelocks_the_vcpu() -> None:
    """RFC: PG_hwpoison is already set, memory_failure() returns 0, the EPT still maps it."""
    for design in ("rfc-v1", "rfc-v2"):
        m, _ = _poisoned(design)
        pending, seen = len(m.vmm.proc.task.pending), _already_poisoned(m)
        out = m.guest.load(GPA, 8)
        assert out.kind is Kind.LIVELOCK and out.livelock is LivelockOn.MCE
        assert out.cell == "livelock:mce" and out.mce is not None
        assert len(m.vmm.proc.task.pending) == pending  # kill_me_maybe sent nothing
        assert _already_poisoned(m) - seen == MCE_REENTRY_LIMIT + 1  # one per VM entry
        assert m.vmm.proc.task.alive


def test_6_18_rfc_page_livelocks_too_as_the_vmm_maps_nothing() -> None:
    """6.18's try_to_unmap() installs no hwpoison entry without TTU_HWPOISON, so
    kill_accessing_process() finds no mapping of the pfn and returns 0."""
    m, _ = _poisoned("rfc-v2", V6_18)
    assert m.vmm.proc.mm.pgd.get(m.vmm.gpa_to_hva(GPA)) == 0
    assert m.guest.load(GPA, 8).cell == "livelock:mce"


def test_kill_accessing_process_per_version() -> None:
    """An already-poisoned page the VMM maps with a hwpoison entry, MF_ACTION_REQUIRED:
    v5.12 returns 0 and sends nothing; 6.18 signals BUS_MCEERR_AR and returns -EHWPOISON."""
    for kernel, ret, signalled in ((None, 0, False), (V6_18, -EHWPOISON, True)):
        m, pfn = _poisoned("baseline", kernel, integrity=IntegrityMode.OFF)
        task, hva = m.vmm.proc.task, m.vmm.gpa_to_hva(GPA)
        assert m.vmm.proc.mm.pgd.get(hva) != 0  # the hwpoison entry memory_failure() left
        pending = len(task.pending)
        assert memory_failure(m.kernel.core, pfn, MF_ACTION_REQUIRED, current_pid=task.pid) == ret
        assert (len(task.pending) > pending) is signalled
        if signalled:
            info = task.pending[-1]
            assert (info.code, info.addr, info.addr_lsb) == (BusCode.BUS_MCEERR_AR, hva, 12)


def test_first_consumption_unmaps_then_the_reentry_faults_with_sigbus() -> None:
    """A non-TD guest, an error nobody handled yet: memory_failure() unmaps the page
    (the MMU notifier zaps the SPTE) and the re-entry's EPT fault signals the vCPU."""
    for kernel in (None, V6_18):
        m, pfn = _poisoned("baseline", kernel, handled=False, integrity=IntegrityMode.OFF)
        assert m.vm.td_keyid is None
        out = m.guest.load(GPA, 8)
        assert out.cell == "sig:SIGBUS:BUS_MCEERR_AR", out
        assert out.siginfo is not None and out.siginfo.code == BusCode.BUS_MCEERR_AR
        assert out.siginfo.addr == m.vmm.gpa_to_hva(GPA)
        assert PageHWPoison(m.kernel.core.pages[pfn])


def test_without_memory_failure_an_srar_error_panics() -> None:
    kernel = KernelConfig(version=KernelVersion.V6_18, memory_failure=False)
    m, _ = _poisoned("baseline", kernel, handled=False, integrity=IntegrityMode.OFF)
    assert m.guest.load(GPA, 8).cell == "panic"


def test_kill_me_now_when_memory_failure_fails() -> None:
    """memory_failure() -ENXIO-like failure (pfn 0 is outside its reach): SIGBUS SI_KERNEL."""
    from kvmpoison.kernel.mce import kill_me_maybe

    m, _ = _poisoned("rfc-v2", handled=False)
    kill_me_maybe(m.vm.core, m.vm.vcpu_task, 0, 0x3)
    info = m.vmm.proc.task.pending[-1]
    assert info.signo == signal.SIGBUS and info.code == SI_KERNEL


def test_without_memory_failure_a_user_consumer_panics_the_host() -> None:
    """No CONFIG_MEMORY_FAILURE: the severity table has no AR rows (6.18 here: THIS_MACHINE)."""
    kernel = KernelConfig(version=KernelVersion.V6_18, memory_failure=False)
    m = Machine(Config(design="baseline", kernel=kernel,
                       platform=PlatformConfig(mem_bytes=64 << 20,
                                               integrity=IntegrityMode.OFF)))
    hva = m.vmm.gpa_to_hva(GPA)
    assert m.vmm.store(GPA, b"host data").kind is Kind.OK
    pfn = m.vmm.proc.mm.pgd.get(hva) >> PAGE_SHIFT & ((1 << 40) - 1)
    m.kernel.core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    assert m.vmm.load(GPA, 8).cell == "panic"


def test_a_broadcast_mc_makes_every_td_fatal() -> None:
    """Integrity poison consumed by one TD: with LMCE only that TD is FATAL, without it all."""
    from kvmpoison.machine import VmSpec

    for lmce in (True, False):
        m = Machine(Config(design="baseline", platform=PlatformConfig(
            mem_bytes=64 << 20, integrity=IntegrityMode.CI, lmce=lmce)))
        other = m.add_vm(VmSpec(name="other"))
        assert m.guest.store(GPA, b"td data").kind is Kind.OK
        assert m.vmm.store(GPA, b"host write").kind is Kind.OK  # breaks the TD's integrity
        assert m.guest.load(GPA, 8).cell == "mce:td-fatal"
        assert m.vm.td_fatal and other.vm.td_fatal is not lmce
