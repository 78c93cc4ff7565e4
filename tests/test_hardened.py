"""The hardened design: its own marker and flag, sharing, ownership, scrub, refusals.

Each test names the weakness of the RFC it closes (docs/hardened.md) and
fails if the fix breaks; where it helps, rfc-v2 shows the weakness first.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.config import Config
from kvmpoison.designs import DESIGNS
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.kernel.kernel import ForkError
from kvmpoison.machine import Machine, VmSetupError, VmSpec
from kvmpoison.mm.guest_private import (
    PageGuestPrivate,
    alloc_contig_range,
    guest_private_markers,
    move_pages,
    offline_pages,
)
from kvmpoison.mm.gup import FOLL, get_dump_page, pin_user_pages
from kvmpoison.mm.madvise import MADV_DONTNEED, MADV_PAGEOUT
from kvmpoison.mm.memory_failure import MF_ACTION_REQUIRED, memory_failure, unpoison_memory
from kvmpoison.mm.page import Page, PageHWPoison, SetPageHWPoison
from kvmpoison.mm.swapops import (
    PteMarker,
    SwapTypes,
    guest_private_entry_to_pfn,
    is_guest_private_entry,
    is_poisoned_swp_entry,
    make_guest_private_entry,
    pte_marker_get,
    pte_to_swp_entry,
)
from kvmpoison.virt.kvm.hardened import KVM_EINVAL, KVM_HC_MEM_UNSHARE, kvm_hardened_free_hook
from kvmpoison.virt.kvm.kvm_main import Protection
from kvmpoison.virt.kvm.mem_protected import KVM_HC_MEM_SHARE
from kvmpoison.virt.kvm.private_mem import KVM_EXIT_MEMORY_FAULT, KVM_MEMORY_EXIT_FLAG_PRIVATE

GPA = 0x30000
SECRET = b"guest secret"
V6_18 = KernelConfig(version=KernelVersion.V6_18)


def machine(integrity: IntegrityMode = IntegrityMode.OFF, backing: str = "memfd",
            design: str = "hardened", **kw: object) -> Machine:
    return Machine(Config(design=design, integrity=integrity, backing=backing), **kw)  # type: ignore[arg-type]


def private(m: Machine, gpa: int = GPA, data: bytes = SECRET) -> int:
    """The guest stores ``data`` at ``gpa``; returns the backing pfn."""
    assert m.guest.store(gpa, data).cell == "ok"
    return m.vm.hardened_private[gpa >> PAGE_SHIFT]


def vmm_pte(m: Machine, gpa: int = GPA) -> int:
    mm = m.vmm.proc.task.mm
    assert mm is not None
    return mm.pgd.get(m.vmm.gpa_to_hva(gpa))


def frame(m: Machine, pfn: int, n: int = len(SECRET)) -> bytes:
    got = m.kernel.core.hw.read(pfn << PAGE_SHIFT, n, 0).data
    assert got is not None
    return got


# -- registration ---------------------------------------------------------------------------


def test_design_is_registered_on_6_18_with_its_hook() -> None:
    d = DESIGNS["hardened"]
    assert d.protection is Protection.HARDENED and d.kernel.version is KernelVersion.V6_18
    assert d.hooks().guest_private and d.scrub_on_free and not d.unpoison_on_free
    with pytest.raises(ValueError, match=r"needs kernel 6\.1 or later"):
        Machine(Config(design="hardened", kernel=KernelConfig()))


# -- its own marker and flag (E4, E13, E15, E16) ---------------------------------------------


def test_marker_round_trip_carries_the_pfn_and_is_not_poison() -> None:
    types = SwapTypes.for_config(V6_18)
    entry = make_guest_private_entry(0x12345, types)
    assert is_guest_private_entry(entry, types) and guest_private_entry_to_pfn(entry) == 0x12345
    assert pte_marker_get(entry) & PteMarker.GUEST_PRIVATE
    assert not is_poisoned_swp_entry(entry, types)  # never mistaken for a hwpoison entry
    with pytest.raises(ValueError, match="no PTE markers"):
        make_guest_private_entry(1, SwapTypes.for_config(KernelConfig()))


def test_private_page_has_its_own_flag_and_marker_and_the_vmm_gets_adrerr() -> None:
    m = machine()
    pfn = private(m)
    core = m.kernel.core
    page = core.pages[pfn]
    assert PageGuestPrivate(page) and not PageHWPoison(page) and core.num_poisoned_pages == 0
    entry = pte_to_swp_entry(vmm_pte(m), core.kcfg)
    assert is_guest_private_entry(entry, core.swap_types)
    assert guest_private_entry_to_pfn(entry) == pfn
    out = m.vmm.load(GPA)
    assert out.cell == "sig:SIGBUS:BUS_ADRERR"  # not BUS_MCEERR_AR: no VMM takes it for an MCE
    assert m.guest.load(GPA, len(SECRET)).data == SECRET


def test_real_memory_error_on_a_private_page_is_reported_as_one() -> None:
    m = machine()
    pfn = private(m)
    core = m.kernel.core
    assert memory_failure(core, pfn, MF_ACTION_REQUIRED) == -errno.EBUSY  # the file keeps it
    page = core.pages[pfn]
    assert PageHWPoison(page) and PageGuestPrivate(page)
    # rfc-v2 livelocks here (the SPTE still maps the frame); the design zaps it, and the
    # guest's access becomes a memory-error signal to the vCPU thread
    assert m.guest.load(GPA).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert m.vmm.load(GPA).cell == "sig:SIGBUS:BUS_MCEERR_AR"


def test_unpoison_and_soft_offline_keep_their_meaning() -> None:
    m = machine()
    pfn = private(m)
    core = m.kernel.core
    assert unpoison_memory(core, pfn) == -errno.EBUSY  # not poisoned: nothing to undo
    assert core.soft_offline_page is not None and core.soft_offline_page(pfn, 0) == -errno.EBUSY
    assert PageGuestPrivate(core.pages[pfn]) and m.vmm.load(GPA).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.guest.load(GPA, len(SECRET)).data == SECRET


# -- sharing without a cap, and unshare (E9, E10, E11) -----------------------------------------


def test_forty_discontiguous_shares_all_hold() -> None:
    for design, survives in (("rfc-v2", False), ("hardened", True)):
        m = machine(design=design)
        gfns = [0x100 + 2 * i for i in range(40)]
        for g in gfns:
            assert m.guest.store(g << PAGE_SHIFT, b"buf").cell == "ok"
            assert m.guest.share(g, 1) == 0
        last = gfns[-1] << PAGE_SHIFT
        m.vm.zap_gfn_range(0, 1 << 20)  # any zap: the guest faults every page again
        assert m.guest.load(last, 3).cell == "ok"
        assert (m.vmm.load(last, 3).data == b"buf") is survives, design


def test_a_td_page_shared_again_is_scrubbed_as_it_leaves_the_td() -> None:
    m = machine(IntegrityMode.CI)
    pfn = private(m)
    hw = m.kernel.core.hw
    assert pfn in m.vm.td_pages and hw.line_state(pfn << PAGE_SHIFT).td
    assert m.guest.share(GPA >> PAGE_SHIFT, 1) == 0
    assert pfn not in m.vm.td_pages and not PageGuestPrivate(m.kernel.core.pages[pfn])
    assert not hw.line_state(pfn << PAGE_SHIFT).td  # scrubbed: no TD line left
    assert frame(m, pfn) == bytes(len(SECRET))
    assert m.vmm.load(GPA, len(SECRET)).data == bytes(len(SECRET))


def test_share_range_checks() -> None:
    m = machine()
    assert m.guest.hypercall(KVM_HC_MEM_SHARE, 0x200, 1 << 40) == 0  # no loop over the range
    assert m.guest.hypercall(KVM_HC_MEM_SHARE, (1 << 64) - 1, 2) == -KVM_EINVAL  # it wraps
    assert m.guest.hypercall(KVM_HC_MEM_UNSHARE, 0x200, 0) == 0


def test_unshare_takes_the_page_from_every_mapping() -> None:
    m = machine()
    vhost = m.process("vhost")
    gfn = GPA >> PAGE_SHIFT
    assert m.guest.share(gfn, 1) == 0
    assert m.guest.store(GPA, b"shared io").cell == "ok"
    assert m.vmm.ram_fd is not None
    fd = vhost.install(m.vmm.proc.task.fds[m.vmm.ram_fd])  # the VMM hands its memfd over
    addr = vhost.mmap(0, m.vmm.ram_size, 3, 0x01, fd, 0).value
    assert isinstance(addr, int)
    assert vhost.load(addr + GPA, 9).data == b"shared io"
    assert m.vmm.load(GPA, 9).data == b"shared io"
    assert m.guest.unshare(gfn, 1) == 0
    for mm, hva in ((m.vmm.proc.task.mm, m.vmm.gpa_to_hva(GPA)), (vhost.task.mm, addr + GPA)):
        assert mm is not None and len(guest_private_markers(mm, hva, hva + PAGE_SIZE)) == 1
    assert m.vmm.load(GPA).cell == "sig:SIGBUS:BUS_ADRERR"
    assert vhost.load(addr + GPA).cell == "sig:SIGBUS:BUS_ADRERR"
    assert m.guest.load(GPA, 9).data == b"shared io"  # the guest keeps its page


def test_reboot_makes_every_old_share_private_again() -> None:
    m = machine()
    assert m.guest.share(GPA >> PAGE_SHIFT, 1) == 0
    assert m.guest.store(GPA, b"old").cell == "ok"
    m.guest.reboot()
    assert m.guest.store(GPA, b"new kernel secret").cell == "ok"
    assert m.vmm.load(GPA).cell == "sig:SIGBUS:BUS_ADRERR"


# -- ownership (E5, E7, E8, E37, E38) ------------------------------------------------------------


def test_a_second_vm_on_the_file_and_an_alias_are_refused() -> None:
    m = machine()
    private(m)
    with pytest.raises(VmSetupError) as failed:
        m.add_vm(VmSpec(name="b", share_ram_with="vm0"))
    assert failed.value.errno == errno.EBUSY
    assert m.instances["b"].vm.memslots == []  # b's VMM lives on, its VM has no RAM
    alias = m.vm.set_user_memory_region(1, 0x1000_0000, PAGE_SIZE, m.vmm.gpa_to_hva(GPA))
    assert alias == -errno.EEXIST


def test_bindings_survive_kvm_id_reuse_and_vm_exit() -> None:
    m = Machine(Config(design="hardened", integrity=IntegrityMode.OFF),
                vms=[VmSpec("first")], kvm_id_bits=1)
    first = m.instances["first"]
    pfn = private(m)
    second = m.add_vm(VmSpec("second", backing="anon"))
    third = m.add_vm(VmSpec("third", backing="anon"))
    assert first.vm.ident == third.vm.ident == 0  # the counter wrapped
    assert len({first.vm.binding, second.vm.binding, third.vm.binding}) == 3
    assert int(m.kvm.hardened_owner[pfn]) == first.vm.binding
    # first's VM exits while a keeper holds the file: its pages stay bound to the dead binding,
    # and a new VM on the file is refused until they are gone
    keeper = m.process("keeper")
    assert first.vmm.ram_fd is not None
    ram_fd = keeper.install(first.vmm.proc.task.fds[first.vmm.ram_fd])
    m.destroy_vm("first")
    assert int(m.kvm.hardened_owner[pfn]) == first.vm.binding and first.vm.dead
    vm4 = m.kvm.create_vm(keeper.task, Protection.HARDENED)
    addr = keeper.mmap(0, first.vmm.ram_size, 3, 0x01, ram_fd, 0).value
    assert isinstance(addr, int)
    assert vm4.set_user_memory_region(0, 0, first.vmm.ram_size, addr) == -errno.EBUSY
    assert keeper.ftruncate(ram_fd, 0).cell == "ret:0"  # the pages go, scrubbed
    assert int(m.kvm.hardened_owner[pfn]) == m.kvm.NO_BINDING
    assert vm4.set_user_memory_region(0, 0, first.vmm.ram_size, addr) == 0


def test_another_vms_page_is_an_exit_not_a_signal() -> None:
    m = machine()
    pfn = private(m)
    m.kvm.hardened_owner[pfn] = 999  # as if another VM had bound it
    m.vm.zap_gfn_range(0, 1 << 20)
    out = m.guest.load(GPA)
    assert out.cell == "err:EFAULT" and "KVM_EXIT_MEMORY_FAULT" in out.detail
    ex = m.vm.hardened_exits[-1]
    assert ex.exit_reason == KVM_EXIT_MEMORY_FAULT and ex.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


# -- scrub on free (E13, E36) ------------------------------------------------------------------


def test_a_freed_private_page_is_scrubbed_and_released() -> None:
    m = machine(backing="anon")
    pfn = private(m)
    assert frame(m, pfn) == SECRET
    m.destroy_vm("vm0")  # the VMM exits: the marker's reference was the last
    core = m.kernel.core
    assert frame(m, pfn) == bytes(len(SECRET))  # no guest data left in the free frame
    assert not PageGuestPrivate(core.pages[pfn])
    assert int(m.kvm.hardened_owner[pfn]) == m.kvm.NO_BINDING and m.kvm.hardened_scrubbed >= 1


def test_a_td_page_leaves_the_td_when_freed() -> None:
    m = machine(IntegrityMode.CI, backing="anon")
    pfn = private(m)
    hw = m.kernel.core.hw
    assert pfn in m.vm.td_pages and hw.line_state(pfn << PAGE_SHIFT).td
    m.destroy_vm("vm0")
    assert pfn not in m.vm.td_pages and m.kvm.hardened_scrubbed >= 1
    assert not hw.line_state(pfn << PAGE_SHIFT).td  # no TD line goes back to the allocator


def test_a_hwpoisoned_private_page_is_not_scrubbed() -> None:
    m = machine()
    pfn = private(m)
    core = m.kernel.core
    SetPageHWPoison(core.pages[pfn])  # a real error: a MOVDIR64B would hide it
    kvm_hardened_free_hook(m.kvm)(np.array([pfn], dtype=np.int64))
    assert frame(m, pfn) == SECRET and m.kvm.hardened_scrubbed == 0
    assert not PageGuestPrivate(core.pages[pfn]) and PageHWPoison(core.pages[pfn])


# -- punch-hole and truncate (E36, E43) -----------------------------------------------------------


@pytest.mark.parametrize("how", ["punch", "truncate"])
def test_punch_and_truncate_drop_the_marker_scrub_and_exit(how: str) -> None:
    m = machine()
    pfn = private(m)
    fd = m.vmm.ram_fd
    assert fd is not None
    if how == "punch":
        out = m.vmm.proc.fallocate(fd, 0x3, GPA, PAGE_SIZE)  # PUNCH_HOLE | KEEP_SIZE
    else:
        out = m.vmm.proc.ftruncate(fd, GPA)
    assert out.cell == "ret:0"
    assert vmm_pte(m) == 0  # the marker went (v6.18 keeps hwpoison entries on a punch)
    assert frame(m, pfn) == bytes(len(SECRET)) and not PageGuestPrivate(m.kernel.core.pages[pfn])
    got = m.guest.load(GPA, len(SECRET))
    assert got.cell == "err:EFAULT" and "KVM_EXIT_MEMORY_FAULT" in got.detail  # not old data
    if how == "punch":  # the guest converts the gfn again and gets a fresh page
        assert m.guest.unshare(GPA >> PAGE_SHIFT, 1) == 0
        assert m.guest.load(GPA, len(SECRET)).data == bytes(len(SECRET))


def test_madv_dontneed_on_shmem_ram_does_not_lose_the_private_page() -> None:
    m = machine()
    private(m)
    assert m.vmm.proc.madvise(m.vmm.gpa_to_hva(GPA), PAGE_SIZE, MADV_DONTNEED).cell == "ret:0"
    assert m.guest.load(GPA, len(SECRET)).data == SECRET  # RFC v2: KVM_RUN -EFAULT (p09)
    assert m.vmm.load(GPA).cell == "sig:SIGBUS:BUS_ADRERR"


# -- defined refusals ---------------------------------------------------------------------------


def test_fork_of_anonymous_private_ram_fails_with_eperm() -> None:
    m = machine(backing="anon")
    private(m)
    alive = sum(t.alive for t in m.kernel.tasks.values())
    with pytest.raises(ForkError) as failed:
        m.vmm.proc.fork()
    assert failed.value.errno == errno.EPERM
    assert sum(t.alive for t in m.kernel.tasks.values()) == alive  # no child runs
    assert m.guest.load(GPA, len(SECRET)).data == SECRET


def test_fork_of_shmem_ram_succeeds_and_the_child_is_refused() -> None:
    m = machine()
    private(m)
    child = m.vmm.proc.fork()
    assert child.load(m.vmm.gpa_to_hva(GPA)).cell == "sig:SIGBUS:BUS_ADRERR"


def test_pageout_is_refused_and_nothing_is_swapped() -> None:
    m = machine(backing="anon")
    private(m)
    core = m.kernel.core
    out = m.vmm.proc.madvise(m.vmm.gpa_to_hva(GPA), 2 * PAGE_SIZE, MADV_PAGEOUT)
    assert out.cell == "err:EPERM" and core.swap_space == {}
    assert m.guest.load(GPA, len(SECRET)).data == SECRET


def test_move_pages_offline_and_cma_refuse_a_private_page() -> None:
    for design, move, offline in (("rfc-v2", -errno.EFAULT, 0),
                                  ("hardened", -errno.EBUSY, -errno.EBUSY)):
        m = machine(design=design, backing="anon")
        assert m.guest.store(GPA, SECRET).cell == "ok"
        mm = m.vmm.proc.task.mm
        assert mm is not None
        core = m.kernel.core
        pfn = m.vm.hardened_private[GPA >> PAGE_SHIFT] if design == "hardened" else \
            int(np.flatnonzero(m.kvm.kvm_pfn_map.owner == m.vm.ident)[0])
        assert move_pages(mm, [m.vmm.gpa_to_hva(GPA)]) == [move], design
        assert offline_pages(core, pfn, 1) == offline, design  # E17: RFC offlines it
        assert alloc_contig_range(core, pfn, 1) == -errno.EBUSY
    mm = m.vmm.proc.task.mm
    assert mm is not None
    shared = m.vmm.gpa_to_hva(0x10 << PAGE_SHIFT)  # the swiotlb page, shared
    assert move_pages(mm, [shared]) == [-errno.EFAULT]  # a hole of anonymous memory
    assert m.vmm.store(0x10 << PAGE_SHIFT, b"io").cell == "ok"
    assert move_pages(mm, [shared]) == [0]  # found on node 0, where it already is


def test_long_term_pins_gup_and_core_dumps_are_refused() -> None:
    m = machine()
    private(m)
    mm = m.vmm.proc.task.mm
    assert mm is not None
    hva = m.vmm.gpa_to_hva(GPA)
    pages: list[Page] = []
    assert pin_user_pages(mm, hva, 1, FOLL.WRITE | FOLL.LONGTERM, pages) == -errno.EFAULT
    assert get_dump_page(mm, hva) is None


def test_a_page_pinned_before_protection_is_not_taken() -> None:
    m = machine()
    mm = m.vmm.proc.task.mm
    assert mm is not None
    hva = m.vmm.gpa_to_hva(GPA)
    pages: list[Page] = []
    assert pin_user_pages(mm, hva, 1, FOLL.WRITE | FOLL.LONGTERM, pages) == 1
    out = m.guest.store(GPA, SECRET)
    assert out.cell == "err:EFAULT" and "pinned" in out.detail  # RFC: unmapped under the DMA
    assert m.vmm.load(GPA).cell == "ok" and not PageGuestPrivate(pages[0])


@pytest.mark.parametrize("path", ["process_vm_readv", "proc_pid_mem_read", "ptrace_peek",
                                  "pagecache_read", "load", "store", "fork_child_load"])
def test_every_host_path_is_refused_with_a_defined_cell(path: str) -> None:
    from kvmpoison.matrix.designs import run_design_cell
    cell = run_design_cell("hardened", "private", path).cell
    assert cell in {"err:EFAULT", "err:EIO", "err:EPERM", "sig:SIGBUS:BUS_ADRERR"}, cell


# -- KVM's own accesses (E28, E30) --------------------------------------------------------------


def test_kvm_access_is_owner_checked_and_audited() -> None:
    m = machine()
    pfn = private(m)
    assert m.vm.read_guest(GPA, len(SECRET)) == SECRET  # plain KVM: emulation may read it
    assert m.vm.hardened_audit[-1] == ("read", GPA, "allowed")
    m.kvm.hardened_owner[pfn] = 999
    assert m.vm.read_guest(GPA, 4) == -errno.EFAULT
    assert m.vm.hardened_audit[-1][2].startswith("refused")
    td = machine(IntegrityMode.CI)
    private(td)
    assert td.vm.read_guest(GPA, 4) == -errno.EFAULT  # never a TD's private page
    assert td.vm.write_guest(GPA, b"KVM!") == -errno.EFAULT
    assert td.guest.load(GPA, len(SECRET)).data == SECRET


def test_no_prefetch_maps_a_neighbour() -> None:
    m = machine()
    private(m)
    assert m.vm.ept.get(GPA + PAGE_SIZE) == 0 and m.vm.ept.get(GPA - PAGE_SIZE) == 0


# -- the demo ----------------------------------------------------------------------------------


def test_demo_story_ends_refused_everywhere_with_the_data_intact() -> None:
    from kvmpoison.demo import SECRET as DEMO_SECRET
    from kvmpoison.demo import run_story
    steps = {s.action: s.outcome for s in run_story("hardened")}
    assert steps["load the guest's private page"].cell == "sig:SIGBUS:BUS_ADRERR"
    assert steps["store into the guest's private page"].cell == "sig:SIGBUS:BUS_ADRERR"
    assert steps["process_vm_readv of the private page (GUP)"].cell == "err:EFAULT"
    assert steps["pread the guest-RAM memfd (page cache)"].cell == "err:EPERM"
    assert steps["load the secret back"].data == DEMO_SECRET


def test_a_share_never_releases_a_page_that_now_backs_another_gfn() -> None:
    """The explorer's seed-192 find (I2): gfn 0x30's private page is punched out and freed,
    the same frame then backs gfn 0x31 privately; sharing 0x30 must not strip or scrub
    it through 0x30's stale record."""
    from kvmpoison.explore import InvariantMonitor
    from kvmpoison.scenario.loader import load_text
    from kvmpoison.scenario.ops import RunCtx
    from kvmpoison.scenario.runner import build_machine, perform

    sc = load_text('[scenario]\nname = "t"\n\n[[vm]]\nname = "vm0"\nmemory = 1048576\n\n'
                   '[[step]]\nactor = "guest:vm0"\nop = "load"\ngpa = 0x31000\n', "t.toml")
    ctx = RunCtx(build_machine(sc, "hardened"))
    mon = InvariantMonitor(("I2", "I3"))
    steps: list[tuple[str, str, dict[str, object]]] = [
        ("host", "kvm_read", {"vm": "vm0", "gpa": 0x30000}),
        ("vmm:vm0", "punch_hole", {"gpa": 0x30000}),
        ("guest:vm0", "store", {"gpa": 0x31000, "data": "secret"}),
        ("guest:vm0", "share", {"gpa": 0x30000}),
        ("guest:vm0", "load", {"gpa": 0x31000, "size": 6}),
    ]
    for actor, op, args in steps:
        mon.before(ctx, actor, op, args)
        out = perform(ctx, actor, op, args)
        assert mon.after(ctx, actor, op, args, out) == [], (op, out)
    assert out.data == b"secret"
