"""The seed's claims on rfc-v2, the baseline hazard, and the RFC's mechanisms (v1 and v2)."""

import errno
import signal

import pytest

from helpers import ok, some
from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm.gup import FOLL, get_user_pages
from kvmpoison.mm.mmap import MAP_SHARED
from kvmpoison.mm.page import PageHWPoison, page_count
from kvmpoison.mm.ptdump import decode
from kvmpoison.outcome import Kind
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import BusCode
from kvmpoison.virt.kvm.kvm_main import PfnMap
from kvmpoison.virt.kvm.mem_protected import kvm_protect_pfn
from kvmpoison.virt.kvm.x86.mmu import spte_present

PAGE = 4096
SECRET = b"guest secret 1234"
GPA = 0x30 * PAGE


def machine(design: str = "rfc-v2", **kw: object) -> Machine:
    m = Machine(Config(design=design, **kw))  # type: ignore[arg-type]
    assert m.guest.store(GPA, SECRET).kind is Kind.OK
    return m


def ram_pfn(m: Machine, gpa: int = GPA) -> int:
    mapping = some(m.vmm.proc.task.fds[some(m.vmm.ram_fd)].f_mapping)
    return int(some(mapping.lookup(gpa // PAGE)))


def test_guest_boot_enables_protection_and_shares_its_buffers() -> None:
    m = Machine(Config(design="rfc-v2"))
    assert m.vm.mem_protected
    assert m.vm.shared_ranges == [(0x0F, 0x20)]  # kvmclock and swiotlb merged
    assert m.guest.log[0] == "KVM_HC_ENABLE_MEM_PROTECTED = 0"


def test_host_touch_gets_sigbus_mceerr_ar() -> None:
    m = machine()
    hva = m.vmm.gpa_to_hva(GPA)
    for out in (m.vmm.load(GPA + 3, 4), m.vmm.store(GPA, b"x")):
        assert out.cell == "sig:SIGBUS:BUS_MCEERR_AR"
        si = some(out.siginfo)
        assert si.signo == signal.SIGBUS and si.code == BusCode.BUS_MCEERR_AR
        assert si.addr_lsb == 12 and si.addr in (hva, hva + 3)
    assert decode(m.vmm.proc.mm.pgd.get(hva), m.kernel.kcfg).kind == "hwpoison"


def test_gup_fails_with_efault_or_ehwpoison() -> None:
    m = machine()
    mm, hva = m.vmm.proc.mm, m.vmm.gpa_to_hva(GPA)
    assert get_user_pages(mm, hva, 1, FOLL(0)) == -14
    assert get_user_pages(mm, hva, 1, FOLL.HWPOISON) == -EHWPOISON
    attacker = m.process("attacker")
    buf = ok(attacker.mmap(0, PAGE, 3, 0x22))
    assert attacker.process_vm_readv(m.vmm.proc, buf, hva, 8).cell == "err:EFAULT"


def test_page_cache_access_gets_eio() -> None:
    m = machine()
    buf = m.vmm.scratch()
    assert m.vmm.pread_ram(GPA, buf, 8).cell == "err:EIO"
    assert m.vmm.pwrite_ram(GPA, buf, 8).cell == "err:EIO"


def test_kvm_still_maps_the_page_and_the_guest_reads_its_data() -> None:
    m = machine(integrity=IntegrityMode.OFF)  # plain KVM: TDX hides the plaintext
    m.vmm.store(GPA, b"VMM was here")  # refused with SIGBUS
    assert m.guest.load(GPA, len(SECRET)).data == SECRET
    entry = spte_present(m.vm, GPA, write=False)
    assert entry is not None and entry.pfn == ram_pfn(m)
    page = m.kernel.core.pages[entry.pfn]
    assert PageHWPoison(page) and m.kvm.kvm_pfn_map.get(entry.pfn) == m.vm.ident
    assert m.vm.read_guest(GPA, len(SECRET)) == SECRET  # KVM's own access (copy_from_guest)


def test_baseline_hazard_is_a_machine_check_or_worse() -> None:
    m = machine("baseline")
    assert m.vmm.load(GPA, len(SECRET)).data == bytes(len(SECRET))  # TD bit: host reads zeros
    assert m.vmm.store(GPA, b"oops").kind is Kind.OK  # writes are never checked
    out = m.guest.load(GPA, len(SECRET))
    assert out.cell == "mce:td-fatal" and m.vm.td_fatal
    assert m.guest.load(0, 8).cell == "mce:td-fatal"  # the TD stays dead
    plat = PlatformConfig(mem_bytes=64 << 20, integrity=IntegrityMode.CI, seam_nr=False)
    m = machine("baseline", platform=plat)
    m.vmm.store(GPA, b"oops")
    assert m.guest.load(GPA, 4).cell == "panic" and m.halted


@pytest.mark.parametrize(("design", "read", "proc_mem"),
                         [("rfc-v1", "ret:8", "ret:8"), ("rfc-v2", "err:EFAULT", "err:EIO")])
def test_v1_hole_lets_gup_users_read_private_data(design: str, read: str, proc_mem: str) -> None:
    m = machine(design, integrity=IntegrityMode.OFF)  # plain KVM: TDX hides the plaintext
    attacker = m.process("attacker")
    buf = ok(attacker.mmap(0, PAGE, 3, 0x22))
    attacker.store(buf, bytes(8))
    hva = m.vmm.gpa_to_hva(GPA)
    assert attacker.process_vm_readv(m.vmm.proc, buf, hva, 8).cell == read
    fd = ok(attacker.open_proc_mem(m.vmm.proc, 2))
    assert attacker.pread(fd, buf, 8, hva).cell == proc_mem
    if design == "rfc-v1":
        assert attacker.load(buf, 8).data == SECRET[:8]


def test_protection_unmaps_every_process_mapping_the_file() -> None:
    m = Machine(Config(design="rfc-v2"))
    vhost = m.process("vhost")
    fd = vhost.install(m.vmm.proc.task.fds[some(m.vmm.ram_fd)])
    vaddr = ok(vhost.mmap(0, m.vmm.ram_size, 3, MAP_SHARED, fd))
    assert vhost.load(vaddr + GPA, 1).kind is Kind.OK
    m.guest.store(GPA, SECRET)
    assert vhost.load(vaddr + GPA, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    page = m.kernel.core.pages[ram_pfn(m)]
    # page cache + one reference per hwpoison entry (the RFC's patch 10)
    assert page_count(page) == 3


def test_non_swap_backed_pages_are_refused() -> None:
    m = Machine(Config(design="rfc-v2"))
    inode = m.kernel.create_file("/img", b"\x01" * PAGE)
    fd = ok(m.vmm.proc.open("/img", 2))
    hva = ok(m.vmm.proc.mmap(0, PAGE, 3, MAP_SHARED, fd))
    m.vmm.proc.load(hva, 1)
    pfn = some(some(inode.mapping).lookup(0))
    assert kvm_protect_pfn(m.vm, 0x100, pfn) is False
    m1 = Machine(Config(design="rfc-v1"))
    inode = m1.kernel.create_file("/img", b"\x01" * PAGE)
    fd = ok(m1.vmm.proc.open("/img", 2))
    hva = ok(m1.vmm.proc.mmap(0, PAGE, 3, MAP_SHARED, fd))
    m1.vmm.proc.load(hva, 1)
    from kvmpoison.outcome import Halt

    with pytest.raises(Halt, match="VM_BUG_ON_PAGE"):
        kvm_protect_pfn(m1.vm, 0x100, some(some(inode.mapping).lookup(0)))


def test_33rd_shared_range_warns_and_the_page_is_poisoned_again() -> None:
    # plain KVM: on TDX a private-to-shared conversion does not keep the data
    m = Machine(Config(design="rfc-v2", vm_mem=8 << 20, integrity=IntegrityMode.OFF))
    base = 0x100
    for i in range(31):  # 30 more ranges: kvmclock+swiotlb already use one
        m.guest.share(base + 2 * i, 1)
    assert len(m.vm.shared_ranges) == 32 and not m.kernel.core.dmesg
    gfn = base + 100
    assert m.guest.store(gfn * PAGE, b"io buffer").kind is Kind.OK  # private first
    m.guest.share(gfn, 1)
    assert any("shared ranges" in line for line in m.kernel.core.dmesg)
    assert (gfn, gfn + 1) not in m.vm.shared_ranges
    assert m.vmm.load(gfn * PAGE, 4).data == b"io b"  # poison cleared: the VMM sees it
    m.vm.zap_gfn_range(gfn, gfn + 1)
    assert m.guest.load(gfn * PAGE, 4).kind is Kind.OK  # the next EPT fault re-protects
    assert m.vmm.load(gfn * PAGE, 4).cell == "sig:SIGBUS:BUS_MCEERR_AR"


def test_share_reinstates_the_present_pte() -> None:
    m = machine(integrity=IntegrityMode.OFF)  # plain KVM: TDX hides the plaintext
    assert m.vmm.load(GPA, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    m.guest.share(GPA // PAGE, 1)
    assert m.vmm.load(GPA, len(SECRET)).data == SECRET  # do_swap_page restores the PTE


@pytest.mark.parametrize(("design", "back_in_buddy"), [("rfc-v2", True), ("rfc-v1", False)])
def test_freed_protected_pages_unpoison_only_in_v2(design: str, back_in_buddy: bool) -> None:
    m = machine(design)
    pfn = ram_pfn(m)
    vmm = m.vmm
    assert vmm.proc.fallocate(some(vmm.ram_fd), 3, GPA, PAGE).cell == "ret:0"  # punch the hole
    page = m.kernel.core.pages[pfn]
    # v5.12's zap with details keeps the hwpoison entry, and (patch 10) its reference
    assert page_count(page) == 1 and PageHWPoison(page)
    assert vmm.proc.munmap(vmm.ram_hva, vmm.ram_size).cell == "ret:0"  # zaps the entry
    assert page_count(page) == 0
    assert PageHWPoison(page) is not back_in_buddy
    assert (m.kernel.core.buddy.withheld_hwpoison == 0) is back_in_buddy


def test_prefetch_is_off_while_memory_is_protected() -> None:
    """v5.12 prefetches a run the faulting SPTE ends (0x40..0x46 for a fault at 0x47)."""
    for design, prefetched in (("baseline", True), ("rfc-v2", False)):
        m = Machine(Config(design=design))
        for i in range(8):
            m.vmm.store(0x40 * PAGE + i * PAGE, b"\x01")  # present in the VMM
        m.guest.load(0x47 * PAGE, 1)
        for gfn in range(0x40, 0x47):
            assert (spte_present(m.vm, gfn * PAGE, False) is not None) is prefetched


def test_v5_12_prefetch_drops_the_last_run_and_stops_at_a_gup_failure() -> None:
    m = Machine(Config(design="baseline"))
    for i in (0, 1, 3, 4, 5, 6, 7):  # 0x42 is not mapped in the VMM
        m.vmm.store(0x40 * PAGE + i * PAGE, b"\x01")
    m.guest.load(0x40 * PAGE, 1)  # first gfn of its block: the only run is the last one
    assert [g for g in range(0x40, 0x48) if spte_present(m.vm, g * PAGE, False)] == [0x40]
    m.guest.load(0x45 * PAGE, 1)  # run 0x41..0x44 ends at the fault; GUP-fast stops at 0x42
    assert [g for g in range(0x40, 0x48) if spte_present(m.vm, g * PAGE, False)] == [0x40, 0x41,
                                                                                      0x45]


def test_fork_takes_and_munmap_drops_entry_references() -> None:
    m = Machine(Config(design="rfc-v2", backing="anon"))
    m.guest.store(GPA, SECRET)
    pfn = some(spte_present(m.vm, GPA, False)).pfn
    page = m.kernel.core.pages[pfn]
    before = page_count(page)
    child = m.vmm.proc.fork()
    assert page_count(page) == before + 1
    assert child.load(child.mm.vmas[0].vm_start + GPA, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    child.munmap(m.vmm.ram_hva, m.vmm.ram_size)
    assert page_count(page) == before
    assert pte_pfn(0) == 0


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_bulk_protection_equals_page_by_page(backing: str) -> None:
    import numpy as np

    from kvmpoison.virt.kvm.mem_protected import kvm_protect_range

    def build() -> Machine:
        m = Machine(Config(design="rfc-v2", backing=backing))
        vhost = m.process("vhost")
        if backing == "memfd":
            fd = vhost.install(m.vmm.proc.task.fds[some(m.vmm.ram_fd)])
            vhost.mmap(0, m.vmm.ram_size, 3, MAP_SHARED, fd)
        m.vmm.proc.madvise(m.vmm.ram_hva, m.vmm.ram_size, 0)  # nothing
        for gfn in range(0x40, 0x80):
            m.vmm.store(gfn * PAGE, bytes([gfn]))
        return m

    bulk, scalar = build(), build()
    assert kvm_protect_range(bulk.vm, 0x40, 0x40) == 0x40
    for gfn in range(0x40, 0x80):
        hva = scalar.vmm.gpa_to_hva(gfn * PAGE)
        pfn = pte_pfn(scalar.vmm.proc.mm.pgd.get(hva))
        assert kvm_protect_pfn(scalar.vm, gfn, pfn)
    for m in (bulk, scalar):
        assert m.vmm.load(0x50 * PAGE, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    a, b = bulk.kernel.core.pages, scalar.kernel.core.pages
    assert (a.flags == b.flags).all() and (a._refcount == b._refcount).all()
    assert (a._mapcount == b._mapcount).all()
    assert (bulk.kvm.kvm_pfn_map.owner == scalar.kvm.kvm_pfn_map.owner).all()
    ra = bulk.vmm.proc.mm.pgd
    rb = scalar.vmm.proc.mm.pgd
    hvas = [bulk.vmm.gpa_to_hva(g * PAGE) for g in range(0x3F, 0x81)]
    assert [ra.get(h) for h in hvas] == [rb.get(h) for h in hvas]
    assert np.count_nonzero(bulk.kvm.kvm_pfn_map.owner >= 0) == 0x40


def test_injected_xa_store_failure_stores_nothing_once() -> None:
    pfn_map = PfnMap(16)
    pfn_map.fail_stores = 1
    assert pfn_map.store(3, 7) == -errno.ENOMEM and pfn_map.get(3) is None
    assert pfn_map.store(3, 7) == 0 and pfn_map.get(3) == 7 and len(pfn_map) == 1


def test_memslot_overlap_is_eexist_and_keeps_the_old_slot() -> None:
    vm = Machine(Config(design="rfc-v2")).vm
    ram = vm.memslots[0]
    hva = ram.userspace_addr
    assert vm.set_user_memory_region(1, 0x10000000, PAGE, hva) == 0  # an alias of gpa 0
    # moving slot 1 onto RAM overlaps slot 0: refused, and slot 1 stays where it was
    assert vm.set_user_memory_region(1, 0, PAGE, hva) == -errno.EEXIST
    assert vm.gfn_to_hva(0x10000) == vm.gfn_to_hva(0) == hva
    assert vm.set_user_memory_region(1, 0, 0, hva) == 0  # size 0 deletes
    assert vm.gfn_to_memslot(0x10000) is None


@pytest.mark.parametrize(("slot", "gpa", "size", "hva"), [
    (32764, 0x10000000, PAGE, 0),  # KVM_USER_MEM_SLOTS (SHRT_MAX - 3 from v5.12)
    (1 << 16, 0x10000000, PAGE, 0),  # address space 1 (SMM) is not modelled
    (1, 0x10000000, 1, 0),  # size not page aligned
    (1, (1 << 64) - PAGE, 2 * PAGE, 0),  # gpa + size wraps
    (1, 0x10000000, 2 * PAGE, (1 << 47) - 2 * PAGE),  # beyond TASK_SIZE_MAX
    (1, 0x10000000, -PAGE, 0),  # not a u64
])
def test_memslot_argument_checks(slot: int, gpa: int, size: int, hva: int) -> None:
    vm = Machine(Config(design="rfc-v2")).vm
    slots = list(vm.memslots)
    assert vm.set_user_memory_region(slot, gpa, size, hva or vm.memslots[0].userspace_addr) \
        == -errno.EINVAL
    assert vm.memslots == slots
