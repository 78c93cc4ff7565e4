"""The access matrix from the VMM's side: every design x page state.

Each cell builds a fresh :class:`~kvmpoison.machine.Machine` for the design,
puts one guest page T into the page state, and runs one path against T's
address in the VMM (a remote path runs in another host process). The MATRIX
paths use the same set-up constants as the real-kernel matrix; the rows
below are the KVM-level ones of issue 4.

Under ``gmem`` a "private" page is a gfn whose attribute is private: the
guest's data lives in the VM's guest_memfd, which the VMM never maps. The
VMM's address of that gfn (guest RAM's ``userspace_addr`` + gpa) still
exists: it is the gfn's *shared* backing, a memfd page that holds zeros (or
whatever the VMM wrote there), not the guest's data. So every host path at
that address succeeds on an unrelated page, and the guest reads its own
data back; "hwpoisoned" is a DRAM error on the guest_memfd frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.config import DEFAULT_INTEGRITY, Config
from kvmpoison.machine import Machine
from kvmpoison.matrix import protocol as proto
from kvmpoison.matrix.model import Probe, run_path
from kvmpoison.mm.file import O_DIRECT, O_RDWR
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.memory_failure import memory_failure
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE
from kvmpoison.mm.page_flags import PG
from kvmpoison.outcome import Halt, Outcome
from kvmpoison.virt.kvm.gmem_memslot import kvm_gmem_cached_pfn, kvm_mem_is_private
from kvmpoison.virt.kvm.kvm_main import Vm, ept_spte_4k
from kvmpoison.vmm.vmm import Vmm

PAGE_STATES = ("shared", "private", "private-untouched", "hwpoisoned")
KVM_PATHS = ("fork_child_load", "kvm_emulated_access", "guest_load",
             "guest_load_after_vmm_store", "pagecache_read", "pagecache_write",
             "real_memory_error_then_free")
PATHS = proto.PATHS + KVM_PATHS
GUEST_DATA = b"guest-private-data"
PRIVATE_GFN = 0x30  # the page before it (0x2f) is never touched by the guest


@dataclass
class DesignCell:
    design: str
    state: str
    path: str
    outcome: Outcome

    @property
    def column(self) -> str:
        return f"{self.design}/{self.state}"

    @property
    def cell(self) -> str:
        return self.outcome.cell


def _target(m: Machine, state: str) -> int:
    """Put the state's guest page in place; returns its gpa."""
    g = m.guest
    if state == "shared":
        gpa = g.layout.swiotlb_gpa + PAGE_SIZE
        _expect(g.store(gpa - PAGE_SIZE, bytes([proto.PAGE0_FILL]) * PAGE_SIZE), "page 0")
        _expect(g.store(gpa, GUEST_DATA), "guest writes the shared page")
        return gpa
    if state not in PAGE_STATES:
        raise ValueError(f"unknown page state {state!r} (known: {', '.join(PAGE_STATES)})")
    gpa = PRIVATE_GFN << PAGE_SHIFT
    if state in ("private", "hwpoisoned"):
        _expect(g.store(gpa, GUEST_DATA), "guest writes its private page")
    if state == "hwpoisoned":
        _real_memory_error(m, gpa)
    return gpa


def _real_memory_error(m: Machine, gpa: int, vmm: Vmm | None = None,
                       vm: Vm | None = None) -> int:
    """A DRAM error on the page backing ``gpa``: poisoned line plus memory_failure()."""
    pfn = backing_pfn(m, gpa, vmm, vm)
    m.kernel.core.hw.inject_dram_error(pfn << PAGE_SHIFT)
    memory_failure(m.kernel.core, pfn, 0)
    return pfn


def backing_pfn(m: Machine, gpa: int, vmm: Vmm | None = None, vm: Vm | None = None) -> int:
    """The frame behind guest page ``gpa``: the guest_memfd page of a private gfn, else the
    RAM file's cache (for a private gfn with no guest_memfd page: the VMM's page at that
    address), else the EPT."""
    vmm = vmm or m.vmm
    vm = vm or m.vm
    if kvm_mem_is_private(vm, gpa >> PAGE_SHIFT):
        pfn = kvm_gmem_cached_pfn(vm, gpa >> PAGE_SHIFT)
        if pfn is not None:
            return pfn
    mapping = vmm.proc.task.fds[vmm.ram_fd].f_mapping if vmm.ram_fd is not None else None
    if mapping is not None:
        pfn = mapping.lookup(gpa >> PAGE_SHIFT)
        if pfn is not None:
            return pfn
    raw = ept_spte_4k(vm.ept, gpa)  # a 2M SPTE: the subpage's pfn
    if raw:
        return (raw >> PAGE_SHIFT) & ((1 << 40) - 1)
    raise ValueError(f"gpa {gpa:#x} has no backing page yet")


def _has_backing(m: Machine, gpa: int, vmm: Vmm | None = None, vm: Vm | None = None) -> bool:
    try:
        backing_pfn(m, gpa, vmm, vm)
    except ValueError:
        return False
    return True


def _expect(out: Outcome, what: str) -> None:
    if not out.succeeded:
        raise AssertionError(f"set-up step {what!r} failed: {out}")


def _probe(m: Machine, gpa: int) -> Probe:
    return make_probe(m, m.vmm, m.vmm.gpa_to_hva(gpa))


