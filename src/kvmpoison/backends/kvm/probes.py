"""Live probes of the real kernel: one docs/matrix.md path x backing per forked child.

The child (the target) calls PTRACE_TRACEME, builds the set-up of
docs/matrix.md, and runs a local path; a fault stops it, and the
parent, its tracer, reads the siginfo with PTRACE_GETSIGINFO, so no C
compiler or signal handler is needed. For a remote path the child stops
itself and the parent runs process_vm_*, /proc/PID/mem or PEEK/POKEDATA on it.
Results come back in the canonical cell notation.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import tempfile
from dataclasses import dataclass

from kvmpoison.backends.kvm import thp, uapi
from kvmpoison.backends.kvm.ioctl import _IOWR
from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    PTRACE_GETSIGINFO,
    PTRACE_KILL,
    PTRACE_PEEKDATA,
    PTRACE_POKEDATA,
    PTRACE_TRACEME,
    SYS_futex,
    SYS_getrandom,
    SYS_memfd_secret,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_userfaultfd,
    iovec,
    libc,
    mmap,
    siginfo_t,
)
from kvmpoison.backends.kvm.system import Kvm
from kvmpoison.matrix.protocol import (
    HWPOISON_BACKINGS,
    NOT_REFEREED,
    PM_SWAP_TYPE_BITS,
    THP_BACKINGS,
    THP_PATHS,
    UNPOISON_PFN,
    pagemap_cell,
    siginfo_cell,
)

PAGE = 4096
TRANSFER = 8
RW = PROT_READ | PROT_WRITE
PAGE0_FILL, T_FILL, FILE_FILL = 0x11, 0x22, 0x33
FUTEX_MISMATCH = 0x5A5A5A5A
BUS_NAMES = {1: "BUS_ADRALN", 2: "BUS_ADRERR", 3: "BUS_OBJERR", 4: "BUS_MCEERR_AR",
             5: "BUS_MCEERR_AO"}
SEGV_NAMES = {1: "SEGV_MAPERR", 2: "SEGV_ACCERR", 3: "SEGV_BNDERR", 4: "SEGV_PKUERR"}
LOCAL_KVM_BACKINGS = ("gmem_private", "gmem_shared")

MADV_DONTNEED, MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_GUARD_INSTALL = 4, 22, 23, 102
MADV_HWPOISON = 100
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
PM_PRESENT, PM_SWAP, PM_PFN_MASK = 1 << 63, 1 << 62, (1 << 55) - 1  # /proc/PID/pagemap
UFFDIO = 0xAA
UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_MISSING = 1


class uffdio_range(ctypes.Structure):
    start: int
    len: int
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_api(ctypes.Structure):
    api: int
    features: int
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    range: uffdio_range
    mode: int
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_poison(ctypes.Structure):
    range: uffdio_range
    mode: int
    updated: int
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("updated", ctypes.c_int64)]


UFFDIO_API = _IOWR(UFFDIO, 0x3F, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, uffdio_register)
UFFDIO_POISON = _IOWR(UFFDIO, 0x08, uffdio_poison)


def _err(ret: int) -> str:
    return f"err:{_name(ctypes.get_errno() if ret < 0 else 0)}"


def _cell(ret: int) -> str:
    return f"ret:{ret}" if ret >= 0 else _err(ret)


def _name(err: int) -> str:
    if err == 133:
        return "EHWPOISON"
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    if err == errno.EAGAIN:
        return "EAGAIN"
    return errno.errorcode.get(err, str(err))


@dataclass
class ProbeResult:
    path: str
    backing: str
    cell: str
    detail: str = ""


# -- the target (runs in the child) -------------------------------------------------------


def in_vm_guest() -> bool:
    """True only inside the VM guest of ``backends.vmkernel`` (its init and its cmdline say so).

    The hwpoison backings poison T with MADV_HWPOISON, which takes the
    physical page out of service for good: never on the host.
    """
    if os.environ.get("KVMPOISON_IN_VM_GUEST") != "1":
        return False
    try:
        with open("/proc/cmdline") as fh:
            return "kvmpoison.job=" in fh.read()
    except OSError:
        return False


@dataclass
class _Memfd:
    fd: int


@dataclass
class _Pfn:
    pfn: int


def _pagemap_entry(addr: int) -> int:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, (addr // PAGE) * 8), "little")
    finally:
        os.close(fd)


def _pagemap_pfn(addr: int) -> int:
    """The pfn behind a present page of this process (root only; 0 when hidden)."""
    entry = _pagemap_entry(addr)
    return entry & PM_PFN_MASK if entry & PM_PRESENT else 0


def _pagemap(t: int, keep: list[object]) -> str:
    entry = _pagemap_entry(t)
    frame = entry & PM_PFN_MASK
    pfn = next((o.pfn for o in keep if isinstance(o, _Pfn)), 0)
    return pagemap_cell(bool(entry & PM_PRESENT), bool(entry & PM_SWAP),
                        frame & ((1 << PM_SWAP_TYPE_BITS) - 1), frame >> PM_SWAP_TYPE_BITS, pfn)


def _poison(backing: str, t: int, keep: list[object]) -> None:
    if not in_vm_guest():
        raise PermissionError(f"{backing} poisons a page: it runs only inside the kvmpoison "
                              "VM guest (kvmpoison oracle --kernel debian-6.1)")
    if backing in ("hwpoison_shmem", "hwpoison_file"):
        if backing == "hwpoison_shmem":
            fd = os.memfd_create("kvmpoison-hwpoison")
        else:
            fd, name = tempfile.mkstemp(prefix="kvmpoison-hwpoison-")
            os.unlink(name)
        os.ftruncate(fd, PAGE)
        mmap(t, PAGE, RW, MAP_SHARED | MAP_FIXED, fd)
        keep.append(_Memfd(fd))
    ctypes.memset(t, T_FILL, PAGE)
    keep.append(_Pfn(_pagemap_pfn(t)))
    _chk(libc.madvise(t, PAGE, MADV_HWPOISON), "MADV_HWPOISON")


def _setup(backing: str, keep: list[object]) -> int:
    if backing in THP_BACKINGS:
        return thp.setup(backing, keep)
    base = mmap(None, 2 * PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    t = base + PAGE
    ctypes.memset(base, PAGE0_FILL, PAGE)
    fixed = MAP_SHARED | MAP_FIXED
    if backing in ("anon", "anon_prot_none", "uffd_poison"):
        ctypes.memset(t, T_FILL, PAGE)
    if backing == "anon_prot_none":
        _chk(libc.mprotect(t, PAGE, PROT_NONE), "mprotect")
    elif backing == "memfd_secret":
        fd = _chk(libc.syscall(SYS_memfd_secret, ctypes.c_uint(0)), "memfd_secret")
        os.ftruncate(fd, PAGE)
        mmap(t, PAGE, RW, fixed, fd)
        ctypes.memset(t, T_FILL, PAGE)
    elif backing in LOCAL_KVM_BACKINGS:
        kvm = Kvm()
        vm = kvm.create_vm()
        flags = uapi.GUEST_MEMFD_FLAG_MMAP
        if backing == "gmem_shared":
            flags |= uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        gmem = vm.create_guest_memfd(PAGE, flags)
        keep += [kvm, vm, gmem]
        mmap(t, PAGE, RW, fixed, gmem.fd)
        if backing == "gmem_shared":
            ctypes.memset(t, T_FILL, PAGE)
    elif backing == "file_beyond_eof":
        fd, name = tempfile.mkstemp(prefix="kvmpoison-empty-")
        os.unlink(name)
        mmap(t, PAGE, RW, fixed, fd)
    elif backing == "uffd_poison":
        _chk(libc.madvise(t, PAGE, MADV_DONTNEED), "MADV_DONTNEED")
        uffd = _chk(libc.syscall(SYS_userfaultfd, ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK)),
                    "userfaultfd")
        api = uffdio_api(api=UFFD_API, features=0)
        _chk(libc.ioctl(uffd, UFFDIO_API, ctypes.byref(api)), "UFFDIO_API")
        reg = uffdio_register(range=uffdio_range(t, PAGE), mode=UFFDIO_REGISTER_MODE_MISSING)
        _chk(libc.ioctl(uffd, UFFDIO_REGISTER, ctypes.byref(reg)), "UFFDIO_REGISTER")
        poison = uffdio_poison(range=uffdio_range(t, PAGE), mode=0)
        _chk(libc.ioctl(uffd, UFFDIO_POISON, ctypes.byref(poison)), "UFFDIO_POISON")
        keep.append(uffd)
    elif backing == "madv_guard":
        _chk(libc.madvise(t, PAGE, MADV_GUARD_INSTALL), "MADV_GUARD_INSTALL")
    elif backing in HWPOISON_BACKINGS:
        _poison(backing, t, keep)
    elif backing != "anon":
        raise ValueError(f"unknown backing {backing!r}")
    return t


def _chk(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _data_file(direct: bool) -> int:
    fd, name = tempfile.mkstemp(prefix="kvmpoison-data-")
    os.write(fd, bytes([FILE_FILL]) * 2 * PAGE)
    os.close(fd)
    fd = os.open(name, os.O_RDWR | (os.O_DIRECT if direct else 0))
    os.unlink(name)
    return fd


def _kept(keep: list[object], kind: type[_Memfd] | type[_Pfn]) -> int:
    for obj in keep:
        if isinstance(obj, _Memfd) and kind is _Memfd:
            return obj.fd
        if isinstance(obj, _Pfn) and kind is _Pfn:
            return obj.pfn
    raise ValueError(f"this backing has no {kind.__name__.strip('_').lower()}")


def _then_load(ret: int, t: int) -> str:
    """A step, then a load of T: the step's error, else what the load gets."""
    if ret < 0:
        return _err(ret)
    ctypes.string_at(t, TRANSFER)
    return "ok"


