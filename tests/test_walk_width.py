"""Page-table walks stay inside the 48 bits a 4-level table translates (issue 9's walk bug)."""

import pytest

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm.pagetable import ADDRESS_BITS, AddressWidthError, PageTables
from kvmpoison.virt.kvm.mem_protected import kvm_protect_memory
from kvmpoison.virt.kvm.x86.mmu import spte_present

PAGE = 4096


def test_a_walk_beyond_48_bits_refuses_instead_of_wrapping() -> None:
    m = Machine(Config(design="baseline"))
    ept = m.vm.ept
    assert m.guest.store(0, b"x").succeeded and ept.get(0) != 0
    with pytest.raises(AddressWidthError):
        ept.get(1 << ADDRESS_BITS)  # used to alias gpa 0 through PGD index 0
    with pytest.raises(AddressWidthError):
        list(ept.chunks(0, 1 << 52))
    assert list(ept.chunks((1 << ADDRESS_BITS) - PAGE, 1 << ADDRESS_BITS)) == []


def test_kvm_protect_memory_zaps_every_memslot_and_walks_no_further(
        monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(Config(design="rfc-v2"))
    vm = m.vm
    gpa = 0x30 * PAGE
    assert m.guest.store(gpa, b"x").succeeded and spte_present(vm, gpa, False) is not None
    ends: list[int] = []
    real = PageTables.chunks

    def spy(self: PageTables, start: int, end: int, alloc: bool = False):  # type: ignore[no-untyped-def]
        ends.append(end)
        return real(self, start, end, alloc)

    monkeypatch.setattr(PageTables, "chunks", spy)
    assert kvm_protect_memory(vm) == 0
    slot_end = max(s.base_gfn + s.npages for s in vm.memslots) << PAGE_SHIFT
    assert ends and max(ends) <= slot_end  # bounded by the memslots, not 2^52
    for s in vm.memslots:
        for chunk in vm.ept.chunks(s.base_gfn << PAGE_SHIFT, (s.base_gfn + s.npages) << PAGE_SHIFT):
            assert not vm.ept.store.rows[chunk.rows, chunk.cols].any()


def test_a_memslot_above_the_ept_range_deletes_cleanly() -> None:
    m = Machine(Config(design="baseline"))
    vm, hva = m.vm, m.vmm.ram_hva
    high = 1 << 50  # KVM accepts the slot; no SPTE can exist for it
    assert vm.set_user_memory_region(5, high, 4 * PAGE, hva) == 0
    assert vm.set_user_memory_region(5, high, 0, hva) == 0


def test_a_guest_access_above_48_bits_is_refused_as_bad_input() -> None:
    """A memslot KVM accepts above the EPT's reach: the guest cannot address it."""
    m = Machine(Config(design="baseline"))
    assert m.vm.set_user_memory_region(5, 1 << 50, 4 * PAGE, m.vmm.ram_hva) == 0
    with pytest.raises(ValueError, match="48-bit"):
        m.guest.load(1 << 50, 8)
