"""Run the access matrix on the model: one freshly booted host per cell.

Each cell boots a small machine, builds the docs/matrix.md set-up for one backing
in a target process, runs one path, and renders the outcome as a cell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.arch.x86.pgtable import (
    is_swap_pte,
    pte_pfn,
    pte_present,
)
from kvmpoison.fs.pipe import Pipe
from kvmpoison.fs.proc_task_mmu import SMAPS_FIELDS, smap_gather_stats
from kvmpoison.kconfig import KernelConfig
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.matrix import protocol as proto
from kvmpoison.mm.file import O_DIRECT, O_RDWR
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.huge_memory import ThpSettings
from kvmpoison.mm.madvise import (
    MADV_DONTNEED,
    MADV_GUARD_INSTALL,
    MADV_HUGEPAGE,
    MADV_HWPOISON,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
)
from kvmpoison.mm.memory_failure import unpoison_memory
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PROT_NONE
from kvmpoison.mm.swapops import (
    is_hwpoison_entry,
    is_migration_entry,
    pte_to_swp_entry,
    swp_offset,
    swp_offset_pfn,
    swp_type,
)
from kvmpoison.mm.userfaultfd import UFFDIO_REGISTER_MODE_MISSING
from kvmpoison.outcome import Kind, Outcome
from kvmpoison.virt.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    kvm_gmem_init,
)

PAGE = 4096
RW = 0x3
MATRIX_MEM = 32 << 20


class SetupError(AssertionError):
    """A set-up step the protocol needs failed: a model bug, not a cell."""


def _need(out: Outcome, what: str) -> int:
    if not out.succeeded:
        raise SetupError(f"set-up step {what!r} failed: {out}")
    return out.value or 0


@dataclass
class Cell:
    path: str
    backing: str
    outcome: Outcome
    text: str | None = None  # a cell richer than the outcome's (load_siginfo, THP probes)
    thp_check: str = ""  # THP backings: why the model's region is not PMD-mapped (or "")

    @property
    def cell(self) -> str:
        return self.text if self.text is not None else self.outcome.cell


@dataclass
class Probe:
    """One set-up: the target, its T, and the helpers the paths use."""

    kernel: Kernel
    target: Process
    t: int
    buf: int  # a scratch anonymous page in the target
    attacker: Process
    abuf: int  # the attacker's scratch page
    file_fd: int
    direct_fd: int
    memfd: int = -1  # hwpoison_shmem, hwpoison_file: the file behind T
    pfn: int = 0  # hwpoison backings: the page poisoned
    thp_check: str = ""  # THP backings: the set-up's PMD-mapped check, as the model found it


def _setup(kcfg: KernelConfig, backing: str, thp: ThpSettings | None = None) -> Probe:
    kernel = Kernel.boot(kcfg, PlatformConfig(mem_bytes=MATRIX_MEM,
                                              integrity=IntegrityMode.OFF))
    if thp is not None:  # the referee kernel's /sys/kernel/mm/transparent_hugepage modes
        kernel.core.thp = thp
    kvm_gmem_init(kernel)
    target = Process.spawn(kernel, "target")
    if backing in proto.THP_BACKINGS:
        t = _thp_region(target, backing)
        base = t - PAGE
    else:
        base = _need(target.mmap(0, 2 * PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS), "mmap pages")
        t = base + PAGE
    _need(target.store(base, bytes([proto.PAGE0_FILL]) * PAGE), "fill page 0")
    fill = bytes([proto.T_FILL]) * PAGE
    fixed = MAP_SHARED | MAP_FIXED
    if backing == "anon":
        _need(target.store(t, fill), "fill T")
    elif backing == "anon_prot_none":
        _need(target.store(t, fill), "fill T")
        _need(target.mprotect(t, PAGE, PROT_NONE), "mprotect")
    elif backing == "memfd_secret":
        fd = _need(target.memfd_secret(), "memfd_secret")
        _need(target.ftruncate(fd, PAGE), "ftruncate")
        _need(target.mmap(t, PAGE, RW, fixed, fd), "mmap secretmem")
        _need(target.store(t, fill), "fill T")
    elif backing in ("gmem_private", "gmem_shared"):
        flags = GUEST_MEMFD_FLAG_MMAP
        if backing == "gmem_shared":
            flags |= GUEST_MEMFD_FLAG_INIT_SHARED
        fd = _need(target.guest_memfd(object(), PAGE, flags), "KVM_CREATE_GUEST_MEMFD")
        _need(target.mmap(t, PAGE, RW, fixed, fd), "mmap gmem")
        if backing == "gmem_shared":
            _need(target.store(t, fill), "fill T")
    elif backing == "file_beyond_eof":
        kernel.create_file("/empty", b"")
        fd = _need(target.open("/empty", O_RDWR), "open")
        _need(target.mmap(t, PAGE, RW, fixed, fd), "mmap empty file")
    elif backing == "uffd_poison":
        _need(target.store(t, fill), "fill T")
        _need(target.madvise(t, PAGE, MADV_DONTNEED), "MADV_DONTNEED")
        ctx = target.userfaultfd()
        _need(target.uffdio_register(ctx, t, PAGE, UFFDIO_REGISTER_MODE_MISSING), "register")
        _need(target.uffdio_poison(ctx, t, PAGE), "UFFDIO_POISON")
    elif backing == "madv_guard":
        _need(target.madvise(t, PAGE, MADV_GUARD_INSTALL), "MADV_GUARD_INSTALL")
    elif backing in proto.HWPOISON_BACKINGS:
        memfd, pfn = _poison(target, backing, t, fill)
    elif backing in proto.THP_BACKINGS:
        _need(target.madvise(t, HPAGE, MADV_HUGEPAGE), "MADV_HUGEPAGE")
        _need(target.store(t, fill), "touch T")  # one fault: the whole region, given THP
    else:
        known = proto.BACKINGS + proto.HWPOISON_BACKINGS + proto.THP_BACKINGS
        raise ValueError(f"unknown backing {backing!r} (known: {', '.join(known)})")
    buf = _need(target.mmap(0, PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS), "mmap buffer")
    _need(target.store(buf, bytes(PAGE)), "touch buffer")
    kernel.create_file("/data", bytes([proto.FILE_FILL]) * 2 * PAGE)
    file_fd = _need(target.open("/data", O_RDWR), "open data")
    direct_fd = _need(target.open("/data", O_RDWR | O_DIRECT), "open O_DIRECT")
    attacker = Process.spawn(kernel, "attacker")
    abuf = _need(attacker.mmap(0, PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS), "mmap attacker")
    _need(attacker.store(abuf, bytes(PAGE)), "touch attacker buffer")
    probe = Probe(kernel, target, t, buf, attacker, abuf, file_fd, direct_fd)
    if backing in proto.HWPOISON_BACKINGS:
        probe.memfd, probe.pfn = memfd, pfn
    if backing in proto.THP_BACKINGS:
        probe.thp_check = thp_pmd_check(target.mm, backing, t)
    return probe


# -- transparent huge pages ------------------------------------------------------------------

HPAGE = proto.HPAGE_PMD_SIZE
PMD_SHIFT = 21


def _thp_region(target: Process, backing: str) -> int:
    """T, 2 MiB-aligned, with page 0 mapped right below it (docs/matrix.md, THP backings):
    over-allocate, trim to [T - 4 KiB, T + 2 MiB), map the memfd for shmem_thp."""
    size = 2 * HPAGE
    base = _need(target.mmap(0, size, RW, MAP_PRIVATE | MAP_ANONYMOUS), "mmap THP region")
    t = (base + PAGE + HPAGE - 1) & ~(HPAGE - 1)
    if t - PAGE > base:
        _need(target.munmap(base, t - PAGE - base), "munmap head")
    if base + size > t + HPAGE:
        _need(target.munmap(t + HPAGE, base + size - t - HPAGE), "munmap tail")
    if backing == "shmem_thp":
        fd = _need(target.memfd_create("kvmpoison-thp"), "memfd_create")
        _need(target.ftruncate(fd, HPAGE), "ftruncate")
        _need(target.mmap(t, HPAGE, RW, MAP_SHARED | MAP_FIXED, fd), "mmap memfd")
    return t


# /proc/PID/smaps's counters summed over the VMAs that overlap [start, end), as the live
# probe reads them: the model's own smaps (fs/proc/task_mmu.c smap_gather_stats).


def _region_stats(mm: MmStruct, start: int, end: int) -> dict[str, int]:
    total = dict.fromkeys(SMAPS_FIELDS, 0)
    for vma in mm.vmas:
        if vma.vm_start < end and vma.vm_end > start:
            for key, value in smap_gather_stats(vma).items():
                total[key] += value
    return total


def smaps_rollup_anon_huge(mm: MmStruct, start: int, end: int) -> int:
    """AnonHugePages (kB): anonymous THPs mapped by a PMD in the VMAs over [start, end)."""
    return _region_stats(mm, start, end)["AnonHugePages"]


def smaps_shmem_pmd_mapped(mm: MmStruct, start: int, end: int) -> int:
    """ShmemPmdMapped (kB): shmem THPs mapped by a PMD in the VMAs over [start, end)."""
    return _region_stats(mm, start, end)["ShmemPmdMapped"]


def smaps_rss(mm: MmStruct, start: int, end: int) -> int:
    """Rss (kB) of the VMAs over [start, end)."""
    return _region_stats(mm, start, end)["Rss"]


def smaps_counters(mm: MmStruct, t: int) -> str:
    stats = _region_stats(mm, t, t + HPAGE)
    return proto.smaps_cell(stats["Rss"], stats["AnonHugePages"], stats["ShmemPmdMapped"])


def thp_pmd_check(mm: MmStruct, backing: str, t: int) -> str:
    """The set-up's check on the model, as the live one reads smaps: empty when the region
    is PMD-mapped, else why not."""
    end = t + HPAGE
    shmem = backing == "shmem_thp"
    got = smaps_shmem_pmd_mapped(mm, t, end) if shmem else smaps_rollup_anon_huge(mm, t, end)
    if got == proto.HPAGE_PMD_KB:
        return ""
    field = "ShmemPmdMapped" if shmem else "AnonHugePages"
    return (f"{backing}: the model's 2 MiB region is not PMD-mapped after MADV_HUGEPAGE and "
            f"a touch ({field}={got} kB): the model's mm maps 4 KiB pages")


def model_thp_check(kcfg: KernelConfig, backing: str) -> str:
    """The model's set-up check for a THP backing: "" where its region is PMD-mapped."""
    if backing not in proto.THP_BACKINGS:
        raise ValueError(f"{backing!r} is not a THP backing ({', '.join(proto.THP_BACKINGS)})")
    return _setup(kcfg, backing).thp_check


