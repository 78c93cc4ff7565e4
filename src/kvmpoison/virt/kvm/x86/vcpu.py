"""A vCPU's loads and stores at guest-physical addresses, through the EPT.

The access walks the VM's EPT, takes EPT violations through
``direct_page_fault``, and reaches memory under the TD's private KeyID (or
KeyID 0 for a shared gfn, or for a VM that is not a TD). Consumed poison
ends as the hardware and the host decide:

* a TD (SEAM non-root, ``MCG_STATUS_SEAM_NR``): the TDX module marks the TD
  FATAL and the host marks the page HWPoison (hardware model, TDX spec ch. 16);
* any other guest: a machine-check VM exit, handled by :func:`kvm_machine_check`
  as the host kernel does. KVM never injects the #MC into the guest.

Simplified: one vCPU whose thread is the VMM task; a VM entry retries the
whole access; loads only (no instruction fetch); no guest page-table walk.
"""

from __future__ import annotations

from kvmpoison.arch.x86.mce import MceRecord, Severity, mce_severity
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.kernel.mce import MCE_REENTRY_LIMIT, kill_me_maybe
from kvmpoison.mm.page import SetPageHWPoison
from kvmpoison.outcome import Halt, Kind, LivelockOn, McKind, Outcome
from kvmpoison.virt.kvm.kvm_main import Vm, check_guest_access, vcpu_run_refused
from kvmpoison.virt.kvm.x86.mmu import direct_page_fault, spte_present
from kvmpoison.virt.kvm.x86.paging_tmpl import paging64_page_fault, shadow_spte_pfn

MAX_RETRIES = 4


def kvm_machine_check(vm: Vm, pfn: int, rec: MceRecord) -> Outcome | None:
    """A machine-check VM exit of a non-TD guest; None means KVM re-enters the guest.

    ``handle_exception_nmi_irqoff`` (arch/x86/kvm/vmx/vmx.c, v5.12 and 6.x)
    calls ``kvm_machine_check()``, which runs ``do_machine_check`` with
    ``regs.cs = 3`` ("Fake ring 3 no matter what the guest ran on"); then
    ``handle_exception_nmi`` returns 1 and KVM re-enters the guest.
    ``do_machine_check`` (arch/x86/kernel/cpu/mce/core.c) grades the error as
    a user-mode one and queues ``kill_me_maybe`` as task work, which runs
    before the next VM entry (``xfer_to_guest_mode_handle_work``). A signal
    it leaves pending makes KVM_RUN return -EINTR instead of entering: the
    VMM then takes that signal. Without CONFIG_MEMORY_FAILURE the severity
    table has no AR rows: an SRAR error is "Action required: unknown MCACOD",
    a panic.
    """
    sev = mce_severity(rec, kernel_mode=False, memory_failure=vm.core.kcfg.memory_failure)
    if sev is Severity.PANIC:
        raise Halt(Outcome.panic("Fatal machine check on a VM exit (no CONFIG_MEMORY_FAILURE: "
                                 "Action required: unknown MCACOD)", rec))
    if sev is not Severity.AR:
        return None  # KEEP/AO/UCNA: logged, the guest goes on
    task = vm.vcpu_task
    before = len(task.pending)
    kill_me_maybe(vm.core, vm.vcpu_task, pfn, rec.mcg_status)  # task work of the vCPU thread
    if len(task.pending) > before:
        return Outcome.signal(task.pending[before], rec,
                              "#MC VM exit: the host's machine-check handler signalled the "
                              "vCPU thread; KVM_RUN returns -EINTR")
    return None


def _translate(vm: Vm, addr: int, write: bool) -> tuple[int, Outcome | None]:
    """The host pfn the EPT maps ``addr`` to, taking EPT violations as needed.

    ``kvm_mmu_page_fault`` calls ``vcpu->arch.mmu->page_fault``: ``direct_page_fault``
    with TDP (``tdp_enabled``, the module parameter ``ept``), ``FNAME(page_fault)`` of
    the shadow MMU without it (E27)."""
    if not vm.kvm.tdp_enabled:
        for _ in range(MAX_RETRIES):
            pfn = shadow_spte_pfn(vm, addr, write)
            if pfn is not None:
                return pfn, None
            failed = paging64_page_fault(vm, addr, write)
            if failed is not None:
                return -1, failed
        raise AssertionError(f"shadow page fault at {addr:#x} did not resolve")
    for _ in range(MAX_RETRIES):
        entry = spte_present(vm, addr, write)
        if entry is not None:
            return entry.pfn, None
        failed = direct_page_fault(vm, addr, write)
        if failed is not None:
            return -1, failed
    raise AssertionError(f"EPT fault at {addr:#x} did not resolve")


def vcpu_access(vm: Vm, gpa: int, size: int, data: bytes | None, shared: bool) -> Outcome:
    """One guest access; ``shared`` says the guest uses the shared (KeyID 0) alias."""
    refused = vcpu_run_refused(vm)
    if refused is not None:
        return refused
    check_guest_access(gpa, size)
    core = vm.core
    out: list[bytes] = []
    done = 0
    while done < size:
        addr = gpa + done
        n = min(PAGE_SIZE - (addr & (PAGE_SIZE - 1)), size - done)
        write = data is not None
        keyid = 0 if shared or vm.td_keyid is None else vm.td_keyid
        for _entry in range(MCE_REENTRY_LIMIT + 1):  # the first entry, then re-entries
            pfn, failed = _translate(vm, addr, write)
            if failed is not None:
                return failed
            pa = (pfn << PAGE_SHIFT) | (addr & (PAGE_SIZE - 1))
            if data is not None:
                core.hw.write(pa, data[done : done + n], keyid)
                break
            got = core.hw.load(pa, n, keyid, Ctx.TD if vm.td_keyid is not None else Ctx.GUEST)
            if got.kind is Kind.PANIC or got.kind is Kind.SHUTDOWN:
                raise Halt(got)
            if got.kind is Kind.OK:
                assert got.data is not None
                out.append(got.data)
                break
            if got.mc_kind is McKind.TD_FATAL:
                # Without LMCE the #MC is broadcast to every logical CPU: every TD that
                # runs takes it and the TDX module marks each FATAL (hardware model).
                hit = [vm] if core.hw.cfg.lmce else [v for v in vm.kvm.vms
                                                    if v.td_keyid is not None and not v.dead]
                for td in hit:
                    td.td_fatal = True
                core.mce_log.append(pfn)  # the host's SEAM_NR handling logs it
                SetPageHWPoison(core.pages[pfn])  # and marks the page
                return got
            assert got.kind is Kind.MCE and got.mce is not None, got
            stopped = kvm_machine_check(vm, pfn, got.mce)
            if stopped is not None:
                return stopped
        else:
            return Outcome.livelocked(
                LivelockOn.MCE, got.mce,
                f"the vCPU took the same #MC at pa {pa:#x} on {MCE_REENTRY_LIMIT + 1} entries: "
                "memory_failure() handled nothing and KVM re-enters the guest forever")
        done += n
    return Outcome.ok(b"".join(out) if data is None else None)
