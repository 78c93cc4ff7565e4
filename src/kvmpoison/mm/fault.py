"""The x86 page-fault entry: from a faulting access to ``handle_mm_fault`` and back.

Follows ``arch/x86/mm/fault.c`` (v5.12 ``do_user_addr_fault``, ``access_error``,
``mm_fault_error``, ``do_sigbus``; v6.18 is the same for these paths). A
user-mode fault that cannot be resolved ends in a signal, returned as an
:class:`~kvmpoison.outcome.Outcome`; a kernel-mode (uaccess) fault ends in
the exception-table fixup, which the caller sees as "not copied".

Translations are looked up in the CPU's TLB first and filled on a
successful walk, so a PTE change without a flush is visible to later
accesses from that CPU. The walk sets the PTE's Accessed bit, and Dirty on
a write, as the x86 page walker does; a write through a cached clean
translation walks again to set Dirty.
"""

from __future__ import annotations

import bisect
import signal

from kvmpoison.arch.x86.pgtable import pte_present, pte_protnone
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SHIFT,
)
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.huge_memory import huge_pmd_subpage_pte, pmd_trans_huge
from kvmpoison.mm.memory import handle_mm_fault
from kvmpoison.mm.mm_types import (
    VM_WRITE_I,
    FaultFlag,
    MmStruct,
    Vma,
    VmFault,
    vma_is_accessible,
)
from kvmpoison.outcome import Outcome
from kvmpoison.uapi.siginfo import BusCode, SegvCode, SigInfo

MAX_FAULT_RETRIES = 3


def find_vma(mm: MmStruct, addr: int) -> Vma | None:
    """mm/mmap.c ``find_vma`` (v5.12): the first VMA with ``vm_end > addr``."""
    i = bisect.bisect_right([v.vm_end for v in mm.vmas], addr)
    return mm.vmas[i] if i < len(mm.vmas) else None


def vma_lookup(mm: MmStruct, addr: int) -> Vma | None:
    """include/linux/mm.h ``vma_lookup`` (v5.14; v5.12 open-codes it): the VMA holding ``addr``."""
    vma = find_vma(mm, addr)
    return vma if vma is not None and vma.vm_start <= addr else None


def pte_allows(pte: int, write: bool) -> bool:
    """``pte_access_permitted`` for a user access (pkeys not modelled)."""
    need = _PAGE_PRESENT | _PAGE_USER | (_PAGE_RW if write else 0)
    return (pte & need) == need


def access_error(write: bool, protection: bool, vma: Vma) -> bool:
    """arch/x86/mm/fault.c ``access_error`` (v5.12), without protection keys."""
    if write:
        return not int(vma.vm_flags) & VM_WRITE_I
    if protection:
        return True  # read of a present but protected page (e.g. PROT_NONE)
    return not vma_is_accessible(vma)


def mm_fault_error(fault: VmFault, address: int, memory_failure: bool) -> Outcome:
    """arch/x86/mm/fault.c ``mm_fault_error``/``do_sigbus`` (v5.12): the signal a
    user-mode fault ends with. Simplified: VM_FAULT_OOM kills the faulting
    task (the kernel runs the OOM killer and retries).
    """
    if fault & VmFault.OOM:
        return Outcome.signal(SigInfo(signal.SIGKILL, 0, address), detail="pagefault_out_of_memory")
    if fault & (VmFault.HWPOISON | VmFault.HWPOISON_LARGE) and memory_failure:
        info = SigInfo(signal.SIGBUS, BusCode.BUS_MCEERR_AR, address, PAGE_SHIFT)
        return Outcome.signal(info, detail="MCE: Killing due to hardware memory corruption fault")
    if fault & (VmFault.SIGBUS | VmFault.HWPOISON | VmFault.HWPOISON_LARGE):
        return Outcome.signal(SigInfo(signal.SIGBUS, BusCode.BUS_ADRERR, address))
    return Outcome.signal(SigInfo(signal.SIGSEGV, SegvCode.SEGV_MAPERR, address))