def _thp_path(p: Probe, path: str) -> str | None:
    """A THP probe's cell (docs/matrix.md), or None for another path."""
    tgt, t = p.target, p.t
    one = t + proto.THP_ONE_OFFSET
    match path:
        case "thp_smaps":
            return smaps_counters(tgt.mm, t)
        case "thp_mprotect_one" | "thp_dontneed_one" | "thp_munmap_one":
            step = (tgt.mprotect(one, PAGE, proto.THP_PROT_ONE) if path == "thp_mprotect_one"
                    else tgt.madvise(one, PAGE, MADV_DONTNEED) if path == "thp_dontneed_one"
                    else tgt.munmap(one, PAGE))
            return smaps_counters(tgt.mm, t) if step.succeeded else step.cell
        case "thp_mincore" | "thp_mincore_after_dontneed":
            if path.endswith("dontneed"):
                step = tgt.madvise(one, PAGE, MADV_DONTNEED)
                if not step.succeeded:
                    return step.cell
            out = tgt.mincore(t, HPAGE)
            return proto.vec_runs_cell(out.data) if out.kind is Kind.RET and out.data \
                else out.cell
        case "thp_fork_child_load" | "thp_fork_child_store" | "thp_fork_parent_after_child_store":
            child = tgt.fork()
            got = (child.load(t, proto.TRANSFER) if path == "thp_fork_child_load"
                   else child.store(t, bytes([0x44]) * proto.TRANSFER))
            if not got.succeeded or path == "thp_fork_parent_after_child_store":
                return got.cell if not got.succeeded else smaps_counters(tgt.mm, t)
            return proto.child_cell(got.cell, smaps_counters(child.mm, t))
    return None


