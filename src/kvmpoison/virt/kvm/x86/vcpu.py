"""A vCPU's loads and stores at guest-physical addresses, through the EPT.

The access walks the VM's EPT, takes EPT violations through
``direct_page_fault``, and reaches memory under the TD's private KeyID (or
KeyID 0 for a shared gfn, or for a VM that is not a TD). Consumed poison
ends as the hardware and the host decide (``consume_poison``): for a TD, a
recoverable #MC that makes the TD fatal; the host marks the page HWPoison.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.mm.page import SetPageHWPoison
from kvmpoison.outcome import Halt, Kind, McKind, Outcome
from kvmpoison.virt.kvm.kvm_main import Vm
from kvmpoison.virt.kvm.x86.mmu import direct_page_fault, spte_present

MAX_RETRIES = 4


def vcpu_access(vm: Vm, gpa: int, size: int, data: bytes | None, shared: bool) -> Outcome:
    """One guest access; ``shared`` says the guest uses the shared (KeyID 0) alias."""
    if vm.td_fatal:
        return Outcome.machine_check(None, McKind.TD_FATAL,
                                     "TDH.VP.ENTER: TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE")
    if not vm.vcpu_task.alive:
        if vm.vcpu_task.exit_signal is not None:
            return Outcome.signal(vm.vcpu_task.exit_signal, detail="the VMM is dead")
        return Outcome.error(errno.ESRCH, "the VMM is gone")
    core = vm.core
    out: list[bytes] = []
    done = 0
    while done < size:
        addr = gpa + done
        n = min(PAGE_SIZE - (addr & (PAGE_SIZE - 1)), size - done)
        write = data is not None
        for _ in range(MAX_RETRIES):
            entry = spte_present(vm, addr, write)
            if entry is not None:
                break
            failed = direct_page_fault(vm, addr, write)
            if failed is not None:
                return failed
        else:
            raise AssertionError(f"EPT fault at {addr:#x} did not resolve")
        pa = (entry.pfn << PAGE_SHIFT) | (addr & (PAGE_SIZE - 1))
        keyid = 0 if shared or vm.td_keyid is None else vm.td_keyid
        if data is not None:
            core.hw.write(pa, data[done : done + n], keyid)
        else:
            got = core.hw.load(pa, n, keyid, Ctx.TD if vm.td_keyid is not None else Ctx.GUEST)
            if got.kind is Kind.PANIC or got.kind is Kind.SHUTDOWN:
                raise Halt(got)
            if got.kind is not Kind.OK:
                if got.mc_kind is McKind.TD_FATAL:
                    vm.td_fatal = True
                    SetPageHWPoison(core.pages[entry.pfn])  # the host's SEAM_NR handling
                return got
            assert got.data is not None
            out.append(got.data)
        done += n
    return Outcome.ok(b"".join(out) if data is None else None)