# do_user_addr_fault's fault flags by (user_mode, write), and the faults that end it with a
# signal: built once (IntFlag arithmetic is slow on a per-fault path).
_NONE = FaultFlag(0)
_USER_FAULT_FLAGS = {(u, w): FaultFlag.ALLOW_RETRY | FaultFlag.KILLABLE
                     | (FaultFlag.USER if u else _NONE) | (FaultFlag.WRITE if w else _NONE)
                     for u in (False, True) for w in (False, True)}
_FAULT_SIGNALS = int(VmFault.OOM | VmFault.SIGBUS | VmFault.SIGSEGV | VmFault.HWPOISON
                     | VmFault.HWPOISON_LARGE)


def do_user_addr_fault(mm: MmStruct, address: int, write: bool, user_mode: bool,
                       protection: bool) -> Outcome | None:
    """arch/x86/mm/fault.c ``do_user_addr_fault`` (v5.12): handle one fault; None
    when resolved (retry the access), else how it ends.

    For a kernel-mode fault the returned Outcome only says that the fixup ran;
    no signal is sent. Not modelled: VM_GROWSDOWN stack expansion.
    """
    vma = find_vma(mm, address)
    if vma is None or vma.vm_start > address:
        return Outcome.signal(SigInfo(signal.SIGSEGV, SegvCode.SEGV_MAPERR, address))
    if access_error(write, protection, vma):
        return Outcome.signal(SigInfo(signal.SIGSEGV, SegvCode.SEGV_ACCERR, address))
    fault = handle_mm_fault(vma, address, _USER_FAULT_FLAGS[user_mode, write])
    if int(fault) & _FAULT_SIGNALS:
        return mm_fault_error(fault, address, mm.core.kcfg.memory_failure)
    return None


def _walk_huge_pmd(mm: MmStruct, address: int, pmd: int, write: bool) -> int:
    """The page walker on a huge PMD: set Accessed (and Dirty on a write) in the PMD
    when it allows the access; the 4 KiB view of the subpage is what the TLB keeps."""
    if pte_allows(pmd, write):
        ad = _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
        if pmd & ad != ad:
            pmd |= ad
            mm.pgd.set_pmd(address, pmd)
    return huge_pmd_subpage_pte(pmd, address)


def translate(mm: MmStruct, cpu: Cpu | None, address: int, write: bool,
              user_mode: bool) -> tuple[int, Outcome | None]:
    """Find the pfn a CPU access at ``address`` reaches, faulting as needed.

    Returns (pfn, None) or (-1, outcome-of-the-failed-fault).
    """
    for _ in range(MAX_FAULT_RETRIES):
        pte = cpu.tlb.lookup(mm.ident, address) if cpu is not None else None
        if pte is None or not pte_allows(pte, write) or (write and not pte & _PAGE_DIRTY):
            pte = mm.pgd.get(address)
            if not pte and mm.pgd.nr_pmd_leaves:
                pmd = mm.pgd.pmd_leaf(address)
                if pmd_trans_huge(pmd):  # a 2 MiB translation
                    pte = _walk_huge_pmd(mm, address, pmd, write)
            if pte_allows(pte, write):
                # The page walker sets Accessed, and Dirty on a write (SDM 4.8).
                ad = _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
                if pte & ad != ad:
                    pte |= ad
                    mm.pgd.set(address, pte)
                if cpu is not None:
                    cpu.tlb.fill(mm.ident, address, pte)
            else:
                protection = pte_present(pte) and not pte_protnone(pte)
                failed = do_user_addr_fault(mm, address, write, user_mode, protection)
                if failed is not None:
                    return -1, failed
                continue
        return (pte >> PAGE_SHIFT) & ((1 << 40) - 1), None
    raise AssertionError(f"fault at {address:#x} did not resolve after {MAX_FAULT_RETRIES} tries")