def make_probe(m: Machine, vmm: Vmm, t: int) -> Probe:
    """docs/matrix.md helpers around address ``t`` of a VMM: data files, scratch, an attacker."""
    kernel = m.kernel
    if "/data" not in kernel.files:
        kernel.create_file("/data", bytes([proto.FILE_FILL]) * 2 * PAGE_SIZE)
    file_fd = _value(vmm.proc.open("/data", O_RDWR))
    direct_fd = _value(vmm.proc.open("/data", O_RDWR | O_DIRECT))
    attacker = m.process("attacker")
    abuf = _value(attacker.mmap(0, PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS))
    _expect(attacker.store(abuf, bytes(PAGE_SIZE)), "touch attacker buffer")
    return Probe(kernel, vmm.proc, t, vmm.scratch(), attacker, abuf, file_fd, direct_fd)


def _value(out: Outcome) -> int:
    _expect(out, "set-up")
    return out.value or 0


def _kvm_path(m: Machine, p: Probe, gpa: int, path: str) -> Outcome:
    vmm = m.vmm
    match path:
        case "fork_child_load":
            return vmm.proc.fork().load(p.t, proto.TRANSFER)
        case "kvm_emulated_access":
            got = m.vm.read_guest(gpa, proto.TRANSFER)
            return Outcome.error(-got) if isinstance(got, int) else Outcome.ok(got)
        case "guest_load":
            return m.guest.load(gpa, len(GUEST_DATA))
        case "guest_load_after_vmm_store":
            vmm.store(gpa, b"VMM!")
            return m.guest.load(gpa, len(GUEST_DATA))
        case "pagecache_read" | "pagecache_write":
            if vmm.ram_fd is None:
                return Outcome.error(9, "anonymous guest RAM has no page cache")
            if path == "pagecache_read":
                return vmm.pread_ram(gpa, p.buf, proto.TRANSFER)
            return vmm.pwrite_ram(gpa, p.buf, proto.TRANSFER)
        case "real_memory_error_then_free":
            return error_then_free(m, gpa)
    raise ValueError(f"unknown path {path!r} (known: {', '.join(PATHS)})")


def error_then_free(m: Machine, gpa: int, vmm: Vmm | None = None,
                    vm: Vm | None = None) -> Outcome:
    """A real error on T's frame, then the frame is freed: does it come back?

    ``ok`` when the bad frame stays out of the allocator. Otherwise it is handed to
    a new process's next anonymous page (the allocator is drained so that it is the
    only free page), and the cell is that process reading it.
    """
    vmm = vmm or m.vmm
    vm = vm or m.vm
    if not _has_backing(m, gpa, vmm, vm):
        return Outcome.ok(detail="no frame backs the page yet")
    pfn = _real_memory_error(m, gpa, vmm, vm)
    if kvm_mem_is_private(vm, gpa >> PAGE_SHIFT) and vmm.gmem_fd is not None:
        vmm.proc.fallocate(vmm.gmem_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, gpa,
                           PAGE_SIZE)
    elif vmm.ram_fd is not None:
        vmm.proc.fallocate(vmm.ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, gpa, PAGE_SIZE)
    # A hole-punch keeps hwpoison entries (zap with details), so the VMM unmaps the page too.
    vmm.proc.munmap(vmm.gpa_to_hva(gpa), PAGE_SIZE)
    core = m.kernel.core
    if core.pages._refcount[pfn] or core.pages.flags[pfn] & core.pages.mask(PG.hwpoison):
        return Outcome.ok(detail="the poisoned frame stays out of the allocator")
    newcomer = m.process("newcomer")
    addr = newcomer.mmap(0, 2 * PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS).value
    assert addr is not None
    newcomer.store(addr, b"\0")  # builds its page tables
    drained = core.buddy.alloc_pages_bulk(core.buddy.nr_free)
    others = drained[drained != pfn]
    core.pages._refcount[pfn] = 0
    core.buddy.free_pages_bulk(np.array([pfn], dtype=np.int64))
    newcomer.store(addr + PAGE_SIZE, b"\0")  # its next page: the only free one
    core.pages._refcount[others] = 0
    core.buddy.free_pages_bulk(others)
    return newcomer.load(addr + PAGE_SIZE, proto.TRANSFER)


def run_design_cell(design: str, state: str, path: str,
                    config: Callable[[str], Config] | None = None) -> DesignCell:
    m = Machine(config(design) if config is not None else Config(design=design))
    try:
        gpa = _target(m, state)
        p = _probe(m, gpa)
        out = run_path(p, path) if path in proto.PATHS else _kvm_path(m, p, gpa, path)
    except Halt as halt:
        out = halt.outcome
    return DesignCell(design, state, path, out)


def run_design_matrix(designs: tuple[str, ...], states: tuple[str, ...] = PAGE_STATES,
                      paths: tuple[str, ...] = PATHS,
                      integrity: IntegrityMode = DEFAULT_INTEGRITY,
                      progress: Callable[[], None] | None = None) -> list[DesignCell]:
    """Every cell, each on a fresh machine of the same hardware (``integrity``) for all designs."""
    def config(d: str) -> Config:
        return Config(design=d, integrity=integrity)

    cells = []
    for p in paths:
        for d in designs:
            for s in states:
                cells.append(run_design_cell(d, s, p, config))
                if progress is not None:
                    progress()
    return cells
