"""Version gates placed by the release that changed the behaviour, so 6.1 lands on its side.

Each test runs one behaviour on v5.12, 6.1 and 6.18. The 6.1 expectation comes from
Debian's linux-source-6.1 (6.1.192); the file and function are named per test.
"""

from __future__ import annotations

import errno

import pytest

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.mce import MCG_STATUS_RIPV
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.arch.x86.pgtable_types import _PAGE_DIRTY, _PAGE_RW, PAGE_SHIFT
from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.mce import kill_me_maybe
from kvmpoison.machine import Machine
from kvmpoison.mm.madvise import MADV_FREE
from kvmpoison.mm.memory_failure import memory_failure
from kvmpoison.mm.mmap import MAP_FIXED, MAP_SHARED, PROT_READ
from kvmpoison.mm.mremap import MREMAP_DONTUNMAP, MREMAP_MAYMOVE
from kvmpoison.mm.page_flags import PG, PageFlagBits
from kvmpoison.uapi.siginfo import BusCode
from kvmpoison.virt.kvm.x86.mmu import spte_present

V5_12 = KernelConfig(version=KernelVersion.V5_12)
V6_1 = KernelConfig(version=KernelVersion.V6_1)
V6_18 = KernelConfig(version=KernelVersion.V6_18)
GPA = 0x30 * PAGE


def per_version(v5_12: object, v6_1: object, v6_18: object) -> list[tuple[KernelConfig, object]]:
    return [(V5_12, v5_12), (V6_1, v6_1), (V6_18, v6_18)]


@pytest.mark.parametrize(("kcfg", "features"), per_version(
    (False, False, False, False, False, False),
    (True, True, True, True, False, False),  # 6.1.192: swap.h, pgtable.h, mman-common.h
    (True, True, False, True, True, True)))
def test_feature_properties_per_version(kcfg: KernelConfig, features: tuple[bool, ...]) -> None:
    """PTE markers and _PAGE_SWP_EXCLUSIVE (5.19), SWP_SWAPIN_ERROR (5.19-6.1),
    MADV_POPULATE (5.14), MADV_GUARD_* (6.13), UFFDIO_POISON (6.6)."""
    got = (kcfg.has_pte_markers, kcfg.has_swp_exclusive, kcfg.has_swapin_error,
           kcfg.has_madv_populate, kcfg.has_guard_pages, kcfg.has_uffdio_poison)
    assert got == features


@pytest.mark.parametrize(("kcfg", "after"), per_version("sig:SIGBUS:BUS_MCEERR_AR", "ok", "ok"))
def test_madv_free_clears_a_hwpoison_entry_from_5_19(kcfg: KernelConfig, after: str) -> None:
    """mm/madvise.c:madvise_free_pte_range, 6.1: ``is_hwpoison_entry || is_swapin_error_entry``
    entries are cleared; v5.12 skips every non-swap entry."""
    k = boot(kcfg)
    p, other = proc(k), proc(k, "injector")
    addr = anon(p, 1, fill=3)
    assert memory_failure(k.core, pte_pfn(p.mm.pgd.get(addr)), 0, other.pid) == 0
    assert p.madvise(addr, PAGE, MADV_FREE).cell == "ret:0"
    assert p.load(addr, 1).cell.startswith(str(after))


@pytest.mark.parametrize(("kcfg", "cell"), per_version("err:EFAULT", "ret:100", "ret:100"))
def test_perform_write_keeps_a_short_copy_from_6_1(kcfg: KernelConfig, cell: str) -> None:
    """mm/filemap.c:generic_perform_write, 6.1: fails only when
    ``fault_in_iov_iter_readable(i, bytes) == bytes``, then keeps the short copy."""
    p = proc(boot(kcfg))
    fd = ok(p.memfd_create("m"))
    buf = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))  # nothing mapped above it
    ok(p.store(buf + PAGE - 100, b"w" * 100))
    assert p.write(fd, buf + PAGE - 100, 200).cell == cell


@pytest.mark.parametrize(("kcfg", "cell"), per_version("err:EFAULT", "ret:100", "ret:100"))
def test_getrandom_returns_a_partial_copy_from_6_1(kcfg: KernelConfig, cell: str) -> None:
    """drivers/char/random.c:get_random_bytes_user, 6.1: ``return ret ? ret : -EFAULT``."""
    p = proc(boot(kcfg))
    buf = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))
    assert p.getrandom(buf + PAGE - 100, 200).cell == cell


@pytest.mark.parametrize(("kcfg", "dirty", "clean"), [(V5_12, False, False), (V6_1, True, False),
                                                      (V6_18, True, True)])
def test_mprotect_makes_an_exclusive_anon_pte_writable(kcfg: KernelConfig, dirty: bool,
                                                       clean: bool) -> None:
    """mm/mprotect.c:can_change_pte_writable: 6.1 has MM_CP_TRY_CHANGE_WRITABLE but returns
    false for a clean PTE (``!pte_dirty(pte)``); 6.18 upgrades a clean exclusive page too."""
    p = proc(boot(kcfg))
    addr = anon(p, 2, fill=1)
    p.mm.pgd.set(addr + PAGE, p.mm.pgd.get(addr + PAGE) & ~_PAGE_DIRTY)  # as after writeback
    ok(p.mprotect(addr, 2 * PAGE, PROT_READ))
    ok(p.mprotect(addr, 2 * PAGE, RW))
    assert bool(p.mm.pgd.get(addr) & _PAGE_RW) is dirty
    assert bool(p.mm.pgd.get(addr + PAGE) & _PAGE_RW) is clean


