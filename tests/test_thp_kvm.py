"""KVM on THP-backed guest RAM: the SPTE level calculation, 2 MiB SPTEs, their zap on a
partial invalidation, and what the posted RFC (v1 7/7, v2 13/13) does to a THP."""

from __future__ import annotations

import numpy as np
import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable import pte_present
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.arch.x86.vmx import PT_PAGE_SIZE_MASK, VMX_EPT_WRITABLE_MASK
from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.matrix.designs import backing_pfn
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    deferred_split_scan,
    thp_pmd_mapping,
)
from kvmpoison.mm.madvise import MADV_DONTNEED
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import PageBuddy, PageHWPoison, PageLocked, SetPageHWPoison
from kvmpoison.mm.rmap import TTU, try_to_unmap
from kvmpoison.mm.swapops import is_hwpoison_entry, pte_to_swp_entry
from kvmpoison.outcome import Kind
from kvmpoison.scenario.loader import ScenarioError, load_text
from kvmpoison.scenario.runner import run_scenario
from kvmpoison.virt.kvm.kvm_main import (
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    Memslot,
    ept_spte,
)
from kvmpoison.virt.kvm.mem_protected import kvm_unpoison_page_hook
from kvmpoison.virt.kvm.x86.mmu import (
    KVM_MAX_HUGEPAGE_LEVEL,
    _td_add_page,
    _td_add_range,
    host_pfn_mapping_level,
    install_spte,
    kvm_mmu_hugepage_adjust,
    lpage_disallowed,
    make_spte,
    spte_present,
)

BASE = 0x400000  # the second 2 MiB of guest RAM: boot touches only the first
GFN = BASE >> PAGE_SHIFT
V6_18 = KernelConfig(version=KernelVersion.V6_18)


def thp_machine(design: str, thp: bool = True, kernel: KernelConfig | None = None) -> Machine:
    m = Machine(Config(design=design, kernel=kernel, integrity=IntegrityMode.OFF),
                vms=[VmSpec(memory=8 << 20, backing="anon", thp=thp)])
    assert m.vmm.store(BASE, b"vmm data").kind is Kind.OK  # one THP over [4M, 6M)
    return m


def _hwpoison(m: Machine, pte: int) -> bool:
    core = m.kernel.core
    return is_hwpoison_entry(pte_to_swp_entry(pte, core.kcfg), core.swap_types)


def vmm_mm(m: Machine) -> MmStruct:
    mm = m.vmm.proc.task.mm
    assert mm is not None
    return mm


def head_pfn(m: Machine) -> int:
    got = thp_pmd_mapping(vmm_mm(m), m.vmm.gpa_to_hva(BASE))
    assert got is not None, "guest RAM is not PMD-mapped"
    return got[0]


# -- the level calculation ----------------------------------------------------------------


def test_vmm_ram_is_2mib_aligned_and_a_write_maps_a_thp() -> None:
    m = thp_machine("baseline")
    assert m.vmm.ram_hva % HPAGE_PMD_SIZE == 0
    assert head_pfn(m) % HPAGE_PMD_NR == 0
    assert thp_pmd_mapping(vmm_mm(thp_machine("baseline", thp=False)),
                           m.vmm.gpa_to_hva(BASE)) is None


def test_lpage_info_disallows_misaligned_slot_edges_and_misaligned_hva() -> None:
    vm = thp_machine("baseline").vm
    hva = 0x7F0000000000
    aligned = Memslot(1, base_gfn=0x1000, npages=0x800, userspace_addr=hva)
    assert not lpage_disallowed(vm, aligned, 0x1205, PG_LEVEL_2M)
    # gfn and hva aligned differently: every 2M of the slot is disallowed.
    skew = Memslot(1, base_gfn=0x1001, npages=0x800, userspace_addr=hva)
    assert lpage_disallowed(vm, skew, 0x1405, PG_LEVEL_2M)
    # A slot starting and ending mid-2M (gfn and hva alike): only its first and last.
    mid = Memslot(1, base_gfn=0x1100, npages=0x600, userspace_addr=hva + (0x100 << PAGE_SHIFT))
    assert lpage_disallowed(vm, mid, 0x1100, PG_LEVEL_2M)
    assert not lpage_disallowed(vm, mid, 0x1300, PG_LEVEL_2M)
    assert lpage_disallowed(vm, mid, 0x16FF, PG_LEVEL_2M)
    assert lpage_disallowed(vm, aligned, 0x1205, 3)  # 1G: the slot is smaller


