"""KVM's side of the RFC next to its patches (RFC v1 7/7, v2 13/13, on v5.12): references
KVM keeps, what KVM_HC_MEM_SHARE faults in, v1's zero page, unprotected reads, memslots."""

import errno

import pytest

from kvmpoison.arch.x86.pgtable import pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW
from kvmpoison.config import Config
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.mm.page import PageHWPoison, page_count
from kvmpoison.outcome import Kind
from kvmpoison.virt.kvm.kvm_main import Vm
from kvmpoison.virt.kvm.mem_protected import kvm_share_memory
from kvmpoison.virt.kvm.x86.mmu import spte_present

PAGE = 4096
GPA = 0x30 * PAGE


def _two_vms_one_page() -> tuple[Machine, int]:
    """rfc-v2: VM b maps VM a's RAM file; a protects GPA first (E5)."""
    m = Machine(Config(design="rfc-v2"))
    b = m.add_vm(VmSpec(name="b", share_ram_with="vm0"))
    assert b.vmm.load(GPA, 8).kind is Kind.OK  # b's VMM maps the page: a hwpoison entry later
    assert m.guest.store(GPA, b"a's page").kind is Kind.OK
    spte = spte_present(m.vm, GPA, False)
    assert spte is not None
    return m, spte.pfn


def test_another_vms_fault_leaks_the_gup_reference() -> None:
    """hva_to_pfn_slow returns -EHWPOISON for !kvm_page_allowed without put_page."""
    m, pfn = _two_vms_one_page()
    b = m.instances["b"]
    page = m.kernel.core.pages[pfn]
    before = page_count(page)
    assert b.guest.load(GPA, 8).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert page_count(page) == before + 1
    assert b.vm.read_guest(GPA, 8) == -errno.EFAULT  # copy_from_guest: the same leak
    assert page_count(page) == before + 2