def _poison(target: Process, backing: str, t: int, fill: bytes) -> tuple[int, int]:
    """T filled, then MADV_HWPOISON (memory_failure() on its page): (memfd or -1, pfn)."""
    memfd = -1
    if backing in ("hwpoison_shmem", "hwpoison_file"):
        if backing == "hwpoison_shmem":
            memfd = _need(target.memfd_create("kvmpoison-hwpoison"), "memfd_create")
        else:
            target.kernel.create_file("/hwpoison", b"")
            memfd = _need(target.open("/hwpoison", O_RDWR), "open")
        _need(target.ftruncate(memfd, PAGE), "ftruncate")
        _need(target.mmap(t, PAGE, RW, MAP_SHARED | MAP_FIXED, memfd), "mmap memfd")
    _need(target.store(t, fill), "fill T")
    pte = target.mm.pgd.get(t)
    if not pte_present(pte):
        raise SetupError("T is not mapped after the fill")
    _need(target.madvise(t, PAGE, MADV_HWPOISON), "MADV_HWPOISON")
    return memfd, pte_pfn(pte)


def _pagemap(p: Probe) -> str:
    """T's pagemap entry as ``pte_to_pagemap_entry`` (fs/proc/task_mmu.c, v6.1) builds it."""
    kcfg, types = p.kernel.core.kcfg, p.kernel.core.swap_types
    pte = p.target.mm.pgd.get(p.t)
    if pte_present(pte) or not is_swap_pte(pte):
        return proto.pagemap_cell(pte_present(pte), False, 0, 0, p.pfn)
    entry = pte_to_swp_entry(pte, kcfg)
    pfn_entry = is_hwpoison_entry(entry, types) or is_migration_entry(entry, types)
    offset = swp_offset_pfn(entry, kcfg) if pfn_entry else swp_offset(entry)
    return proto.pagemap_cell(False, True, swp_type(entry), offset, p.pfn)