def test_host_pfn_mapping_level_reads_the_vmm_pmd() -> None:
    m = thp_machine("baseline")
    vm, slot = m.vm, m.vm.memslots[0]
    head = head_pfn(m)
    assert host_pfn_mapping_level(vm, GFN + 5, head + 5, slot) == PG_LEVEL_2M
    assert kvm_mmu_hugepage_adjust(vm, GFN + 5, KVM_MAX_HUGEPAGE_LEVEL, head + 5) == \
        (PG_LEVEL_2M, head)
    assert kvm_mmu_hugepage_adjust(vm, GFN + 5, PG_LEVEL_4K, head + 5) == (PG_LEVEL_4K, head + 5)
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, MADV_DONTNEED).value == 0
    # Split: the page is still compound (v5.12's PageCompound test passes) but PTE-mapped.
    assert m.kernel.core.pages.order[head + 5] == 9
    assert host_pfn_mapping_level(vm, GFN + 5, head + 5, slot) == PG_LEVEL_4K


def test_v5_12_skips_the_walk_for_a_small_page_and_6_18_walks() -> None:
    m = thp_machine("baseline", thp=False)
    slot = m.vm.memslots[0]
    pfn = int(m.vm.hva_to_pfn(m.vmm.gpa_to_hva(BASE), False))
    assert host_pfn_mapping_level(m.vm, GFN, pfn, slot) == PG_LEVEL_4K
    m18 = thp_machine("baseline", kernel=V6_18)
    head = head_pfn(m18)
    assert host_pfn_mapping_level(m18.vm, GFN + 7, head + 7, m18.vm.memslots[0]) == PG_LEVEL_2M


# -- 2 MiB SPTEs ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [None, V6_18], ids=["5.12", "6.18"])
def test_a_guest_fault_on_a_thp_maps_one_2m_spte(kernel: KernelConfig | None) -> None:
    m = thp_machine("baseline", kernel=kernel)
    head = head_pfn(m)
    got = m.guest.load(BASE + 0x5000, 4)
    assert got.kind is Kind.OK
    raw, level = ept_spte(m.vm.ept, BASE + 0x5000)
    assert level == PG_LEVEL_2M and raw & PT_PAGE_SIZE_MASK and raw & VMX_EPT_WRITABLE_MASK
    assert (raw >> PAGE_SHIFT) & ((1 << 40) - 1) == head
    # Every other gfn of the 2 MiB is translated without a fault, to its own subpage.
    entry = spte_present(m.vm, BASE + 0x1FF000, write=True)
    assert entry is not None and entry.pfn == head + 0x1FF
    assert m.guest.load(BASE, 8).data == b"vmm data"
    assert m.vm.ept.pte_slot(BASE) is None  # no 4K table under the leaf


def test_without_thp_the_same_fault_maps_4k() -> None:
    m = thp_machine("baseline", thp=False)
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    raw, level = ept_spte(m.vm.ept, BASE + 0x5000)
    assert level == PG_LEVEL_4K and raw and not raw & PT_PAGE_SIZE_MASK
    assert m.vm.ept.nr_pmd_leaves == 0


def test_a_partial_invalidation_zaps_the_whole_2m_spte() -> None:
    m = thp_machine("baseline")
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    hva = m.vmm.gpa_to_hva(BASE + 0x7000)
    m.vm.invalidate_range(hva, hva + 4096)  # one 4 KiB of the 2 MiB
    for gpa in (BASE, BASE + 0x5000, BASE + 0x7000, BASE + 0x1FF000):
        assert ept_spte(m.vm.ept, gpa)[0] == 0
    assert m.vm.ept.nr_pmd_leaves == 0