@pytest.mark.parametrize(("kcfg", "cell"), per_version("err:EINVAL", "ok", "ok"))
def test_mremap_dontunmap_of_a_shared_mapping_from_5_13(kcfg: KernelConfig, cell: str) -> None:
    """mm/mremap.c:vma_to_resize, 6.1: DONTUNMAP refuses only VM_DONTEXPAND|VM_PFNMAP."""
    p = proc(boot(kcfg))
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, PAGE))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    got = p.mremap(addr, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert ("ok" if got.succeeded else got.cell) == cell


@pytest.mark.parametrize(("kcfg", "codes"), per_version([], [BusCode.BUS_MCEERR_AR],
                                                        [BusCode.BUS_MCEERR_AR]))
def test_kill_me_maybe_on_an_already_poisoned_page(kcfg: KernelConfig,
                                                   codes: list[int]) -> None:
    """arch/x86/kernel/cpu/mce/core.c:kill_me_maybe, 6.1: -EHWPOISON (kill_accessing_process
    already sent BUS_MCEERR_AR) returns quietly; no second, SI_KERNEL SIGBUS (kill_me_now).
    v5.12: memory_failure() returns 0 and nothing is sent."""
    m = Machine(Config(design="baseline", kernel=kcfg))
    assert ok(m.vmm.store(GPA, b"data")) == 0
    hva = m.vmm.gpa_to_hva(GPA)
    pfn = pte_pfn(m.vmm.proc.mm.pgd.get(hva))
    m.kernel.core.pages.flags[pfn] |= m.kernel.core.pages.mask(PG.hwpoison)  # still mapped
    task = m.vmm.proc.task
    before = len(task.pending)
    kill_me_maybe(m.vm.core, m.vm.vcpu_task, pfn, MCG_STATUS_RIPV)
    assert [int(i.code) for i in task.pending[before:]] == [int(c) for c in codes]


@pytest.mark.parametrize(("kcfg", "bits"), per_version(0xF77, 0xB77 | 3 << 57, 0xB77 | 3 << 57))
def test_ept_spte_software_bits_from_5_13(kcfg: KernelConfig, bits: int) -> None:
    """arch/x86/kvm/mmu/spte.h, 6.1: EPT_SPTE_HOST_WRITABLE/MMU_WRITABLE are bits 57/58 and
    SPTE_MMU_PRESENT_MASK is bit 11 (v5.12: host/MMU-writable at 10/11)."""
    m = Machine(Config(design="baseline", kernel=kcfg))
    m.guest.store(GPA, b"x")
    spte = int(m.vm.ept.get(GPA))
    assert spte & ~(((1 << 40) - 1) << PAGE_SHIFT) == bits


@pytest.mark.parametrize(("kcfg", "prefetched"), per_version(True, False, False))
def test_no_prefetch_under_the_tdp_mmu_from_5_15(kcfg: KernelConfig, prefetched: bool) -> None:
    """arch/x86/kvm/mmu/tdp_mmu.c, 6.1: ``tdp_mmu_enabled = true``; direct_page_fault takes
    kvm_tdp_mmu_map, which prefetches nothing (v5.12's shadow MMU prefetches 0x40..0x46)."""
    m = Machine(Config(design="baseline", kernel=kcfg))
    for i in range(8):
        m.vmm.store(0x40 * PAGE + i * PAGE, b"\x01")
    m.guest.load(0x47 * PAGE, 1)
    assert (spte_present(m.vm, 0x40 * PAGE, False) is not None) is prefetched


@pytest.mark.parametrize(("kcfg", "modern"), per_version(False, True, True))
def test_memslot_ids_and_max_gfn(kcfg: KernelConfig, modern: bool) -> None:
    """include/linux/kvm_host.h: KVM_USER_MEM_SLOTS = SHRT_MAX - 3 in all three (v5.12 took it
    in its merge window); arch/x86/kvm/x86.c, 6.1: kvm_arch_prepare_memory_region refuses a
    slot ending beyond kvm_mmu_max_gfn(), which v5.12 accepts."""
    m = Machine(Config(design="baseline", kernel=kcfg))
    assert m.vm.set_user_memory_region(509, 1 << 32, PAGE, m.vmm.ram_hva) == 0
    beyond = m.vm.set_user_memory_region(5, 1 << 50, PAGE, m.vmm.ram_hva)
    assert beyond == (-errno.EINVAL if modern else 0)


@pytest.mark.parametrize(("kcfg", "bit"), per_version(23, 23, 21))
def test_pg_hwpoison_bit(kcfg: KernelConfig, bit: int) -> None:
    """include/linux/page-flags.h, 6.1.192: still the v5.12 order (PG_hwpoison 23 with
    ARCH_USES_PG_UNCACHED, which x86 selects with X86_PAT)."""
    assert PageFlagBits.for_config(kcfg).bit[PG.hwpoison] == bit