def _then_load(p: Probe, step: Outcome) -> Outcome:
    """A step, then a load of T: the step's error, else what the load gets."""
    return step if not step.succeeded else p.target.load(p.t, proto.TRANSFER)


def _hwpoison_path(p: Probe, path: str) -> Outcome | None:
    tgt, t = p.target, p.t
    match path:
        case "load_siginfo":
            return tgt.load(t, proto.TRANSFER)  # run_cell adds si_addr and si_addr_lsb
        case "hwpoison_again":
            return tgt.madvise(t, PAGE, MADV_HWPOISON)
        case "pagemap":
            return Outcome.ok()  # run_cell reads T's page table entry
        case "fork_child_load":
            return tgt.fork().load(t, proto.TRANSFER)
        case "dontneed_load":
            return _then_load(p, tgt.madvise(t, PAGE, MADV_DONTNEED))
        case "punch_hole_load":
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            return _then_load(p, tgt.fallocate(p.memfd, mode, 0, PAGE))
        case "truncate_load":
            return _then_load(p, tgt.ftruncate(p.memfd, 0))
        case "file_pread":
            return tgt.pread(p.memfd, p.buf, proto.TRANSFER, 0)
        case "unpoison" | "unpoison_load":
            err = unpoison_memory(p.kernel.core, p.pfn)
            step = Outcome.error(-err) if err else Outcome.ret(0)
            return step if path == "unpoison" else _then_load(p, step)
    return None


def _prefilled_pipe(p: Probe, n: int) -> tuple[int, int]:
    r, w = p.target.pipe()
    pipe = p.target.task.fds[r].private_data
    assert isinstance(pipe, Pipe)
    pipe.data += bytes([proto.FILE_FILL]) * n
    return r, w