def test_a_host_split_zaps_the_2m_spte_and_the_refault_maps_4k() -> None:
    m = thp_machine("baseline")
    head = head_pfn(m)
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, MADV_DONTNEED).value == 0
    assert ept_spte(m.vm.ept, BASE + 0x5000)[0] == 0  # the split's notifier zapped it
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    raw, level = ept_spte(m.vm.ept, BASE + 0x5000)
    assert level == PG_LEVEL_4K and (raw >> PAGE_SHIFT) & ((1 << 40) - 1) == head + 5


def test_a_2m_spte_replaces_a_table_of_4k_sptes_and_a_4k_spte_drops_the_2m_one() -> None:
    m = thp_machine("baseline")
    vm, head = m.vm, head_pfn(m)
    install_spte(vm, GFN + 3, PG_LEVEL_4K, make_spte(vm, head + 3, True))
    assert ept_spte(vm.ept, BASE + 0x3000)[1] == PG_LEVEL_4K
    install_spte(vm, GFN + 3, PG_LEVEL_2M, make_spte(vm, head, True, level=PG_LEVEL_2M))
    assert ept_spte(vm.ept, BASE + 0x3000)[1] == PG_LEVEL_2M
    assert vm.ept.pte_slot(BASE) is None
    install_spte(vm, GFN + 9, PG_LEVEL_4K, make_spte(vm, head + 9, True))  # drop_large_spte
    assert vm.ept.nr_pmd_leaves == 0
    assert ept_spte(vm.ept, BASE + 0x3000)[0] == 0
    assert ept_spte(vm.ept, BASE + 0x9000)[1] == PG_LEVEL_4K


def test_gmem_maps_2m_only_over_an_all_shared_range() -> None:
    m = thp_machine("gmem")
    assert m.guest.share(GFN, HPAGE_PMD_NR) == 0
    assert m.vmm.store(BASE, b"vmm data").kind is Kind.OK  # the discard dropped the THP
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    assert ept_spte(m.vm.ept, BASE + 0x5000)[1] == PG_LEVEL_2M
    # One gfn private again: the attributes are mixed (KVM_LPAGE_MIXED_FLAG), 4K from now on.
    assert m.guest.map_gpa_range(GFN + 0x100, 1, private=True) == 0
    assert ept_spte(m.vm.ept, BASE + 0x5000)[0] == 0
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    assert ept_spte(m.vm.ept, BASE + 0x5000)[1] == PG_LEVEL_4K


# -- the posted RFC on a THP --------------------------------------------------------------------


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_protecting_a_tail_poisons_it_but_unmaps_nothing_and_maps_2m(design: str) -> None:
    m = thp_machine(design)
    head = head_pfn(m)
    mem = m.kernel.core.pages
    assert m.guest.store(BASE + 0x5000, b"guest secret").kind is Kind.OK
    assert PageHWPoison(mem[head + 5]) and not PageHWPoison(mem[head])
    assert not any(PageHWPoison(mem[head + i]) for i in range(6, HPAGE_PMD_NR))
    assert not PageLocked(mem[head])  # lock_page(tail) locked and unlocked the head
    owner = m.kvm.kvm_pfn_map.get(head + 5)
    assert owner == (m.vm.ident if design == "rfc-v2" else None)
    assert m.kvm.kvm_pfn_map.get(head) is None
    # try_to_unmap(tail) found no PTE: the VMM's huge PMD still maps all 512 subpages.
    assert head_pfn(m) == head
    assert m.vmm.load(BASE + 0x5000, 12).data == b"guest secret"
    assert ept_spte(m.vm.ept, BASE + 0x5000)[1] == PG_LEVEL_2M
    # A neighbour was never protected: the VMM's write reaches the guest.
    assert m.vmm.store(BASE + 0x6000, b"vmm").kind is Kind.OK
    assert m.guest.load(BASE + 0x6000, 3).data == b"vmm"


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_after_a_split_a_new_private_fault_unmaps_but_the_first_page_stays_mapped(
        design: str) -> None:
    m = thp_machine(design)
    head = head_pfn(m)
    assert m.guest.store(BASE + 0x5000, b"first").kind is Kind.OK
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, MADV_DONTNEED).value == 0
    assert m.guest.store(BASE + 0x7000, b"second").kind is Kind.OK
    mm = vmm_mm(m)
    pte7 = mm.pgd.get(m.vmm.gpa_to_hva(BASE + 0x7000))
    assert not pte_present(pte7) and _hwpoison(m, pte7)
    pte5 = mm.pgd.get(m.vmm.gpa_to_hva(BASE + 0x5000))
    assert pte_present(pte5) and (pte5 >> PAGE_SHIFT) & ((1 << 40) - 1) == head + 5
    assert m.vmm.load(BASE + 0x7000, 6).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert m.vmm.load(BASE + 0x5000, 5).data == b"first"


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_protecting_the_head_of_a_pmd_mapped_thp_oopses(design: str) -> None:
    m = thp_machine(design)
    got = m.guest.store(BASE, b"guest")
    assert got.kind is Kind.PANIC and "VM_BUG_ON_PAGE(!pvmw.pte)" in got.detail


def test_baseline_and_a_4k_backed_rfc_do_not_oops_on_the_same_gfn() -> None:
    assert thp_machine("baseline").guest.store(BASE, b"guest").kind is Kind.OK
    assert thp_machine("rfc-v2", thp=False).guest.store(BASE, b"guest").kind is Kind.OK


def test_ttu_split_huge_pmd_is_what_the_todo_needed() -> None:
    """With TTU_SPLIT_HUGE_PMD (which the RFC does not pass) try_to_unmap splits the PMD and
    replaces exactly the protected subpage's PTE with a hwpoison entry."""
    m = thp_machine("rfc-v2")
    head = head_pfn(m)
    page = m.kernel.core.pages[head + 5]
    SetPageHWPoison(page)
    try_to_unmap(page, TTU.IGNORE_MLOCK)
    assert head_pfn(m) == head  # without the flag: nothing happened
    try_to_unmap(page, TTU.IGNORE_MLOCK | TTU.SPLIT_HUGE_PMD)
    mm = vmm_mm(m)
    assert thp_pmd_mapping(mm, m.vmm.gpa_to_hva(BASE)) is None
    pte5 = mm.pgd.get(m.vmm.gpa_to_hva(BASE + 0x5000))
    assert _hwpoison(m, pte5)
    assert pte_present(mm.pgd.get(m.vmm.gpa_to_hva(BASE + 0x6000)))


def test_v2_unpoison_on_free_sees_only_the_head_of_a_freed_thp() -> None:
    m = thp_machine("rfc-v2")
    head = head_pfn(m)
    mem, buddy = m.kernel.core.pages, m.kernel.core.buddy
    assert m.guest.store(BASE + 0x5000, b"guest secret").kind is Kind.OK
    withheld, free_before = buddy.withheld_hwpoison, buddy.nr_free
    assert m.vmm.proc.munmap(m.vmm.gpa_to_hva(BASE), HPAGE_PMD_SIZE).value == 0
    assert mem._refcount[head] == 0  # the THP was freed
    # free_pages_prepare(head, 9) ran kvm_unpoison_page on the head only: the tail keeps
    # PG_hwpoison and its owner entry, and never reaches the free lists.
    assert PageHWPoison(mem[head + 5])
    assert m.kvm.kvm_pfn_map.get(head + 5) == m.vm.ident
    assert buddy.withheld_hwpoison == withheld + 1
    assert not PageBuddy(mem[head + 5])
    assert buddy.nr_free - free_before >= HPAGE_PMD_NR - 1  # the other 511 went back


def test_the_unpoison_hook_skips_tails_but_not_heads_or_small_pages() -> None:
    m = thp_machine("rfc-v2")
    head = head_pfn(m)
    mem, pfn_map = m.kernel.core.pages, m.kvm.kvm_pfn_map
    for pfn in (head, head + 5):
        SetPageHWPoison(mem[pfn])
        pfn_map.store(pfn, m.vm.ident)
    kvm_unpoison_page_hook(m.kvm)(np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64))
    assert not PageHWPoison(mem[head]) and pfn_map.get(head) is None
    assert PageHWPoison(mem[head + 5]) and pfn_map.get(head + 5) == m.vm.ident


