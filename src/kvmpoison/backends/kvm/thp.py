"""Live THP probes: the anon_thp and shmem_thp set-up, its PMD-mapped check, the THP paths.

Runs in the probe's child (the target) like the rest of :mod:`probes`. The set-up maps
a 2 MiB-aligned region (over-allocated, then trimmed), asks for huge pages with
MADV_HUGEPAGE and touches T. It never changes a sysfs setting: where the kernel's THP
mode (``/sys/kernel/mm/transparent_hugepage``) does not give the region a huge page, the
check says so and the cell is not refereed (:class:`ThpNotMapped`).

The check reads the region's own ``/proc/self/smaps`` counters (AnonHugePages for
anon_thp, ShmemPmdMapped for shmem_thp: 2048 kB when one PMD maps it), and, where
``/proc/kpageflags`` is readable (root), that T's frame is the head of a compound page
at a 2 MiB-aligned pfn.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable

from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    PTRACE_TRACEME,
    libc,
    mmap,
)
from kvmpoison.matrix.protocol import (
    HPAGE_PMD_KB,
    HPAGE_PMD_SIZE,
    PAGE0_FILL,
    SMAPS_FIELDS,
    T_FILL,
    THP_ONE_OFFSET,
    THP_PROT_ONE,
    TRANSFER,
    child_cell,
    smaps_cell,
    thp_mode,
    vec_runs_cell,
)

PAGE = 4096
RW = PROT_READ | PROT_WRITE
MADV_DONTNEED, MADV_HUGEPAGE = 4, 14
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"
PM_PRESENT, PM_PFN_MASK = 1 << 63, (1 << 55) - 1
KPF_COMPOUND_HEAD, KPF_THP = 15, 22  # include/uapi/linux/kernel-page-flags.h
HPAGE_PMD_NR = HPAGE_PMD_SIZE // PAGE
FORK_SECONDS = 10.0  # a fork probe's child answers at once or has faulted


class ThpNotMapped(RuntimeError):  # noqa: N818 - a verdict on the kernel, not our error
    """The region is not PMD-mapped after the set-up: the cell is not refereed (the reason)."""


# -- reading the kernel's view ---------------------------------------------------------------


def smaps_region(pid: int | str, start: int, end: int) -> dict[str, int]:
    """Rss, AnonHugePages and ShmemPmdMapped (kB) summed over the VMAs of ``pid`` that
    overlap [start, end), from /proc/PID/smaps."""
    out = dict.fromkeys(SMAPS_FIELDS, 0)
    inside = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            words = line.split()
            if not words:
                continue
            head = words[0]
            if not head.endswith(":") and "-" in head:  # a VMA's header line: lo-hi perms ...
                lo, hi = (int(x, 16) for x in head.split("-", 1))
                inside = lo < end and hi > start
            elif inside and head[:-1] in out:
                out[head[:-1]] += int(words[1])
    return out


def counters(pid: int | str, t: int) -> str:
    got = smaps_region(pid, t, t + HPAGE_PMD_SIZE)
    return smaps_cell(got["Rss"], got["AnonHugePages"], got["ShmemPmdMapped"])


def sysfs_modes(backing: str) -> str:
    """The THP modes that decide this backing, as the kernel shows them (read only)."""
    name = "shmem_enabled" if backing == "shmem_thp" else "enabled"
    parts = []
    for path in (f"{THP_SYSFS}/{name}", f"{THP_SYSFS}/hugepages-2048kB/{name}"):
        try:
            with open(path) as fh:
                parts.append(f"{path.removeprefix(THP_SYSFS + '/')}=[{thp_mode(fh.read())}]")
        except (OSError, ValueError):
            continue
    return ", ".join(parts) if parts else f"no {THP_SYSFS}: CONFIG_TRANSPARENT_HUGEPAGE is off"


def _kpageflags(addr: int) -> tuple[int, int] | None:
    """(pfn, kpageflags) of the page at ``addr``, or None where either file is not readable."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            entry = int.from_bytes(os.pread(fd, 8, (addr // PAGE) * 8), "little")
        finally:
            os.close(fd)
        pfn = entry & PM_PFN_MASK if entry & PM_PRESENT else 0
        if not pfn:  # not present, or the pfn hidden from an unprivileged reader
            return None
        fd = os.open("/proc/kpageflags", os.O_RDONLY)
        try:
            return pfn, int.from_bytes(os.pread(fd, 8, pfn * 8), "little")
        finally:
            os.close(fd)
    except OSError:
        return None