def test_kvm_protect_pfn_refusal_leaks_the_reference() -> None:
    """A page that is not swap-backed (a regular file) is refused before kvm_release_pfn_clean."""
    m = Machine(Config(design="rfc-v2", backing="file"))
    out = m.guest.store(GPA, b"x")
    assert out.cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert m.vmm.ram_fd is not None
    mapping = m.vmm.proc.task.fds[m.vmm.ram_fd].f_mapping
    assert mapping is not None
    pfn = mapping.lookup(GPA // PAGE)
    assert pfn is not None
    page = m.kernel.core.pages[pfn]
    mapped_and_cached = 2  # page cache + the VMM's PTE
    assert page_count(page) == mapped_and_cached + 1


def test_mem_share_write_faults_the_shared_pages() -> None:
    """gfn_to_page() is a write fault: anonymous swiotlb pages get their own frame, writable."""
    for design in ("rfc-v1", "rfc-v2"):
        m = Machine(Config(design=design, backing="anon"))
        pte = m.vmm.proc.mm.pgd.get(m.vmm.gpa_to_hva(m.guest.layout.swiotlb_gpa))
        assert pte_present(pte) and pte & _PAGE_RW
        assert pte_pfn(pte) != m.kernel.core.zero_pfn


def test_mem_share_arguments_are_unsigned_long() -> None:
    m = Machine(Config(design="rfc-v2"))
    ranges = list(m.vm.shared_ranges)
    assert kvm_share_memory(m.vm, (1 << 64) - 1, 2) == 0  # wraps: nothing shared
    assert kvm_share_memory(m.vm, 0x100, 0) == 0
    assert m.vm.shared_ranges == ranges
    assert kvm_share_memory(m.vm, 0x2000, 1 << 60) == 0  # bounded by the memslots, not npages
    assert (0x2000, 0x2000 + (1 << 60)) in m.vm.shared_ranges


def test_v1_poisons_the_zero_page_of_a_read_only_private_gfn() -> None:
    """RFCv1 has no is_zero_pfn() test: PageReserved passes its VM_BUG_ON_PAGE."""
    for design, poisoned in (("rfc-v1", True), ("rfc-v2", False)):
        m = Machine(Config(design=design, backing="anon"))
        assert m.guest.load(GPA, 8).cell == "ok"
        zero = m.kernel.core.pages[m.kernel.core.zero_pfn]
        spte = spte_present(m.vm, GPA, False)
        assert spte is not None and spte.pfn == m.kernel.core.zero_pfn
        assert PageHWPoison(zero) is poisoned


def test_unprotected_vm_on_the_rfc_kernel_reads_a_failed_copy_as_success() -> None:
    """kvm_read_guest_page returns copy_from_guest's positive 'bytes left' and kvm_read_guest
    only fails on a negative value."""
    m = Machine(Config(design="rfc-v2"))
    assert m.guest.store(GPA, b"secret").kind is Kind.OK  # the VMM's PTE is a hwpoison entry
    unprotected = m.new_vm(m.vmm)
    assert not unprotected.mem_protected
    assert unprotected.read_guest(GPA, 8) == bytes(8)
    assert unprotected.write_guest(GPA, b"x") == -errno.EFAULT


def test_memslot_delete_and_modify_follow_kvm_set_memory_region() -> None:
    m = Machine(Config(design="baseline"))
    vm, hva = m.vm, m.vmm.ram_hva
    assert vm.set_user_memory_region(7, 1 << 32, 0, 0) == -errno.EINVAL  # no such slot
    size = m.vmm.ram_size
    assert m.guest.store(GPA, b"x").kind is Kind.OK
    assert vm.set_user_memory_region(0, 0, size, hva) == 0  # nothing changes: SPTEs stay
    assert spte_present(vm, GPA, False) is not None
    assert vm.set_user_memory_region(0, 0, size, hva + PAGE) == -errno.EINVAL  # new hva
    assert vm.set_user_memory_region(0, 0, size - PAGE, hva) == -errno.EINVAL  # new size
    assert vm.set_user_memory_region(0, 1 << 32, size, hva) == 0  # KVM_MR_MOVE: zapped
    assert spte_present(vm, GPA, False) is None and vm.gfn_to_memslot(0x30) is None


def test_hypercall_return_values() -> None:
    from kvmpoison.virt.kvm.x86.hypercall import KVM_ENOSYS, kvm_emulate_hypercall

    for design in ("baseline", "rfc-v2"):
        vm = Machine(Config(design=design)).vm
        assert [kvm_emulate_hypercall(vm, nr) for nr in (1, 5, 11)] == [0, 0, 0]
        assert kvm_emulate_hypercall(vm, 2) == -KVM_ENOSYS  # KVM_HC_MMU_OP: long gone
        expect_share = -KVM_ENOSYS if design == "baseline" else 0
        assert kvm_emulate_hypercall(vm, 13, 0x20, 1) == expect_share


def test_spte_values_are_make_spte_s() -> None:
    """EPT with A/D: R|W|X, WB|IPAT, A (fault only), D (writable), host/MMU-writable bits."""
    from kvmpoison.kconfig import KernelConfig, KernelVersion

    m = Machine(Config(design="baseline"))
    for i in range(2):
        m.vmm.store(0x40 * PAGE + i * PAGE, b"\x01")
    m.guest.load(0x41 * PAGE, 1)  # faults 0x41, prefetches 0x40
    pfn41, pfn40 = (int(m.vm.ept.get(g * PAGE)) >> 12 & ((1 << 40) - 1) for g in (0x41, 0x40))
    assert m.vm.ept.get(0x41 * PAGE) == pfn41 << 12 | 0xF77
    assert m.vm.ept.get(0x40 * PAGE) == pfn40 << 12 | 0xE77  # speculative: no accessed bit
    m = Machine(Config(design="baseline", kernel=KernelConfig(version=KernelVersion.V6_18)))
    m.guest.store(GPA, b"x")
    pfn = int(m.vm.ept.get(GPA)) >> 12 & ((1 << 40) - 1)
    assert m.vm.ept.get(GPA) == pfn << 12 | 0xB77 | 3 << 57


def test_a_guest_sharing_a_huge_range_stays_cheap() -> None:
    """KVM_HC_MEM_SHARE with npages near 2^60: KVM walks memslot gfns only, the guest ranges."""
    m = Machine(Config(design="rfc-v2"))
    assert m.guest.share(0x100, 1 << 60) == 0
    assert m.guest.store(0x100 * PAGE, b"shared").kind is Kind.OK
    assert m.vmm.load(0x100 * PAGE, 6).data == b"shared"  # still mapped in the VMM


def test_mem_share_walks_only_mapped_memslot_gfns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memslot of 2^31-1 pages over unmapped hvas: sharing all of it costs the mapped part."""
    m = Machine(Config(design="rfc-v2"))
    vm = m.vm
    npages = (1 << 31) - 1
    assert vm.set_user_memory_region(1, 1 << 40, npages << 12, 1 << 44) == 0
    calls: list[int] = []
    real = Vm.hva_to_pfn

    def spy(self: Vm, hva: int, write: bool) -> int:
        calls.append(hva)
        return real(self, hva, write)

    monkeypatch.setattr(Vm, "hva_to_pfn", spy)
    # The per-page loop (bulk=False) calls gfn_to_page for each gfn it walks.
    assert kvm_share_memory(vm, 1 << 28, npages, bulk=False) == 0
    assert calls == []  # nothing of slot 1 is mapped in the VMM
    assert kvm_share_memory(vm, 0x40, 2, bulk=False) == 0
    assert calls == [m.vmm.gpa_to_hva(0x40 * PAGE), m.vmm.gpa_to_hva(0x41 * PAGE)]


def test_user_memslot_ids_per_version() -> None:
    """SHRT_MAX - KVM_PRIVATE_MEM_SLOTS (32764 on x86) from v5.12 (4fc096a99e01, "KVM: Raise
    the maximum number of user memslots", in the first KVM pull for 5.12); 509 up to v5.11."""
    from kvmpoison.kconfig import KernelConfig, KernelVersion

    for kernel, ok in ((None, False), (KernelConfig(version=KernelVersion.V6_18), True)):
        m = Machine(Config(design="baseline", kernel=kernel))
        assert m.vm.set_user_memory_region(509, 1 << 32, PAGE, m.vmm.ram_hva) == 0
        assert m.vm.set_user_memory_region(32763, 1 << 34, PAGE, m.vmm.ram_hva) == 0
        assert m.vm.set_user_memory_region(32764, 1 << 33, PAGE, m.vmm.ram_hva) == -errno.EINVAL
        beyond = m.vm.set_user_memory_region(5, 1 << 50, PAGE, m.vmm.ram_hva)  # > max gfn
        assert beyond == (-errno.EINVAL if ok else 0)