def test_the_loader_accepts_thp_only_for_anonymous_ram() -> None:
    base = '[[vm]]\nname = "a"\nbacking = "{b}"\nthp = {t}\n[[step]]\nactor = "guest:a"\n' \
        'op = "load"\ngpa = 0x400000\n'
    sc = load_text(base.format(b="anon", t="true"), "x.toml")
    assert sc.vms[0].thp
    with pytest.raises(ScenarioError, match="thp = true needs backing"):
        load_text(base.format(b="memfd", t="true"), "x.toml")
    with pytest.raises(ScenarioError, match="thp must be true or false"):
        load_text(base.format(b="anon", t='"yes"'), "x.toml")


def test_a_2m_private_spte_on_a_td_adds_all_512_frames_as_page_by_page_would() -> None:
    m = Machine(Config(design="baseline", integrity=IntegrityMode.CI),
                vms=[VmSpec(memory=8 << 20, backing="anon", thp=True)])
    assert m.vmm.store(BASE + 0x3000, b"vmm data").kind is Kind.OK
    twin = m.copy()
    head = head_pfn(m)
    _td_add_range(m.vm, GFN, head, HPAGE_PMD_NR)  # one MOVDIR64B over the 2 MiB
    for i in range(HPAGE_PMD_NR):
        _td_add_page(twin.vm, GFN + i, head + i)
    assert m.vm.td_pages == twin.vm.td_pages >= set(range(head, head + HPAGE_PMD_NR))
    keyid = m.vm.td_keyid
    assert keyid is not None
    hw, other = m.kernel.core.hw, twin.kernel.core.hw
    for kid in (0, keyid):
        a = hw.read(head << PAGE_SHIFT, HPAGE_PMD_SIZE, kid)
        b = other.read(head << PAGE_SHIFT, HPAGE_PMD_SIZE, kid)
        assert (a.poisoned_pa, a.data) == (b.poisoned_pa, b.data)
    got = hw.read((head + 3) << PAGE_SHIFT, 8, keyid).data
    assert got == other.read((head + 3) << PAGE_SHIFT, 8, keyid).data == b"vmm data"


def test_backing_pfn_and_the_scenario_trace_see_the_subpage_of_a_2m_spte() -> None:
    m = thp_machine("baseline")
    head = head_pfn(m)
    assert m.guest.load(BASE + 0x5000, 4).kind is Kind.OK
    assert backing_pfn(m, BASE + 0x9000) == head + 9
    sc = load_text('[machine]\nintegrity = "off"\n[[vm]]\nname = "vm0"\nbacking = "anon"\n'
                   'thp = true\nmemory = "8M"\n[[step]]\nactor = "vmm:vm0"\nop = "store"\n'
                   'gpa = 0x400000\ndata = "x"\n[[step]]\nactor = "guest:vm0"\nop = "load"\n'
                   'gpa = 0x405000\n', "t.toml")
    run = run_scenario(sc, "baseline")
    # The VMM's store maps the THP (vmm_pmd appears); the guest's load maps a 2M SPTE.
    assert int(run.results[0].changed["vmm_pmd"]["after"], 16) & (1 << 7)
    ept = int(run.results[1].changed["ept"]["after"], 16)
    assert ept & PT_PAGE_SIZE_MASK and (ept >> PAGE_SHIFT) & 0x1FF == 5  # subpage 5
    # The subpage's state reads as the kernel's page_count/page_mapcount would.
    changed = run.results[1].changed
    assert int(changed["compound_head"]["after"], 16) == (ept >> PAGE_SHIFT) & ~0x1FF & (
        (1 << 40) - 1)
    assert changed["mapcount"]["after"] == 1 and changed["refcount"]["after"] >= 1


@pytest.mark.parametrize("design", ["baseline", "rfc-v1", "rfc-v2"])
def test_a_protected_subpage_keeps_its_thp_from_splitting_until_it_is_freed(design: str) -> None:
    m = thp_machine(design)
    core = m.kernel.core
    head = head_pfn(m)
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, MADV_DONTNEED).value == 0
    assert m.guest.store(BASE + 0x7000, b"second").kind is Kind.OK  # 4K: a hwpoison entry
    split = deferred_split_scan(core)
    assert split == (1 if design == "baseline" else 0)  # the entry's reference blocks the split
    assert (core.pages.order[head + 7] == 0) == (design == "baseline")
    assert m.vmm.proc.munmap(m.vmm.gpa_to_hva(BASE), HPAGE_PMD_SIZE).value == 0
    poisoned = PageHWPoison(core.pages[head + 7])
    assert poisoned == (design != "baseline")  # v2 too: the THP's free unpoisons its head only
    if design == "rfc-v2":
        assert m.kvm.kvm_pfn_map.get(head + 7) == m.vm.ident


