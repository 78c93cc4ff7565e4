"""The TDP fault path of a VM with private memory, and its vCPU accesses (v6.18).

Follows ``arch/x86/kvm/mmu/mmu.c`` (v6.18): ``kvm_mmu_faultin_pfn`` first
compares the fault's privacy with the gfn's attribute and, on a mismatch,
``kvm_mmu_prepare_memory_fault_exit`` fills KVM_EXIT_MEMORY_FAULT (gpa,
PAGE_SIZE, KVM_MEMORY_EXIT_FLAG_PRIVATE for a private access) and KVM_RUN
returns -EFAULT. A private fault goes to ``kvm_mmu_faultin_pfn_gmem``:
no guest_memfd on the slot is the same exit; otherwise ``kvm_gmem_get_pfn``
serves the page (an error there is the exit too, and KVM_RUN returns that
error, e.g. -EHWPOISON). A shared fault goes to the VMM's ``userspace_addr``
through ``hva_to_pfn`` as before 6.18, unless the slot's guest_memfd was
created with GUEST_MEMFD_FLAG_MMAP (``kvm_memslot_is_gmem_only``): then
guest_memfd serves shared faults too.

The privacy of an access comes from the guest, as TDX's shared-GPA bit does
(SNP's C-bit likewise): the model's guest says whether it uses the shared
alias. The VMM's exit handler runs where KVM_RUN would return; the access is
retried when it answers 0 (QEMU re-enters KVM_RUN after converting).
Shared faults map 2M SPTEs over a PMD-mapped THP whose 2 MiB of gfns are all
shared (``kvm_mmu_hugepage_adjust``); private SPTEs are 4K (guest_memfd folios
are order 0 here). Simplified: no prefetch of neighbouring SPTEs.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.integrity import WriteHow
from kvmpoison.arch.x86.pgtable import pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.arch.x86.vmx import EptEntry, ept_leaf
from kvmpoison.mm.page import SetPageHWPoison, put_page
from kvmpoison.outcome import Halt, Kind, McKind, Outcome
from kvmpoison.uapi.errno import errno_name
from kvmpoison.virt.kvm.gmem_memslot import (
    SPTE_PRIVATE,
    kvm_gmem_get_pfn,
    kvm_mem_is_private,
    kvm_memslot_is_gmem_only,
    kvm_slot_has_gmem,
)
from kvmpoison.virt.kvm.kvm_main import (
    PG_LEVEL_4K,
    Vm,
    check_guest_access,
    ept_spte_4k,
    is_error_pfn,
    kvm_pfn_to_refcounted_page,
    vcpu_run_refused,
)
from kvmpoison.virt.kvm.private_mem import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    GmemVm,
    KvmExit,
)
from kvmpoison.virt.kvm.x86.mmu import (
    KVM_MAX_HUGEPAGE_LEVEL,
    install_spte,
    kvm_handle_bad_page,
    kvm_mmu_hugepage_adjust,
)

MAX_RETRIES = 4


def kvm_prepare_memory_fault_exit(gpa: int, is_private: bool) -> KvmExit:
    return KvmExit(KVM_EXIT_MEMORY_FAULT, gpa=gpa & ~(PAGE_SIZE - 1), size=PAGE_SIZE,
                   flags=KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0)


def _state(vm: Vm) -> GmemVm:
    assert vm.gmem is not None, "a gmem fault on a VM without private memory"
    return vm.gmem


def _tdh_mem_page_aug(vm: Vm, pfn: int) -> None:
    """A TD's first private mapping of a frame: the TDX module zeroes it under the TD's KeyID."""
    if vm.td_keyid is None or pfn in vm.td_pages:
        return
    vm.core.hw.write(pfn << PAGE_SHIFT, bytes(PAGE_SIZE), vm.td_keyid, WriteHow.MOVDIR64B)
    vm.td_pages.add(pfn)


def kvm_tdp_page_fault(vm: Vm, gpa: int, write: bool,
                       is_private: bool) -> tuple[KvmExit, int] | Outcome | None:
    """Resolve one EPT violation: None when the SPTE is set, an exit plus -errno, or an outcome."""
    _state(vm)  # a VM with private memory only
    gfn = gpa >> PAGE_SHIFT
    if is_private != kvm_mem_is_private(vm, gfn):
        return kvm_prepare_memory_fault_exit(gpa, is_private), -errno.EFAULT
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return Outcome.error(errno.EFAULT, f"no memslot for gpa {gpa:#x} (an MMIO exit)")
    if is_private or kvm_memslot_is_gmem_only(slot):  # kvm_mmu_faultin_pfn_gmem
        if not kvm_slot_has_gmem(slot):
            return kvm_prepare_memory_fault_exit(gpa, is_private), -errno.EFAULT
        pfn, err = kvm_gmem_get_pfn(vm, slot, gfn)
        if err:
            return kvm_prepare_memory_fault_exit(gpa, is_private), err
        if is_private:
            _tdh_mem_page_aug(vm, pfn)
        vm.ept.set(gfn << PAGE_SHIFT, ept_leaf(pfn, writable=True)
                   | (SPTE_PRIVATE if is_private else 0))
        return None
    hva = slot.gfn_to_hva(gfn)
    pfn = vm.hva_to_pfn(hva, write)
    if is_error_pfn(pfn):
        return kvm_handle_bad_page(vm, hva, pfn)
    # A shared fault maps at the level kvm_mmu_hugepage_adjust allows: 2M over a
    # PMD-mapped THP whose 2 MiB of gfns are all shared (KVM_LPAGE_MIXED_FLAG).
    level, map_pfn = kvm_mmu_hugepage_adjust(vm, gfn, KVM_MAX_HUGEPAGE_LEVEL, pfn)
    host_pte = vm.mm.pgd.get(hva) if level == PG_LEVEL_4K else vm.mm.pgd.pmd_leaf(hva)
    writable = write or (pte_present(host_pte) and bool(host_pte & _PAGE_RW))
    install_spte(vm, gfn, level, ept_leaf(map_pfn, writable=writable,
                                          large=level > PG_LEVEL_4K))
    page = kvm_pfn_to_refcounted_page(vm, pfn)  # None: a PFNMAP pfn (E25)
    if page is not None:
        put_page(page)  # kvm_release_faultin_page
    return None


def _spte(vm: Vm, gpa: int, write: bool, is_private: bool) -> EptEntry | None:
    """The SPTE the access would use: private accesses use private SPTEs only, and back."""
    raw = ept_spte_4k(vm.ept, gpa) if vm.ept.nr_pmd_leaves else vm.ept.get(gpa & ~(PAGE_SIZE - 1))
    if not raw or bool(raw & SPTE_PRIVATE) != is_private:
        return None
    entry = EptEntry.decode(raw)
    if not entry.present or (write and not entry.flags & 0x2):
        return None
    return entry


def _fault_in(vm: Vm, gpa: int, write: bool, is_private: bool) -> EptEntry | Outcome:
    state = _state(vm)
    for _ in range(MAX_RETRIES):
        entry = _spte(vm, gpa, write, is_private)
        if entry is not None:
            return entry
        got = kvm_tdp_page_fault(vm, gpa, write, is_private)
        if isinstance(got, Outcome):
            return got
        if got is None:
            continue
        ex, err = got
        handled = state.exit_to_userspace(ex) if err == -errno.EFAULT else None
        if handled != 0:
            return Outcome.error(-err, f"{ex.describe()}: KVM_RUN returns -{errno_name(-err)}")
    raise AssertionError(f"gmem fault at {gpa:#x} did not resolve")


def gmem_vcpu_access(vm: Vm, gpa: int, size: int, data: bytes | None,
                     shared: bool) -> Outcome:
    """One guest access of a VM with private memory (``shared``: the shared alias)."""
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
        entry = _fault_in(vm, addr, data is not None, not shared)
        if isinstance(entry, Outcome):
            return entry
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
                    core.mce_log.append(entry.pfn)  # the host's SEAM_NR handling
                    SetPageHWPoison(core.pages[entry.pfn])
                return got
            assert got.data is not None
            out.append(got.data)
        done += n
    return Outcome.ok(b"".join(out) if data is None else None)