def run_path(p: Probe, path: str) -> Outcome:
    """Run one docs/matrix.md path against T of an already built probe."""
    tgt, t, n = p.target, p.t, proto.transfer_size(path)
    at = t - proto.STRADDLE_BEFORE if proto.is_straddle(path) else t
    match path:
        case "load":
            return tgt.load(t, n)
        case "store":
            return tgt.store(t, bytes([0x44]) * n)
        case "read_pipe_to_buf" | "read_pipe_to_buf_straddle":
            r, _ = _prefilled_pipe(p, n)
            return tgt.read(r, at, n)
        case "write_buf_to_pipe" | "write_buf_to_pipe_straddle":
            _, w = tgt.pipe()
            return tgt.write(w, at, n)
        case "pread_file_to_buf" | "pread_file_to_buf_straddle":
            return tgt.pread(p.file_fd, at, n, 0)
        case "pwrite_buf_to_file" | "pwrite_buf_to_file_straddle":
            return tgt.pwrite(p.file_fd, at, n, 0)
        case "odirect_pread":
            return tgt.pread(p.direct_fd, t, n, 0)
        case "odirect_pwrite":
            return tgt.pwrite(p.direct_fd, t, n, 0)
        case "vmsplice_buf_to_pipe":
            _, w = tgt.pipe()
            return tgt.vmsplice_to_pipe(w, t, n)
        case "vmsplice_pipe_to_buf":
            r, _ = _prefilled_pipe(p, n)
            return tgt.vmsplice_to_user(r, t, n)
        case "proc_self_mem_read" | "proc_self_mem_write":
            fd = _need(tgt.open_proc_mem(tgt, O_RDWR), "open /proc/self/mem")
            if path.endswith("read"):
                return tgt.pread(fd, p.buf, n, t)
            return tgt.pwrite(fd, p.buf, n, t)
        case "futex_wait_private" | "futex_wait_shared":
            return tgt.futex_wait(t, proto.FUTEX_MISMATCH, private=path.endswith("private"))
        case "futex_wake_shared":
            return tgt.futex_wake(t, 1, private=False)
        case "populate_read" | "populate_write":
            advice = MADV_POPULATE_READ if path.endswith("read") else MADV_POPULATE_WRITE
            return tgt.madvise(t, PAGE, advice)
        case "mlock":
            return tgt.mlock(t, PAGE)
        case "mincore":
            out = tgt.mincore(t, PAGE)
            return Outcome.vec(out.data[0]) if out.kind is Kind.RET and out.data else out
        case "getrandom":
            return tgt.getrandom(t, n)
    return _hwpoison_path(p, path) or _remote(p, path, at, n)


def _remote(p: Probe, path: str, at: int, n: int) -> Outcome:
    att, tgt, t = p.attacker, p.target, p.t
    tgt.task.stopped = True  # remote paths run while the target is stopped
    match path:
        case "process_vm_readv" | "process_vm_readv_straddle":
            return att.process_vm_readv(tgt, p.abuf, at, n)
        case "process_vm_writev":
            return att.process_vm_writev(tgt, p.abuf, t, n)
        case "proc_pid_mem_read" | "proc_pid_mem_read_straddle" | "proc_pid_mem_write":
            fd = _need(att.open_proc_mem(tgt, O_RDWR), "open /proc/PID/mem")
            if path == "proc_pid_mem_write":
                return att.pwrite(fd, p.abuf, n, at)
            return att.pread(fd, p.abuf, n, at)
        case "ptrace_peek":
            return att.ptrace_peekdata(tgt, t)
        case "ptrace_poke":
            return att.ptrace_pokedata(tgt, t, bytes([0x55]) * 8)
    raise ValueError(f"unknown path {path!r} (known: {', '.join(proto.PATHS)})")


def run_cell(kcfg: KernelConfig, path: str, backing: str,
             thp: ThpSettings | None = None) -> Cell:
    """One cell on the model; ``thp`` gives the THP modes of the kernel it is compared
    with (None: the model's defaults, which are this machine's)."""
    probe = _setup(kcfg, backing, thp)
    if path in proto.THP_PATHS:
        if backing not in proto.THP_BACKINGS:
            raise ValueError(f"{path} probes a THP: it runs on {', '.join(proto.THP_BACKINGS)}")
        text = _thp_path(probe, path)
        assert text is not None
        return Cell(path, backing, Outcome.ok(), text, probe.thp_check)
    out = run_path(probe, path)
    cell = Cell(path, backing, out, thp_check=probe.thp_check)
    if path == "pagemap":
        cell.text = _pagemap(probe)
    if path == "load_siginfo" and out.siginfo is not None:
        info = out.siginfo
        cell.text = proto.siginfo_cell(out.cell, info.addr, info.addr_lsb, probe.t)
    return cell


def run_matrix(kcfg: KernelConfig, paths: tuple[str, ...] = proto.PATHS,
               backings: tuple[str, ...] = proto.BACKINGS,
               progress: Callable[[Cell], None] | None = None) -> list[Cell]:
    cells = []
    for path in paths:
        for backing in backings:
            cell = run_cell(kcfg, path, backing)
            if progress is not None:
                progress(cell)
            cells.append(cell)
    return cells


__all__ = ["Cell", "Probe", "model_thp_check", "run_cell", "run_matrix", "run_path",
           "smaps_counters", "smaps_rollup_anon_huge", "smaps_rss", "smaps_shmem_pmd_mapped"]