def test_the_live_referee_sends_no_step_of_a_thp_scenario() -> None:
    from kvmpoison.kconfig import RFC_BASE
    from kvmpoison.report.scenario_live import THP_RAM, plan

    text = ('[[vm]]\nname = "vm0"\nbacking = "anon"\nthp = {t}\n[[step]]\nactor = "guest:vm0"\n'
            'op = "load"\ngpa = 0x400000\n')
    p = plan(load_text(text.format(t="true"), "t.toml"), RFC_BASE, swap=False)
    assert not p.sent and all(why == THP_RAM for _, why in p.plans.values())
    assert plan(load_text(text.format(t="false"), "t.toml"), RFC_BASE, swap=False).sent


def test_the_gpa_map_sees_pages_under_a_huge_pmd_and_a_2m_spte() -> None:
    from kvmpoison.report.gpa_map import POISONED, PRIVATE, UNMAPPED, page_states

    m = thp_machine("rfc-v2")
    inst = next(iter(m.instances.values()))
    states = page_states(m, inst)
    assert (states[GFN : GFN + HPAGE_PMD_NR] == PRIVATE).all()  # the VMM's huge PMD
    assert states[GFN + HPAGE_PMD_NR] == UNMAPPED
    assert m.guest.store(BASE + 0x5000, b"guest secret").kind is Kind.OK
    states = page_states(m, inst)
    assert states[GFN + 5] == POISONED and states[GFN + 6] == PRIVATE


def test_protecting_a_subpage_of_a_pte_mapped_thp_queues_it_for_deferred_split() -> None:
    m = thp_machine("rfc-v2")
    core = m.kernel.core
    head = head_pfn(m)
    assert m.vmm.proc.mprotect(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, 1).value == 0  # split
    assert head not in core.deferred_split_queue  # every subpage is still mapped
    assert m.guest.store(BASE + 0x7000, b"second").kind is Kind.OK
    assert head in core.deferred_split_queue  # page_remove_rmap: its _mapcount went negative


def test_pte_decode_names_a_2m_spte() -> None:
    from kvmpoison.mm.ptdump import decode_ept

    m = thp_machine("baseline")
    assert m.guest.load(BASE, 4).kind is Kind.OK
    raw = ept_spte(m.vm.ept, BASE)[0]
    fields = {f.name: f.value for f in decode_ept(raw).fields}
    assert "LARGE" in fields["flags"] and fields["size"].startswith("2M leaf")
    small = {f.name for f in decode_ept(raw & ~PT_PAGE_SIZE_MASK).fields}
    assert "size" not in small


def test_after_khugepaged_collapses_the_range_the_next_fault_maps_2m_again() -> None:
    from kvmpoison.mm.khugepaged import khugepaged_scan

    m = thp_machine("baseline")
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(BASE + 0x1FF000), 4096, MADV_DONTNEED).value == 0
    assert m.guest.load(BASE + 0x5000, 1).kind is Kind.OK
    assert ept_spte(m.vm.ept, BASE + 0x5000)[1] == PG_LEVEL_4K  # a table of 4K SPTEs
    assert khugepaged_scan(m.kernel.core) >= 1
    assert ept_spte(m.vm.ept, BASE + 0x5000)[0] == 0  # the collapse's notifier zapped it
    assert m.guest.load(BASE + 0x6000, 1).kind is Kind.OK
    raw, level = ept_spte(m.vm.ept, BASE + 0x5000)
    assert level == PG_LEVEL_2M and (raw >> PAGE_SHIFT) & ((1 << 40) - 1) == head_pfn(m)
    assert m.vm.ept.pte_slot(BASE) is None  # the 2M SPTE replaced the table