def _unpoison(pfn: int) -> str:
    """Write the pfn to hwpoison_inject's unpoison-pfn: ret:0 when unpoison_memory() said 0."""
    try:
        return write_pfn(UNPOISON_PFN, pfn)
    except OSError as exc:
        return f"err:{_name(exc.errno or 0)}"


def write_pfn(debugfs: str, pfn: int) -> str:
    """Write ``pfn`` to one of hwpoison_inject's debugfs files: ``ret:0``, or ``err:NAME``
    for what the write returned. Opening the file may raise OSError (no module loaded)."""
    fd = os.open(debugfs, os.O_WRONLY)
    try:
        os.write(fd, f"{pfn:#x}".encode())
    except OSError as exc:
        return f"err:{_name(exc.errno or 0)}"
    finally:
        os.close(fd)
    return "ret:0"


def _fork_child_load(t: int) -> str:
    """A fork child loads T; the target traces it to read the siginfo."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild never returns
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        ctypes.string_at(t, TRANSFER)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSTOPPED(status):
        sig = os.WSTOPSIG(status)
        cell = _signal_cell(pid) if sig in (signal.SIGBUS, signal.SIGSEGV) else f"stop:{sig}"
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return cell
    return "ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"status:{status}"


def _hwpoison_path(path: str, t: int, keep: list[object]) -> str:
    match path:
        case "load_siginfo":  # the parent reads T from the pipe and the siginfo by ptrace
            return _then_load(0, t)
        case "pagemap":
            return _pagemap(t, keep)
        case "hwpoison_again":
            _kept(keep, _Pfn)  # only on a backing this probe poisoned (never on the host)
            return _cell(libc.madvise(t, PAGE, MADV_HWPOISON))
        case "fork_child_load":
            return _fork_child_load(t)
        case "dontneed_load":
            return _then_load(libc.madvise(t, PAGE, MADV_DONTNEED), t)
        case "punch_hole_load":
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            return _then_load(libc.fallocate(_kept(keep, _Memfd), mode, 0, PAGE), t)
        case "truncate_load":
            return _then_load(libc.ftruncate(_kept(keep, _Memfd), 0), t)
        case "file_pread":
            buf = ctypes.create_string_buffer(PAGE)
            return _cell(libc.pread(_kept(keep, _Memfd), buf, TRANSFER, 0))
        case "unpoison" | "unpoison_load":
            cell = _unpoison(_kept(keep, _Pfn))
            return cell if path == "unpoison" or cell.startswith("err:") else _then_load(0, t)
    raise ValueError(f"unknown local path {path!r}")


def _local(path: str, t: int, keep: list[object]) -> str:
    if path in THP_PATHS:
        return thp.thp_path(path, t, _signal_cell)
    straddle = path.endswith("_straddle")
    n = 32 if straddle else (4096 if path.startswith("odirect") else 8)
    at = t - 16 if straddle else t
    ctypes.set_errno(0)
    match path:
        case "load":
            ctypes.string_at(t, n)
            return "ok"
        case "store":
            ctypes.memset(t, 0x44, n)
            return "ok"
        case "read_pipe_to_buf" | "read_pipe_to_buf_straddle" | "vmsplice_pipe_to_buf":
            r, w = os.pipe()
            os.write(w, bytes([FILE_FILL]) * n)
            if path == "vmsplice_pipe_to_buf":
                iov = iovec(at, n)
                return _cell(libc.vmsplice(r, ctypes.byref(iov), 1, 0))
            return _cell(libc.read(r, at, n))
        case "write_buf_to_pipe" | "write_buf_to_pipe_straddle":
            _, w = os.pipe()
            return _cell(libc.write(w, at, n))
        case "pread_file_to_buf" | "pread_file_to_buf_straddle":
            return _cell(libc.pread(_data_file(False), at, n, 0))
        case "pwrite_buf_to_file" | "pwrite_buf_to_file_straddle":
            return _cell(libc.pwrite(_data_file(False), at, n, 0))
        case "odirect_pread":
            return _cell(libc.pread(_data_file(True), t, n, 0))
        case "odirect_pwrite":
            return _cell(libc.pwrite(_data_file(True), t, n, 0))
        case "vmsplice_buf_to_pipe":
            _, w = os.pipe()
            iov = iovec(t, n)
            return _cell(libc.vmsplice(w, ctypes.byref(iov), 1, 0))
        case "proc_self_mem_read" | "proc_self_mem_write":
            buf = mmap(None, PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
            ctypes.memset(buf, 0, PAGE)
            fd = os.open("/proc/self/mem", os.O_RDWR)
            if path.endswith("read"):
                return _cell(libc.pread(fd, buf, n, t))
            return _cell(libc.pwrite(fd, buf, n, t))
        case "futex_wait_private" | "futex_wait_shared" | "futex_wake_shared":
            op = {"futex_wait_private": 0 | 128, "futex_wait_shared": 0,
                  "futex_wake_shared": 1}[path]
            timeout = (ctypes.c_long * 2)(0, 1000)
            val = 1 if op == 1 else FUTEX_MISMATCH
            ret = libc.syscall(SYS_futex, ctypes.c_void_p(t), ctypes.c_int(op),
                               ctypes.c_uint32(val), ctypes.byref(timeout), None, ctypes.c_int(0))
            return _cell(ret)
        case "populate_read" | "populate_write":
            advice = MADV_POPULATE_READ if path.endswith("read") else MADV_POPULATE_WRITE
            return _cell(libc.madvise(t, PAGE, advice))
        case "mlock":
            return _cell(libc.mlock(t, PAGE))
        case "mincore":
            vec = (ctypes.c_ubyte * 1)()
            ret = libc.mincore(t, PAGE, vec)
            return f"vec:{vec[0] & 1}" if ret == 0 else _err(ret)
        case "getrandom":
            return _cell(libc.syscall(SYS_getrandom, ctypes.c_void_p(at), ctypes.c_size_t(n),
                                      ctypes.c_uint(0)))
    return _hwpoison_path(path, t, keep)


def _child(path: str, backing: str, out_fd: int, remote: bool) -> None:
    try:
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        keep: list[object] = []
        t = _setup(backing, keep)
        if remote or path == "load_siginfo":
            os.write(out_fd, (json.dumps({"t": t}) + "\n").encode())
        if remote:
            os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(0)
        cell = _local(path, t, keep)
        os.write(out_fd, (json.dumps({"cell": cell}) + "\n").encode())
        os._exit(0)
    except thp.ThpNotMapped as exc:  # the kernel gave no huge page: not refereed, the reason
        os.write(out_fd, (json.dumps({"not_refereed": str(exc)}) + "\n").encode())
        os._exit(0)
    except BaseException as exc:  # report, never unwind into the parent's code
        os.write(out_fd, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        os._exit(3)


# -- the parent ------------------------------------------------------------------------------


def _remote(path: str, pid: int, t: int) -> str:
    straddle = path.endswith("_straddle")
    n = 32 if straddle else 8
    at = t - 16 if straddle else t
    buf = ctypes.create_string_buffer(PAGE)
    ctypes.set_errno(0)
    match path:
        case "process_vm_readv" | "process_vm_readv_straddle" | "process_vm_writev":
            local = iovec(ctypes.addressof(buf), n)
            remote = iovec(at, n)
            nr = SYS_process_vm_writev if path.endswith("writev") else SYS_process_vm_readv
            one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
            return _cell(libc.syscall(nr, ctypes.c_long(pid), ctypes.byref(local), one,
                                      ctypes.byref(remote), one, zero))
        case "proc_pid_mem_read" | "proc_pid_mem_read_straddle" | "proc_pid_mem_write":
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
            try:
                if path == "proc_pid_mem_write":
                    return _cell(libc.pwrite(fd, buf, n, at))
                return _cell(libc.pread(fd, buf, n, at))
            finally:
                os.close(fd)
        case "ptrace_peek":
            ret = libc.ptrace(PTRACE_PEEKDATA, pid, ctypes.c_void_p(t), None)
            err = ctypes.get_errno()
            return "ok" if ret != -1 or not err else f"err:{_name(err)}"
        case "ptrace_poke":
            ret = libc.ptrace(PTRACE_POKEDATA, pid, ctypes.c_void_p(t), ctypes.c_void_p(0x55))
            return "ret:0" if ret == 0 else f"err:{_name(ctypes.get_errno())}"
    raise ValueError(f"unknown remote path {path!r}")


def _signal_cell(pid: int, t: int | None = None) -> str:
    """The cell of a fault stop; with T, si_addr and si_addr_lsb too (load_siginfo)."""
    info = siginfo_t()
    libc.ptrace(PTRACE_GETSIGINFO, pid, None, ctypes.byref(info))
    name = signal.Signals(info.si_signo).name
    codes = BUS_NAMES if info.si_signo == signal.SIGBUS else SEGV_NAMES
    cell = f"sig:{name}:{codes.get(info.si_code, str(info.si_code))}"
    if t is None:
        return cell
    lsb = info.si_addr_lsb if info.si_code in (4, 5) else None  # BUS_MCEERR_AR/AO only
    return siginfo_cell(cell, info.si_addr, lsb, t)


def run_probe(path: str, backing: str, remote_paths: tuple[str, ...]) -> ProbeResult:
    r, w = os.pipe()
    remote = path in remote_paths
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(r)
        _child(path, backing, w, remote)
    os.close(w)
    cell, detail = "", ""
    with os.fdopen(r) as reader:
        while True:
            _, status = os.waitpid(pid, 0)
            if os.WIFSTOPPED(status):
                sig = os.WSTOPSIG(status)
                if sig in (signal.SIGBUS, signal.SIGSEGV):
                    t = int(json.loads(reader.readline())["t"]) if path == "load_siginfo" \
                        else None
                    cell = _signal_cell(pid, t)
                    break
                if sig == signal.SIGSTOP and remote:
                    msg = json.loads(reader.readline())
                    if "error" in msg:
                        detail = msg["error"]
                        break
                    cell = _remote(path, pid, int(msg["t"]))
                    break
                libc.ptrace(7, pid, None, ctypes.c_void_p(sig))  # PTRACE_CONT with the signal
                continue
            msg = json.loads(reader.readline() or "{}")
            if "t" in msg:  # load_siginfo's T, before a load that did not fault
                msg = json.loads(reader.readline() or "{}")
            cell, detail = msg.get("cell", ""), msg.get("error", "")
            if "not_refereed" in msg:
                cell, detail = NOT_REFEREED, msg["not_refereed"]
            break
    if not _exited(pid):
        libc.ptrace(PTRACE_KILL, pid, None, None)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return ProbeResult(path, backing, cell or "error", detail)


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid
