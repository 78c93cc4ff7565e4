"""Random guest and VMM activity on THP-backed guest RAM: the EPT never keeps a stale entry.

After every step, each gfn the EPT translates (a 4K SPTE, or a subpage of a 2M
one) reaches the frame the VMM's page tables map at that gfn's address (a PTE,
or the subpage of a huge PMD), and a writable SPTE only over a writable host
mapping. A missed zap on a partial invalidation, a 2M SPTE over a split PMD, or
a wrong subpage index breaks it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable import pmd_pfn, pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_PSE, _PAGE_RW, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.vmx import VMX_EPT_RWX_MASK, VMX_EPT_WRITABLE_MASK
from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.mm.huge_memory import deferred_split_scan
from kvmpoison.mm.khugepaged import khugepaged_scan
from kvmpoison.mm.madvise import MADV_DONTNEED
from kvmpoison.outcome import Kind
from kvmpoison.virt.kvm.kvm_main import ept_spte_4k

RAM = 8 << 20
PAGES = RAM >> PAGE_SHIFT
PROT_READ, PROT_RW = 1, 3

op = st.one_of(
    st.tuples(st.just("vmm_store"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("guest_load"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("guest_store"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("dontneed"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("readonly"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("khugepaged"), st.just(0)),
    st.tuples(st.just("deferred_split"), st.just(0)),
)


def _host_pfn(m: Machine, gfn: int) -> tuple[int, bool] | None:
    mm = m.vmm.proc.task.mm
    assert mm is not None
    hva = m.vmm.gpa_to_hva(gfn << PAGE_SHIFT)
    pmd = mm.pgd.pmd_leaf(hva)
    if pmd & _PAGE_PSE:
        return pmd_pfn(pmd) + (gfn & 0x1FF), bool(pmd & _PAGE_RW)
    pte = mm.pgd.get(hva)
    return (pte_pfn(pte), bool(pte & _PAGE_RW)) if pte_present(pte) else None


def _check(m: Machine) -> None:
    for gfn in range(PAGES):
        spte = ept_spte_4k(m.vm.ept, gfn << PAGE_SHIFT)
        if not spte & VMX_EPT_RWX_MASK:
            continue
        host = _host_pfn(m, gfn)
        assert host is not None, f"gfn {gfn:#x}: an SPTE over no host mapping"
        assert (spte >> PAGE_SHIFT) & ((1 << 40) - 1) == host[0], f"gfn {gfn:#x}: stale pfn"
        assert host[1] or not spte & VMX_EPT_WRITABLE_MASK, f"gfn {gfn:#x}: writable SPTE"


def _step(m: Machine, name: str, page: int) -> bool:
    """Run one op; False when the VMM died (its store to a page it made read-only is a
    SIGSEGV that kills it), which ends the sequence."""
    gpa = page << PAGE_SHIFT
    hva = m.vmm.gpa_to_hva(gpa)
    if name == "vmm_store":
        return m.vmm.store(gpa, b"v").kind is not Kind.SIG
    elif name == "guest_load":
        assert m.guest.load(gpa, 1).kind is Kind.OK
    elif name == "guest_store":
        m.guest.store(gpa, b"g")  # a read-only host page: KVM_RUN's -EFAULT is fine here
    elif name == "dontneed":
        m.vmm.proc.madvise(hva, PAGE_SIZE, MADV_DONTNEED)
    elif name == "readonly":
        m.vmm.proc.mprotect(hva, PAGE_SIZE, PROT_READ)
    elif name == "khugepaged":
        khugepaged_scan(m.kernel.core)
    else:
        deferred_split_scan(m.kernel.core)
    return True


@settings(max_examples=25, deadline=5000)
@given(ops=st.lists(op, min_size=1, max_size=10), v6=st.booleans())
def test_no_stale_or_over_writable_spte_on_thp_ram(ops: list[tuple[str, int]], v6: bool) -> None:
    kernel = KernelConfig(version=KernelVersion.V6_18) if v6 else None
    m = Machine(Config(design="baseline", kernel=kernel, integrity=IntegrityMode.OFF),
                vms=[VmSpec(memory=RAM, backing="anon", thp=True)])
    for name, page in ops:
        alive = _step(m, name, page)
        _check(m)
        if not alive:
            break
