"""Design gmem: guest_memfd memslots, memory attributes, conversions and exits (v6.18 rules)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import PAGE
from kvmpoison.arch.x86.integrity import WriteHow
from kvmpoison.config import Config
from kvmpoison.demo import SECRET, run_story
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.matrix.designs import backing_pfn, run_design_cell
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.memory_failure import memory_failure
from kvmpoison.mm.mmap import MAP_SHARED
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import load
from kvmpoison.scenario.runner import run_scenario
from kvmpoison.virt.kvm.gmem_memslot import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS_6_18,
    kvm_gmem_cached_pfn,
    kvm_mem_is_private,
    kvm_vm_ioctl_set_memory_attributes,
)
from kvmpoison.virt.kvm.guest_memfd import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
from kvmpoison.virt.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE, MemAttrArray
from kvmpoison.virt.kvm.private_mem import (
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
)
from kvmpoison.virt.kvm.x86.gmem_hypercall import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
)
from kvmpoison.vmm.vmm import Vmm

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
PRIV = KVM_MEMORY_ATTRIBUTE_PRIVATE
SECRET_GPA = 0x30 * PAGE
HIGH = 0x1000_0000  # a gpa range no memslot covers


def gmem_machine(**kw: object) -> Machine:
    return Machine(Config(design="gmem", **kw))  # type: ignore[arg-type]


@pytest.fixture
def m() -> Machine:
    return gmem_machine()


def new_gmem(vmm: Vmm, m: Machine, size: int = 16 * PAGE) -> int:
    got = vmm.guest_memfd_create(m.vm, size, 0)
    assert got.cell.startswith("ret:"), got
    return got.value or 0


def region2(vmm: Vmm, m: Machine, slot: int, flags: int, gpa: int, size: int, fd: int = 0,
            offset: int = 0, hva: int | None = None) -> str:
    return vmm.set_user_memory_region2(m.vm, slot, flags, gpa, size,
                                       vmm.ram_hva if hva is None else hva, fd, offset).cell


# -- the per-gfn attribute store ------------------------------------------------------------


@settings(max_examples=60, deadline=2000)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20), st.sampled_from([0, 8, 9])),
                max_size=12))
def test_attribute_ranges_match_a_per_gfn_reference(ops: list[tuple[int, int, int]]) -> None:
    attrs = MemAttrArray()
    ref = np.zeros(100, dtype=np.uint64)
    for start, n, value in ops:
        attrs.store(start, start + n, value)
        ref[start : start + n] = value
    assert [attrs.get(g) for g in range(100)] == [int(v) for v in ref]
    assert list(attrs.get_many(np.arange(100, dtype=np.int64))) == list(ref)
    for lo, hi in ((0, 100), (10, 30), (55, 56)):
        assert attrs.range_has(lo, hi, ~0 & (2**64 - 1), 8) == bool(np.all(ref[lo:hi] == 8))
    assert len(attrs.starts) <= 2 * len(ops) + 1  # ranges, not pages


def test_a_huge_conversion_is_a_range_update() -> None:
    attrs = MemAttrArray()
    attrs.store(0, 1 << 40, PRIV)  # 4 PiB of gfns: must not allocate per page
    attrs.store(5, 6, 0)
    assert attrs.ranges(0)[0] == (5, 6) and attrs.get((1 << 40) - 1) == PRIV
    assert attrs.get(1 << 40) == 0


# -- KVM_SET_MEMORY_ATTRIBUTES ----------------------------------------------------------------


@pytest.mark.parametrize(("address", "size", "attributes", "flags"), [
    (0, PAGE, PRIV, 1),  # flags must be 0
    (0, PAGE, 1 << 0, 0),  # only PRIVATE is supported
    (0, 0, PRIV, 0),  # empty range
    (2**64 - PAGE, 2 * PAGE, PRIV, 0),  # wraps
    (0x100, PAGE, PRIV, 0),  # unaligned address
    (0, 0x800, PRIV, 0),  # unaligned size
])
def test_set_memory_attributes_rejects_bad_arguments(m: Machine, address: int, size: int,
                                                     attributes: int, flags: int) -> None:
    assert kvm_vm_ioctl_set_memory_attributes(m.vm, address, size, attributes, flags) == \
        -errno.EINVAL


def test_set_memory_attributes_zaps_the_range(m: Machine) -> None:
    m.guest.store(SECRET_GPA, b"x")
    assert m.vm.ept.get(SECRET_GPA)
    assert m.vmm.set_memory_attributes(m.vm, SECRET_GPA, PAGE, 0).cell == "ret:0"
    assert not m.vm.ept.get(SECRET_GPA) and not kvm_mem_is_private(m.vm, 0x30)
    # Setting what is already there changes nothing and zaps nothing.
    m.guest.store(0x11 * PAGE, b"y")
    assert m.vmm.set_memory_attributes(m.vm, 0x11 * PAGE, PAGE, 0).cell == "ret:0"
    assert m.vm.ept.get(0x11 * PAGE)


def test_rfc_designs_have_no_memory_attributes_ioctl() -> None:
    rfc = Machine(Config(design="rfc-v2"))
    assert rfc.vmm.set_memory_attributes(rfc.vm, 0, PAGE, PRIV).cell == "err:ENOTTY"
    assert rfc.vmm.guest_memfd_create(rfc.vm, PAGE).cell == "err:ENOTTY"


# -- KVM_SET_USER_MEMORY_REGION2 and kvm_gmem_bind ----------------------------------------------


def test_boot_binds_slot0_to_a_guest_memfd_and_makes_ram_private(m: Machine) -> None:
    slot = m.vm.memslots[0]
    assert slot.flags & KVM_MEM_GUEST_MEMFD  # type: ignore[attr-defined]
    assert m.vmm.gmem_fd is not None
    assert kvm_mem_is_private(m.vm, 0x30) and not kvm_mem_is_private(m.vm, 0x10)
    assert kvm_mem_is_private(m.vm, (m.vmm.ram_size >> 12) - 1)


@pytest.mark.parametrize(("case", "cell"), [
    ("bad fd", "err:EBADF"),
    ("memfd, not guest_memfd", "err:EINVAL"),
    ("unaligned offset", "err:EINVAL"),
    ("wrapping offset", "err:EINVAL"),
    ("past the end of the file", "err:EINVAL"),
    ("file range already bound", "err:EINVAL"),
    ("next file range", "ret:0"),
    ("gfns of another slot", "err:EEXIST"),
    ("with dirty logging", "err:EINVAL"),
    ("read-only", "err:EINVAL"),
    ("slot id too big", "err:EINVAL"),
    ("address space 1", "err:EINVAL"),
    ("unaligned hva", "err:EINVAL"),
    ("beyond 48 bits", "err:EINVAL"),
])
def test_gmem_binding_rules(m: Machine, case: str, cell: str) -> None:
    vmm = m.vmm
    fd = new_gmem(vmm, m)
    ok = region2(vmm, m, 1, KVM_MEM_GUEST_MEMFD, HIGH, 4 * PAGE, fd, 0)
    assert ok == "ret:0"
    g = KVM_MEM_GUEST_MEMFD
    args = {
        "bad fd": (2, g, HIGH + 0x10_0000, PAGE, 999, 0),
        "memfd, not guest_memfd": (2, g, HIGH + 0x10_0000, PAGE, vmm.ram_fd, 0),
        "unaligned offset": (2, g, HIGH + 0x10_0000, PAGE, fd, 0x800),
        "wrapping offset": (2, g, HIGH + 0x10_0000, PAGE, fd, 2**64 - PAGE),
        "past the end of the file": (2, g, HIGH + 0x10_0000, 4 * PAGE, fd, 13 * PAGE),
        "file range already bound": (2, g, HIGH + 0x10_0000, PAGE, fd, 3 * PAGE),
        "next file range": (2, g, HIGH + 0x10_0000, PAGE, fd, 4 * PAGE),
        "gfns of another slot": (2, g, HIGH + PAGE, PAGE, fd, 8 * PAGE),
        "with dirty logging": (2, g | KVM_MEM_LOG_DIRTY_PAGES, HIGH + 0x10_0000, PAGE, fd,
                               8 * PAGE),
        "read-only": (2, g | KVM_MEM_READONLY, HIGH + 0x10_0000, PAGE, fd, 8 * PAGE),
        "slot id too big": (KVM_USER_MEM_SLOTS_6_18, g, HIGH + 0x10_0000, PAGE, fd, 8 * PAGE),
        "address space 1": (1 << 16 | 2, g, HIGH + 0x10_0000, PAGE, fd, 8 * PAGE),
        "beyond 48 bits": (2, g, (1 << 48) - PAGE, 2 * PAGE, fd, 8 * PAGE),
    }
    if case == "unaligned hva":
        assert region2(vmm, m, 2, g, HIGH + 0x10_0000, PAGE, fd, 8 * PAGE,
                       hva=vmm.ram_hva + 1) == cell
        return
    slot, flags, gpa, size, gfd, off = args[case]
    assert region2(vmm, m, slot, flags, gpa, size, gfd or 0, off) == cell


def test_gmem_slots_are_immutable_but_can_be_deleted_and_rebound(m: Machine) -> None:
    vmm = m.vmm
    fd = new_gmem(vmm, m)
    assert region2(vmm, m, 1, KVM_MEM_GUEST_MEMFD, HIGH, 2 * PAGE, fd) == "ret:0"
    assert region2(vmm, m, 1, KVM_MEM_GUEST_MEMFD, HIGH, 2 * PAGE, fd) == "err:EINVAL"
    assert region2(vmm, m, 1, 0, HIGH, 0) == "ret:0"  # delete: the binding goes too
    assert region2(vmm, m, 1, 0, HIGH, 0) == "err:EINVAL"  # nothing left to delete
    assert region2(vmm, m, 3, KVM_MEM_GUEST_MEMFD, HIGH, 2 * PAGE, fd) == "ret:0"


def test_another_vms_guest_memfd_cannot_be_bound() -> None:
    m = Machine(Config(design="gmem"), vms=[VmSpec("a"), VmSpec("b")])
    a, b = m.instances["a"], m.instances["b"]
    spare = a.vmm.guest_memfd_create(a.vm, PAGE).value or 0  # a's, and bound nowhere
    fd_a = b.vmm.proc.install(a.vmm.proc.task.fds[spare])
    cell = b.vmm.set_user_memory_region2(b.vm, 1, KVM_MEM_GUEST_MEMFD, HIGH, PAGE,
                                         b.vmm.ram_hva, fd_a, 0).cell
    assert cell == "err:EINVAL"
    assert a.vmm.set_user_memory_region2(a.vm, 1, KVM_MEM_GUEST_MEMFD, HIGH, PAGE,
                                         a.vmm.ram_hva, spare, 0).cell == "ret:0"


# -- conversions: KVM_HC_MAP_GPA_RANGE and KVM_EXIT_MEMORY_FAULT ---------------------------------


def test_boot_shares_its_buffers_through_hypercall_exits(m: Machine) -> None:
    exits = m.vm.gmem.exits  # type: ignore[union-attr]
    assert [(e.exit_reason, e.nr, e.args) for e in exits] == [
        (KVM_EXIT_HYPERCALL, 12, (0xF000, 1, 0)), (KVM_EXIT_HYPERCALL, 12, (0x10000, 16, 0))]
    assert not kvm_mem_is_private(m.vm, 0xF) and not kvm_mem_is_private(m.vm, 0x1F)
    assert kvm_mem_is_private(m.vm, 0x20)


def test_private_data_never_reaches_the_vmm_mapping(m: Machine) -> None:
    assert m.guest.store(SECRET_GPA, b"secret").cell == "ok"
    assert m.vmm.load(SECRET_GPA, 6).data == bytes(6)  # the shared memfd page
    m.vmm.store(SECRET_GPA, b"VMM!")
    assert m.guest.load(SECRET_GPA, 6).data == b"secret"
    pfn = backing_pfn(m, SECRET_GPA)
    assert pfn == kvm_gmem_cached_pfn(m.vm, 0x30)
    memfd = m.vmm.proc.task.fds[m.vmm.ram_fd or 0].f_mapping
    assert memfd is not None and memfd.lookup(0x30) != pfn


def test_hypercall_argument_rules(m: Machine) -> None:
    g = m.guest
    assert g.hypercall(12, 0x30001, 1, 0) == -KVM_EINVAL  # unaligned gpa
    assert g.hypercall(12, SECRET_GPA, 0, 0) == -KVM_EINVAL  # no pages
    assert g.hypercall(12, SECRET_GPA, 2**64 - 1, 0) == -KVM_EINVAL  # wraps
    assert g.hypercall(13, 0x30, 1) == -KVM_ENOSYS  # the RFC's KVM_HC_MEM_SHARE is not here
    assert g.hypercall(11) == 0 and g.hypercall(1) == 0  # SCHED_YIELD, VAPIC_POLL_IRQ
    m.vm.gmem.hypercall_exit_enabled = 0  # type: ignore[union-attr]
    assert g.hypercall(12, SECRET_GPA, 1, 0) == -KVM_ENOSYS  # no KVM_CAP_EXIT_HYPERCALL
    assert not m.vm.mem_protected  # 12 is not the RFC's KVM_HC_ENABLE_MEM_PROTECTED


def test_explicit_conversion_round_trip_loses_the_data(m: Machine) -> None:
    g = m.guest
    g.store(SECRET_GPA, b"secret")
    assert g.share(0x30, 1) == 0  # to shared: the VMM punches the guest_memfd page
    assert kvm_gmem_cached_pfn(m.vm, 0x30) is None
    assert g.load(SECRET_GPA, 6).data == bytes(6)
    g.store(SECRET_GPA, b"public")
    assert m.vmm.load(SECRET_GPA, 6).data == b"public"
    assert g.hypercall(12, SECRET_GPA, 1, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    g.use_shared_alias(0x30, 1, False)
    assert m.vmm.load(SECRET_GPA, 6).data == bytes(6)  # the memfd range was discarded
    assert g.load(SECRET_GPA, 6).data == bytes(6)


def test_mismatched_access_exits_with_memory_fault_and_the_vmm_converts(m: Machine) -> None:
    g = m.guest
    g.store(SECRET_GPA, b"secret")
    g.use_shared_alias(0x30, 1, True)  # the guest touches its private page through the shared alias
    assert g.load(SECRET_GPA, 6).data == bytes(6)
    ex = m.vm.gmem.exits[-1]  # type: ignore[union-attr]
    assert (ex.exit_reason, ex.gpa, ex.size, ex.flags) == (KVM_EXIT_MEMORY_FAULT, SECRET_GPA,
                                                           PAGE, 0)
    assert not kvm_mem_is_private(m.vm, 0x30)
    g.use_shared_alias(0x30, 1, False)
    g.load(SECRET_GPA, 1)
    ex = m.vm.gmem.exits[-1]  # type: ignore[union-attr]
    assert ex.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE and kvm_mem_is_private(m.vm, 0x30)


def test_without_a_vmm_loop_the_memory_fault_ends_kvm_run(m: Machine) -> None:
    m.vm.gmem.userspace = None  # type: ignore[union-attr]
    m.guest.use_shared_alias(0x30, 1, True)
    got = m.guest.load(SECRET_GPA, 8)
    assert got.cell == "err:EFAULT" and "KVM_EXIT_MEMORY_FAULT gpa=0x30000" in got.detail


def test_private_fault_on_a_slot_without_guest_memfd_is_a_memory_fault(m: Machine) -> None:
    vmm = m.vmm
    assert m.vm.set_user_memory_region(1, HIGH, PAGE, vmm.scratch()) == 0
    assert vmm.set_memory_attributes(m.vm, HIGH, PAGE, PRIV).cell == "ret:0"
    m.vm.gmem.userspace = None  # type: ignore[union-attr]
    got = m.guest.load(HIGH, 8)
    assert got.cell == "err:EFAULT" and "PRIVATE" in got.detail


# -- kvm_gmem_get_pfn, punch-hole and memory errors ------------------------------------------


def test_punch_hole_zaps_the_ept_and_the_guest_gets_a_fresh_zero_page() -> None:
    m = gmem_machine()
    m.guest.store(SECRET_GPA, b"secret")
    assert m.vmm.proc.fallocate(m.vmm.gmem_fd or 0, PUNCH, SECRET_GPA, PAGE).cell == "ret:0"
    assert not m.vm.ept.get(SECRET_GPA)
    assert kvm_gmem_cached_pfn(m.vm, 0x30) is None
    assert m.guest.load(SECRET_GPA, 6).data == bytes(6)  # no TD integrity failure either


def test_punch_hole_on_the_shared_memfd_leaves_private_memory_alone(m: Machine) -> None:
    m.guest.store(SECRET_GPA, b"secret")
    m.vmm.proc.fallocate(m.vmm.ram_fd or 0, PUNCH, 0, m.vmm.ram_size)
    assert m.guest.load(SECRET_GPA, 6).data == b"secret"


def test_memory_error_on_a_gmem_page_is_delayed_to_the_next_guest_access(m: Machine) -> None:
    m.guest.store(SECRET_GPA, b"secret")
    pfn = backing_pfn(m, SECRET_GPA)
    m.kernel.core.hw.inject_dram_error(pfn << 12)
    # 6.18's truncate_error_folio counts guest_memfd's MF_DELAYED as "Failed to punch page"
    assert memory_failure(m.kernel.core, pfn, 0) == -errno.EBUSY
    assert not m.vm.ept.get(SECRET_GPA)  # kvm_gmem_error_folio zapped it
    assert kvm_gmem_cached_pfn(m.vm, 0x30) == pfn  # and kept the page
    got = m.guest.load(SECRET_GPA, 6)
    assert got.cell == "err:EHWPOISON" and "KVM_EXIT_MEMORY_FAULT" in got.detail


def test_the_gmem_file_outlives_its_vm_and_no_other_vm_can_bind_it() -> None:
    m = Machine(Config(design="gmem"), vms=[VmSpec("a")])
    a = m.instances["a"]
    a.guest.store(SECRET_GPA, b"secret")
    keeper = m.process("keeper")
    kfd = keeper.install(a.vmm.proc.task.fds[a.vmm.gmem_fd or 0])
    m.destroy_vm("a")
    assert a.vm.dead
    mapping = keeper.task.fds[kfd].f_mapping
    assert mapping is not None and mapping.lookup(0x30) is not None  # the file keeps its pages
    assert keeper.fallocate(kfd, PUNCH, SECRET_GPA, PAGE).cell == "ret:0"
    assert mapping.lookup(0x30) is None
    b = m.add_vm(VmSpec("b"))
    fd = b.vmm.proc.install(keeper.task.fds[kfd])
    assert b.vmm.set_user_memory_region2(b.vm, 1, KVM_MEM_GUEST_MEMFD, HIGH, PAGE,
                                         b.vmm.ram_hva, fd, 0).cell == "err:EINVAL"


def test_gmem_file_cannot_be_seeked() -> None:
    m = gmem_machine()
    assert m.vmm.proc.lseek(m.vmm.gmem_fd or 0, 0, 0).cell == "err:ESPIPE"
    assert m.vmm.proc.lseek(m.vmm.ram_fd or 0, PAGE, 2).value == m.vmm.ram_size + PAGE


# -- the matrix view ------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "path", "cell", "data"), [
    ("private", "load", "ok", bytes(8)),
    ("private", "guest_load", "ok", b"guest-private-data"),
    ("private", "guest_load_after_vmm_store", "ok", b"guest-private-data"),
    ("private", "kvm_emulated_access", "ok", bytes(8)),
    ("shared", "load", "ok", b"guest-pr"),
    ("hwpoisoned", "guest_load", "err:EHWPOISON", None),
])
def test_matrix_cells_on_gmem(state: str, path: str, cell: str, data: bytes | None) -> None:
    got = run_design_cell("gmem", state, path)
    assert got.cell == cell and got.outcome.data == data


# -- the shipped scenarios on gmem ---------------------------------------------------------------

LIBRARY = shipped()


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_shipped_scenario_runs_on_gmem_with_its_own_expectations(name: str) -> None:
    sc = load(LIBRARY[name])
    assert "gmem:" in sc.comment  # says what guest_memfd changes, or why the case does not apply
    for step in sc.steps:  # a step the RFC's designs check is checked on gmem too
        if any(k in step.expect for k in ("baseline", "rfc-v1", "rfc-v2")):
            assert "gmem" in step.expect or "*" in step.expect, (name, step.index)
        moves_data = (step.expected("gmem") or "ok").startswith(("ok", "ret:"))
        if moves_data and any(k in step.expect_data for k in ("baseline", "rfc-v1", "rfc-v2")):
            assert "gmem" in step.expect_data or "*" in step.expect_data, (name, step.index)
    run = run_scenario(sc, "gmem")
    failed = [(r.step.index, r.outcome.cell, r.expected, r.data_met) for r in run.results
              if not r.ok]
    assert not failed, failed


def test_demo_story_on_gmem() -> None:
    steps = {s.action: s.outcome for s in run_story("gmem")}
    assert steps["load the guest's private page"].cell == "ok"  # the VMM's own shared page
    assert SECRET not in (steps["load the guest's private page"].data or b"")
    assert steps["load the secret back"].data == SECRET


def test_private_punch_gives_the_frame_back_clean_to_the_host(m: Machine) -> None:
    m.guest.store(SECRET_GPA, b"secret")
    pfn = backing_pfn(m, SECRET_GPA)
    hw = m.kernel.core.hw
    assert hw.line_state(pfn << 12).td  # TDH.MEM.PAGE.AUG made its lines TD-owned
    m.vmm.proc.fallocate(m.vmm.gmem_fd or 0, PUNCH, SECRET_GPA, PAGE)
    assert not hw.line_state(pfn << 12).td and pfn not in m.vm.td_pages  # tdx_reclaim_page


def test_init_shared_needs_a_vm_without_private_memory(m: Machine) -> None:
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    assert m.vmm.guest_memfd_create(m.vm, PAGE, flags).cell == "err:EINVAL"
    assert m.vmm.guest_memfd_create(m.vm, PAGE, GUEST_MEMFD_FLAG_MMAP).cell.startswith("ret:")
    assert m.vmm.guest_memfd_create(m.vm, PAGE, 1 << 2).cell == "err:EINVAL"


def test_an_mmap_capable_guest_memfd_serves_shared_faults_too(m: Machine) -> None:
    vmm = m.vmm
    m.vm.gmem.has_private_mem = False  # type: ignore[union-attr]  # 6.18's default VM type
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    gfd = vmm.guest_memfd_create(m.vm, 4 * PAGE, flags).value or 0
    view = vmm.proc.mmap(0, 4 * PAGE, 3, MAP_SHARED, gfd).value or 0
    assert vmm.proc.store(view + PAGE, b"via mmap").cell == "ok"
    elsewhere = vmm.scratch(4)  # userspace_addr is not where a gmem-only slot's pages come from
    assert region2(vmm, m, 1, KVM_MEM_GUEST_MEMFD, HIGH, 4 * PAGE, gfd, 0,
                   hva=elsewhere) == "ret:0"
    m.guest.use_shared_alias((HIGH >> 12) + 1, 1, True)
    assert m.guest.load(HIGH + PAGE, 8).data == b"via mmap"  # a shared fault, from the file
    vmm.proc.fallocate(gfd, PUNCH, PAGE, PAGE)  # INIT_SHARED: the shared SPTE is zapped
    assert not m.vm.ept.get(HIGH + PAGE)


def test_converting_to_shared_reclaims_the_td_frame(m: Machine) -> None:
    m.guest.store(SECRET_GPA, b"secret")
    pfn = backing_pfn(m, SECRET_GPA)
    assert m.vmm.set_memory_attributes(m.vm, SECRET_GPA, PAGE, 0).cell == "ret:0"
    assert not m.kernel.core.hw.line_state(pfn << 12).td and pfn not in m.vm.td_pages


def test_a_vm_without_private_memory_supports_no_attribute(m: Machine) -> None:
    m.vm.gmem.has_private_mem = False  # type: ignore[union-attr]  # 6.18's default VM type
    assert m.vmm.set_memory_attributes(m.vm, HIGH, PAGE, PRIV).cell == "err:EINVAL"
    assert m.vmm.set_memory_attributes(m.vm, HIGH, PAGE, 0).cell == "ret:0"


def test_a_slot_refused_after_the_bind_leaves_the_file_range_free(m: Machine) -> None:
    vmm = m.vmm
    fd = new_gmem(vmm, m)
    beyond = (1 << 48) - PAGE  # ends past kvm_mmu_max_gfn(): refused after kvm_gmem_bind
    assert region2(vmm, m, 2, KVM_MEM_GUEST_MEMFD, beyond, 2 * PAGE, fd, 0) == "err:EINVAL"
    assert region2(vmm, m, 2, KVM_MEM_GUEST_MEMFD, HIGH, 2 * PAGE, fd, 0) == "ret:0"


# -- conversions against a reference ------------------------------------------------------------

GFNS = (0x30, 0x31, 0x32)
OPS_ = ("guest_store_private", "guest_load_private", "guest_load_shared", "share", "unshare",
        "vmm_store", "vmm_load", "punch_gmem")


@settings(max_examples=120, deadline=5000)
@given(st.lists(st.tuples(st.sampled_from(OPS_), st.sampled_from(GFNS), st.binary(min_size=4,
                                                                                  max_size=4)),
                min_size=1, max_size=14))
def test_conversions_match_a_reference(ops: list[tuple[str, int, bytes]]) -> None:
    """Per gfn: attribute, private bytes (guest_memfd), shared bytes (memfd).

    A conversion keeps the side it converts to and discards the other; an access
    through the wrong alias converts first (KVM_EXIT_MEMORY_FAULT). The VMM only
    ever sees the shared bytes.
    """
    m = gmem_machine()
    g, vmm = m.guest, m.vmm
    zero = bytes(4)
    private = dict.fromkeys(GFNS, True)
    priv = dict.fromkeys(GFNS, zero)
    shared = dict.fromkeys(GFNS, zero)

    def to(gfn: int, want_private: bool) -> None:  # what QEMU's kvm_convert_memory leaves
        if want_private:
            shared[gfn] = zero  # the memfd range is discarded, even if already private
        elif private[gfn]:
            priv[gfn] = zero  # the guest_memfd range is punched
        private[gfn] = want_private

    for op, gfn, data in ops:
        gpa = gfn << 12
        if op in ("guest_store_private", "guest_load_private", "guest_load_shared"):
            want_private = op != "guest_load_shared"
            g.use_shared_alias(gfn, 1, not want_private)
            if private[gfn] != want_private:
                to(gfn, want_private)
            if op == "guest_store_private":
                assert g.store(gpa, data).cell == "ok"
                priv[gfn] = data
            else:
                got = g.load(gpa, 4)
                assert got.data == (priv[gfn] if want_private else shared[gfn]), (op, gfn)
        elif op in ("share", "unshare"):
            assert g.map_gpa_range(gfn, 1, private=op == "unshare") == 0
            to(gfn, op == "unshare")
        elif op == "vmm_store":
            assert vmm.store(gpa, data).cell == "ok"
            shared[gfn] = data
        elif op == "vmm_load":
            assert vmm.load(gpa, 4).data == shared[gfn]
        else:
            assert vmm.proc.fallocate(vmm.gmem_fd or 0, PUNCH, gpa, PAGE).cell == "ret:0"
            priv[gfn] = zero
        assert kvm_mem_is_private(m.vm, gfn) == private[gfn]


def test_a_private_page_the_notifier_unmapped_is_still_reclaimed_on_conversion(m: Machine) -> None:
    """Found by the reference test: converting an already-private page to private again
    discards the memfd page, whose MMU notifier zaps the gfn; the later conversion to
    shared must still give the TD's frame back clean, or its next owner reads poison."""
    g = m.guest
    m.vmm.store(0x32 * PAGE, b"vmm")  # the VMM maps its (shared) page of that gfn
    g.store(0x32 * PAGE, b"x")
    pfn = backing_pfn(m, 0x32 * PAGE)
    assert g.map_gpa_range(0x32, 1, private=True) == 0  # discards the memfd page: notifier
    g.use_shared_alias(0x32, 1, True)
    assert g.load(0x32 * PAGE, 4).cell == "ok"  # converts it to shared: guest_memfd punched
    assert pfn not in m.vm.td_pages and not m.kernel.core.hw.line_state(pfn << 12).td


def test_bulk_reclaim_leaves_what_a_movdir64b_per_page_leaves(m: Machine) -> None:
    """A multi-page private punch reclaims every TD frame as one zero MOVDIR64B store each."""
    gpas = [SECRET_GPA + i * PAGE for i in range(4)]
    for gpa in gpas:
        assert m.guest.store(gpa, b"td data").cell == "ok"
    pfns = [backing_pfn(m, gpa) for gpa in gpas]
    ref = m.copy()
    for pfn in pfns:  # the reference: tdx_reclaim_page's store, one page at a time
        ref.kernel.core.hw.write(pfn << 12, bytes(PAGE), 0, WriteHow.MOVDIR64B)
    m.vmm.proc.fallocate(m.vmm.gmem_fd or 0, PUNCH, SECRET_GPA, 4 * PAGE)
    hw, ref_hw = m.kernel.core.hw, ref.kernel.core.hw
    for pfn in pfns:
        assert pfn not in m.vm.td_pages
        assert hw.read(pfn << 12, PAGE, 0).data == ref_hw.read(pfn << 12, PAGE, 0).data
        for line in range(0, PAGE, 64):
            assert hw.line_state((pfn << 12) + line) == ref_hw.line_state((pfn << 12) + line)