def check_pmd_mapped(backing: str, t: int) -> str:
    """How the region was found PMD-mapped; raise :class:`ThpNotMapped` where it is not."""
    field = "ShmemPmdMapped" if backing == "shmem_thp" else "AnonHugePages"
    got = smaps_region("self", t, t + HPAGE_PMD_SIZE)[field]
    if got != HPAGE_PMD_KB:
        raise ThpNotMapped(f"{backing}: the 2 MiB region is not PMD-mapped after MADV_HUGEPAGE "
                           f"and a touch (smaps {field}={got} kB); {sysfs_modes(backing)}")
    how = f"smaps {field}={got} kB"
    flags = _kpageflags(t)
    if flags is not None:
        pfn, kpf = flags
        if not kpf & (1 << KPF_COMPOUND_HEAD) or pfn % HPAGE_PMD_NR:
            raise ThpNotMapped(f"{backing}: smaps says {field}={got} kB but T's frame {pfn:#x} "
                               f"is not the head of a 2 MiB compound page (kpageflags {kpf:#x})")
        how += (f"; kpageflags: T's pfn {pfn:#x} is a 2 MiB-aligned compound head"
                f"{', KPF_THP' if kpf & (1 << KPF_THP) else ''}")
    return how


# -- set-up ----------------------------------------------------------------------------------


def _chk(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def setup(backing: str, keep: list[object]) -> int:
    """Page 0 (anonymous, 0x11) right below T, T the first page of a PMD-mapped 2 MiB region."""
    size = 2 * HPAGE_PMD_SIZE  # room for page 0 and an aligned 2 MiB above it
    base = mmap(None, size, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    t = (base + PAGE + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    if t - PAGE > base:
        _chk(libc.munmap(base, t - PAGE - base), "munmap head")
    if base + size > t + HPAGE_PMD_SIZE:
        _chk(libc.munmap(t + HPAGE_PMD_SIZE, base + size - t - HPAGE_PMD_SIZE), "munmap tail")
    ctypes.memset(t - PAGE, PAGE0_FILL, PAGE)
    if backing == "shmem_thp":
        fd = os.memfd_create("kvmpoison-thp")
        os.ftruncate(fd, HPAGE_PMD_SIZE)
        mmap(t, HPAGE_PMD_SIZE, RW, MAP_SHARED | MAP_FIXED, fd)
        keep.append(fd)
    elif backing != "anon_thp":
        raise ValueError(f"unknown THP backing {backing!r}")
    _chk(libc.madvise(t, HPAGE_PMD_SIZE, MADV_HUGEPAGE), "MADV_HUGEPAGE")
    ctypes.memset(t, T_FILL, PAGE)  # the touch: one fault maps the whole region
    keep.append(check_pmd_mapped(backing, t))
    return t


# -- the THP paths -----------------------------------------------------------------------------


def _err() -> str:
    err = ctypes.get_errno()
    return f"err:{errno.errorcode.get(err, str(err))}"


def _then_counters(ret: int, t: int) -> str:
    return _err() if ret < 0 else counters("self", t)


def _mincore(t: int) -> str:
    vec = (ctypes.c_ubyte * HPAGE_PMD_NR)()
    if libc.mincore(t, HPAGE_PMD_SIZE, vec) < 0:
        return _err()
    return vec_runs_cell(bytes(vec))


def thp_path(path: str, t: int, signal_cell: Callable[[int], str]) -> str:
    one = t + THP_ONE_OFFSET
    ctypes.set_errno(0)
    match path:
        case "thp_smaps":
            return counters("self", t)
        case "thp_mprotect_one":
            return _then_counters(libc.mprotect(one, PAGE, THP_PROT_ONE), t)
        case "thp_dontneed_one":
            return _then_counters(libc.madvise(one, PAGE, MADV_DONTNEED), t)
        case "thp_munmap_one":
            return _then_counters(libc.munmap(one, PAGE), t)
        case "thp_mincore":
            return _mincore(t)
        case "thp_mincore_after_dontneed":
            return _err() if libc.madvise(one, PAGE, MADV_DONTNEED) < 0 else _mincore(t)
        case "thp_fork_child_load" | "thp_fork_child_store" | "thp_fork_parent_after_child_store":
            return _fork(path, t, signal_cell)
    raise ValueError(f"unknown THP path {path!r}")


def _fork(path: str, t: int, signal_cell: Callable[[int], str]) -> str:
    """Fork; the child loads or stores T and reports its counters, then waits until the
    parent (the target) has read its own. A fault stops the traced child: its siginfo."""
    store = path != "thp_fork_child_load"
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild never returns
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        if store:
            ctypes.memset(t, 0x44, TRANSFER)
        else:
            ctypes.string_at(t, TRANSFER)
        os.write(w, counters("self", t).encode())
        os.read(go_r, 1)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + FORK_SECONDS
    cell = "error"
    try:
        while time.monotonic() < deadline:
            if select.select([r], [], [], 0.02)[0]:
                got = os.read(r, 4096).decode()
                if path == "thp_fork_parent_after_child_store":
                    return counters("self", t)
                return child_cell("ok", got) if got else "error"
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid and os.WIFSTOPPED(status):
                cell = signal_cell(pid)
                break
            if done == pid:
                return f"status:{status}"
        return cell
    finally:
        os.write(go_w, b"g")
        for fd in (r, go_r, go_w):
            os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
