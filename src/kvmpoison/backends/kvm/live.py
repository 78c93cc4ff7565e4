"""A whole scenario on the real kernel, step by step, in one traced child process.

The caller (``scenario.live``) hands over plain dicts: the VMs and, per step, the
op, its checked arguments (fds and addresses an earlier step saved are
``{"ref": name, "off": n}``) and the name a ``save`` keeps. The child builds
each VM (/dev/kvm, guest RAM in slot 0 at gpa 0, like the model's VMM) and runs
the steps; the parent is its tracer, as in :mod:`probes`:

- a CPU load or store of the VMM runs in a small machine-code copy routine;
  when it faults, the parent reads the siginfo (``probes._signal_cell``), moves
  the child's instruction pointer to the routine's failure exit and lets it go
  on, so the scenario goes on after a SIGBUS as a VMM that handles it does;
- a remote path stops the child, and the parent runs it on the child
  (``probes._remote``), as the oracle does.

Nothing here changes host memory state: MADV_HWPOISON and ``memory_failure``
(hwpoison_inject's corrupt-pfn) run only inside the VM guest of
``backends.vmkernel`` (``probes.in_vm_guest``), where the caller sends them and
there is no /dev/kvm (``use_kvm=False``: guest RAM is mapped, no VM is made).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmpoison.backends.kvm import uapi
from kvmpoison.backends.kvm.ioctl import _IOWR
from kvmpoison.backends.kvm.libc import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PTRACE_KILL,
    PTRACE_TRACEME,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_userfaultfd,
    iovec,
    libc,
    mmap,
)
from kvmpoison.backends.kvm.probes import (
    MADV_HWPOISON,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAP,
    UFFD_API,
    UFFDIO_API,
    UFFDIO_REGISTER,
    _cell,
    _fork_child_load,
    _local,
    _name,
    _pagemap_entry,
    _remote,
    _signal_cell,
    in_vm_guest,
    uffdio_api,
    uffdio_range,
    uffdio_register,
    write_pfn,
)
from kvmpoison.backends.kvm.system import Kvm, VmFd
from kvmpoison.backends.kvm.vcpu_access import GuestVcpu, attach, guest_access
from kvmpoison.matrix.protocol import PM_SWAP_TYPE_BITS, UNPOISON_PFN, uffd_msgs_relative

PROT_RWX = 0x7
RW = 0x3
PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS = 7, 12, 13
RIP = 16  # index of rip in struct user_regs_struct
CHILD_SECONDS = 120
# How long an access in a userfaultfd MISSING range may take before the live side calls it
# asleep ("blocked"); generous, as a loaded two-core host may be slow to run the thread.
BLOCKED_SECONDS = 2.0
libc.lseek.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
libc.lseek.restype = ctypes.c_long
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# copy(dst, src, n): mov rcx, rdx; rep movsb; xor eax, eax; ret.
# At +8, where the parent sends a faulted copy: mov eax, 1; ret.
COPY_CODE = bytes([0x48, 0x89, 0xD1, 0xF3, 0xA4, 0x31, 0xC0, 0xC3,
                   0xB8, 0x01, 0x00, 0x00, 0x00, 0xC3])
COPY_FAULTED = 8
_CopyFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class LiveError(Exception):
    """The live run itself failed (not a cell): the child died or could not set up."""


@dataclass
class _LiveVm:
    vm: VmFd | None  # None in the VM guest: no /dev/kvm, only the VMM's guest RAM
    ram_hva: int
    ram_size: int
    ram_fd: int | None
    vcpu: GuestVcpu | None = None
    buf: int = 0


@dataclass
class _Child:
    out: int  # the pipe to the parent: remote-path requests
    copy_addr: int
    kvm: Kvm | None
    vms: dict[str, _LiveVm] = field(default_factory=dict)
    refs: dict[str, int] = field(default_factory=dict)
    faults: int = 0
    remotes: int = 0
    uffds: set[int] = field(default_factory=set)
    missing: list[tuple[int, int]] = field(default_factory=list)  # MISSING-registered ranges
    sleepers: list[threading.Thread] = field(default_factory=list)

    # -- arguments ------------------------------------------------------------------------

    def value(self, v: Any) -> int:
        if isinstance(v, dict):
            return self.refs[v["ref"]] + int(v["off"])
        return int(v)

    def addr(self, vm: _LiveVm, a: dict[str, Any]) -> int:
        if "gpa" in a:
            gpa = int(a["gpa"])
            if not 0 <= gpa < vm.ram_size:
                raise ValueError(f"gpa {gpa:#x} is outside guest RAM")
            return vm.ram_hva + gpa
        return self.value(a["hva"])

    # -- VMs ---------------------------------------------------------------------------------

    def new_vm(self, d: dict[str, Any]) -> None:
        size = int(d["memory"])
        other = self.vms.get(d["share_ram_with"]) if d.get("share_ram_with") else None
        fd: int | None
        if other is not None:
            fd = other.ram_fd
            hva = mmap(None, size, RW, MAP_SHARED, fd if fd is not None else -1)
        elif d.get("backing", "memfd") == "anon":
            fd = None
            hva = mmap(None, size, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        else:
            if d.get("backing", "memfd") == "file":
                fd, name = tempfile.mkstemp(prefix="kvmpoison-guest-")
                os.unlink(name)
            else:
                fd = os.memfd_create("qemu-guest-ram")
            os.ftruncate(fd, size)
            hva = mmap(None, size, RW, MAP_SHARED, fd)
        vm: VmFd | None = None
        if self.kvm is not None:
            vm = self.kvm.create_vm()
            vm.set_tss_addr(0xFFFBD000)
            vm.set_user_memory_region(0, 0, size, hva)
        self.vms[d["name"]] = _LiveVm(vm, hva, size, fd)

    @staticmethod
    def vm_fd(vm: _LiveVm) -> VmFd:
        if vm.vm is None:
            raise ValueError("no /dev/kvm here: the step needs a KVM VM")
        return vm.vm

    # -- CPU accesses of the VMM --------------------------------------------------------------

    def copy(self, dst: int, src: int, n: int) -> str:
        """A load or store that may fault: "ok", or the parent's siginfo cell (as "fault:N")."""
        if _CopyFn(self.copy_addr)(dst, src, n) == 0:
            return "ok"
        self.faults += 1
        return f"fault:{self.faults - 1}"

    def remote(self, path: str, t: int) -> str:
        os.write(self.out, (json.dumps({"remote": path, "t": t}) + "\n").encode())
        os.kill(os.getpid(), signal.SIGSTOP)
        self.remotes += 1
        return f"remote:{self.remotes - 1}"

    # -- steps ---------------------------------------------------------------------------------

    def step(self, s: dict[str, Any]) -> dict[str, Any]:
        kind, who, op, a = s["kind"], s["who"], s["op"], s["args"]
        if kind == "host":
            return self.host(op, a)
        vm = self.vms[who]
        if kind == "guest":
            gpa = int(a["gpa"])
            if self.in_missing(vm.ram_hva + gpa, int(a.get("size", 8))) and \
                    not _resident(vm.ram_hva + gpa):
                return {"skip": "a guest access to a page of a userfaultfd MISSING range that "
                        "is not resident would sleep in KVM_RUN on the live child's only thread"}
            if vm.vcpu is None:
                vm.vcpu = attach(self.vm_fd(vm))
            data = bytes.fromhex(a["data"]) if "data" in a else None
            return guest_access(vm.vcpu, int(a["gpa"]), int(a.get("size", 8)), data)
        return self.vmm(vm, op, a)

    def host(self, op: str, a: dict[str, Any]) -> dict[str, Any]:
        if op == "nothing":  # a stand-in whose effect the next step makes (scenario_live)
            return {"cell": "ok"}
        if op == "new_vm":
            self.new_vm(a)
            return {"cell": "ok"}
        vm = self.vms[a["vm"]]
        if op == "set_memory_region":
            hva = vm.ram_hva + int(a["alias_gpa"]) if "alias_gpa" in a else self.value(a["hva"])
            region = uapi.kvm_userspace_memory_region(
                slot=int(a["slot"]), flags=int(a.get("flags", 0)),
                guest_phys_addr=int(a["guest_phys_addr"]),
                memory_size=int(a["size"]), userspace_addr=hva)
            return {"cell": _cell(libc.ioctl(self.vm_fd(vm).fd, uapi.KVM_SET_USER_MEMORY_REGION,
                                             ctypes.byref(region)))}
        if op in ("memory_failure", "unpoison"):
            return {"cell": hwpoison_inject(CORRUPT_PFN if op == "memory_failure"
                                            else UNPOISON_PFN, self.addr(vm, a))}
        return {"cell": self.remote(op, self.addr(vm, a))}  # a remote MATRIX path

    def buffer(self, vm: _LiveVm) -> int:
        if not vm.buf:
            vm.buf = mmap(None, 1 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        return vm.buf

    # -- userfaultfd -------------------------------------------------------------------------

    def in_missing(self, addr: int, n: int) -> bool:
        return any(lo < addr + n and addr < hi for lo, hi in self.missing)

    def threaded(self, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run an access that may sleep in handle_userfault on a thread of its own:
        "blocked" if it has not returned after BLOCKED_SECONDS (it stays asleep until a
        UFFDIO_COPY or UFFDIO_ZEROPAGE wakes it)."""
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(body()), daemon=True)
        t.start()
        t.join(BLOCKED_SECONDS)
        if t.is_alive():
            self.sleepers.append(t)
            return {"cell": "blocked"}
        return box

    def vm_rw(self, addr: int, buf: int, n: int, write: bool) -> dict[str, Any]:
        """The access as process_vm_readv/writev on this process: a GUP fault, which sleeps
        in handle_userfault as a CPU access does, but never raises a signal on this
        untraced thread; a failure is not refereed (the model's cell is a signal)."""
        local, remote = iovec(buf, n), iovec(addr, n)
        nr = SYS_process_vm_writev if write else SYS_process_vm_readv
        # every argument of the variadic syscall() as a full 64-bit word (flags must be 0)
        ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(os.getpid()), ctypes.byref(local),
                           ctypes.c_ulong(1), ctypes.byref(remote), ctypes.c_ulong(1),
                           ctypes.c_ulong(0))
        if ret != n:
            return {"skip": f"the access failed on the helper thread ({_cell(ret)}), where "
                    "its signal cannot be observed"}
        return {"cell": "ok", "data": ctypes.string_at(buf, n).hex()} if not write \
            else {"cell": "ok"}

    def uffd(self, vm: _LiveVm, op: str, a: dict[str, Any]) -> dict[str, Any]:
        if op == "userfaultfd":
            ret = libc.syscall(ctypes.c_long(SYS_userfaultfd), ctypes.c_long(int(a["flags"])))
            if ret < 0:
                return {"cell": _cell(ret)}
            self.uffds.add(ret)
            return {"cell": "ok", "value": ret}
        fd = self.value(a["fd"])
        if op == "uffdio_api":
            api = uffdio_api(api=int(a["api"]), features=int(a["features"]))
            return {"cell": _cell(libc.ioctl(fd, UFFDIO_API, ctypes.byref(api)))}
        start, size = self.addr(vm, a), int(a["size"])
        if op == "uffdio_register":
            reg = uffdio_register(range=uffdio_range(start, size), mode=int(a["mode"]))
            ret = libc.ioctl(fd, UFFDIO_REGISTER, ctypes.byref(reg))
            if ret == 0 and int(a["mode"]) & 1:
                self.missing.append((start, start + size))
            return {"cell": _cell(ret)}
        buf = self.buffer(vm)
        if op == "uffdio_copy":
            data = bytes.fromhex(a["data"])
            ctypes.memmove(buf, data, len(data))
            arg: ctypes.Structure = uffdio_copy(dst=start, src=buf, len=size, mode=int(a["mode"]))
            cmd = UFFDIO_COPY
        else:
            arg = uffdio_zeropage(range=uffdio_range(start, size), mode=int(a["mode"]))
            cmd = UFFDIO_ZEROPAGE
        ret = libc.ioctl(fd, cmd, ctypes.byref(arg))
        for t in list(self.sleepers):  # a woken access finishes before the next step
            t.join(BLOCKED_SECONDS)
            if not t.is_alive():
                self.sleepers.remove(t)
        return {"cell": _cell(ret)}

    def vmm(self, vm: _LiveVm, op: str, a: dict[str, Any]) -> dict[str, Any]:
        ctypes.set_errno(0)
        if op in ("userfaultfd", "uffdio_api", "uffdio_register", "uffdio_copy",
                  "uffdio_zeropage"):
            return self.uffd(vm, op, a)
        if op in ("load", "store") and self.in_missing(self.addr(vm, a), int(a.get(
                "size", len(a.get("data", "")) // 2))):
            addr, buf = self.addr(vm, a), mmap(None, 1 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
            if op == "store":
                data = bytes.fromhex(a["data"])
                ctypes.memmove(buf, data, len(data))
                return self.threaded(lambda: self.vm_rw(addr, buf, len(data), True))
            return self.threaded(lambda: self.vm_rw(addr, buf, int(a["size"]), False))
        match op:
            case "load":
                n = int(a["size"])
                buf = self.buffer(vm)
                cell = self.copy(buf, self.addr(vm, a), n)
                return {"cell": cell, "data": ctypes.string_at(buf, n).hex()} if cell == "ok" \
                    else {"cell": cell}
            case "store":
                data = bytes.fromhex(a["data"])
                buf = self.buffer(vm)
                ctypes.memmove(buf, data, len(data))
                return {"cell": self.copy(self.addr(vm, a), buf, len(data))}
            case "fork_child_load":
                return {"cell": _fork_child_load(self.addr(vm, a))}
            case "path":
                return {"cell": _local(a["path"], self.addr(vm, a), [])}
            case "munmap":
                return {"cell": _cell(libc.munmap(self.addr(vm, a), int(a["size"])))}
            case "mprotect":
                return {"cell": _cell(libc.mprotect(self.addr(vm, a), int(a["size"]),
                                                    int(a["prot"])))}
            case "madvise":
                if int(a["advice"]) == MADV_HWPOISON and not in_vm_guest():
                    raise PermissionError("MADV_HWPOISON runs only inside the kvmpoison VM guest")
                return {"cell": _cell(libc.madvise(self.addr(vm, a), int(a["size"]),
                                                   int(a["advice"])))}
            case "pagecache_read" | "pagecache_write" | "punch_hole":
                if vm.ram_fd is None:
                    raise ValueError("anonymous guest RAM has no file")
                return self.ram_file(vm, op, a)
        return self.file_op(vm, op, a)

    def ram_file(self, vm: _LiveVm, op: str, a: dict[str, Any]) -> dict[str, Any]:
        assert vm.ram_fd is not None
        buf = self.buffer(vm)
        gpa = int(a["gpa"])
        if op == "punch_hole":
            return {"cell": _cell(libc.fallocate(vm.ram_fd, 0x3, gpa, int(a["size"])))}
        if op == "pagecache_write":
            data = bytes.fromhex(a["data"])
            ctypes.memmove(buf, data, len(data))
            return {"cell": _cell(libc.pwrite(vm.ram_fd, buf, len(data), gpa))}
        ret = libc.pread(vm.ram_fd, buf, int(a["size"]), gpa)
        out: dict[str, Any] = {"cell": _cell(ret)}
        if ret > 0:
            out["data"] = ctypes.string_at(buf, ret).hex()
        return out

    def file_op(self, vm: _LiveVm, op: str, a: dict[str, Any]) -> dict[str, Any]:
        fd = self.value(a["fd"]) if "fd" in a else -1
        buf = self.buffer(vm)
        match op:
            case "guest_memfd_create":
                arg = uapi.kvm_create_guest_memfd(size=int(a["size"]), flags=int(a["flags"]))
                owner = self.vm_fd(self.vms[a["vm"]] if "vm" in a else vm)
                ret = libc.ioctl(owner.fd, uapi.KVM_CREATE_GUEST_MEMFD, ctypes.byref(arg))
                return {"cell": "ok", "value": ret} if ret >= 0 else {"cell": _cell(ret)}
            case "memfd_create":
                return {"cell": "ok", "value": os.memfd_create("kvmpoison-memfd")}
            case "mmap":
                flags = MAP_SHARED if a["shared"] else MAP_PRIVATE
                ret = libc.mmap(None, int(a["size"]), RW, flags, fd, int(a["offset"]))
                if ret is None or ret == ctypes.c_void_p(-1).value:
                    return {"cell": _cell(-1)}
                return {"cell": "ok", "value": int(ret)}
            case "fallocate":
                return {"cell": _cell(libc.fallocate(fd, int(a["mode"]), int(a["offset"]),
                                                     int(a["len"])))}
            case "read" | "pread":
                n = int(a["size"])
                ret = libc.read(fd, buf, n) if op == "read" else \
                    libc.pread(fd, buf, n, int(a["offset"]))
                out: dict[str, Any] = {"cell": _cell(ret)}
                if ret > 0:
                    got = ctypes.string_at(buf, ret)
                    if fd in self.uffds:  # addresses as offsets into guest RAM (protocol)
                        got = uffd_msgs_relative(got, [(v.ram_hva, v.ram_size)
                                                       for v in self.vms.values()])
                    out["data"] = got.hex()
                return out
            case "write" | "pwrite":
                data = bytes.fromhex(a["data"])
                ctypes.memmove(buf, data, len(data))
                ret = libc.write(fd, buf, len(data)) if op == "write" else \
                    libc.pwrite(fd, buf, len(data), int(a["offset"]))
                return {"cell": _cell(ret)}
            case "lseek":
                return {"cell": _cell(libc.lseek(fd, int(a["offset"]), int(a["whence"])))}
            case "close":
                return {"cell": _cell(libc.close(fd))}
            case "fstat":
                try:
                    st = os.fstat(fd)
                except OSError as exc:
                    return {"cell": f"err:{_name(exc.errno or 0)}"}
                text = f"st_size={st.st_size} st_blksize={st.st_blksize}"
                return {"cell": "ret:0", "data": text.encode().hex()}
            case "ftruncate":
                target = fd if "fd" in a else vm.ram_fd
                if target is None:
                    raise ValueError("anonymous guest RAM has no file to truncate")
                return {"cell": _cell(libc.ftruncate(target, int(a["size"])))}
            case "set_user_memory_region2":
                region = uapi.kvm_userspace_memory_region2(
                    slot=int(a["slot"]), flags=int(a["flags"]),
                    guest_phys_addr=int(a["gpa"]),
                    memory_size=int(a["size"]), userspace_addr=self.value(a["hva"]),
                    guest_memfd_offset=int(a["guest_memfd_offset"]),
                    guest_memfd=self.value(a["guest_memfd"]))
                owner = self.vm_fd(self.vms[a["vm"]] if "vm" in a else vm)
                return {"cell": _cell(libc.ioctl(owner.fd, uapi.KVM_SET_USER_MEMORY_REGION2,
                                                 ctypes.byref(region)))}
        raise ValueError(f"no live counterpart for vmm op {op!r}")


def _resident(addr: int) -> bool:
    """mincore(2) of the page at ``addr``: resident (anon: mapped; shmem: cached)."""
    vec = ctypes.create_string_buffer(1)
    page = addr & ~0xFFF
    if libc.mincore(ctypes.c_void_p(page), 4096, vec) != 0:
        return False
    return bool(vec.raw[0] & 1)


class uffdio_copy(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("zeropage", ctypes.c_int64)]


UFFDIO_COPY = _IOWR(UFFD_API, 0x03, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFD_API, 0x04, uffdio_zeropage)
CORRUPT_PFN = "/sys/kernel/debug/hwpoison/corrupt-pfn"


def hwpoison_inject(debugfs: str, addr: int) -> str:
    """Write the pfn behind *addr* to one of hwpoison_inject's debugfs files (6.1,
    mm/hwpoison-inject.c): ``corrupt-pfn`` runs ``memory_failure(pfn, MF_SW_SIMULATED)``
    (hwpoison_inject; its filter is off by default), ``unpoison-pfn`` runs
    ``unpoison_memory(pfn)``. The pfn comes from /proc/self/pagemap: a present page's
    frame, or the offset of a hwpoison swap entry (which is the pfn). ``ret:0`` or
    ``err:NAME``, as the model's ``_ret``. Only inside the VM guest: it changes the state
    of a physical page for good."""
    if not in_vm_guest():
        raise PermissionError("hwpoison injection runs only inside the kvmpoison VM guest")
    entry = _pagemap_entry(addr)
    frame = entry & PM_PFN_MASK
    if entry & PM_PRESENT:
        pfn = frame
    elif entry & PM_SWAP:
        pfn = frame >> PM_SWAP_TYPE_BITS  # the type in the low bits, the offset above
    else:
        raise ValueError(f"no frame backs {addr:#x} (the model needs one too)")
    try:
        return write_pfn(debugfs, pfn)
    except OSError as exc:
        raise ValueError(f"{debugfs}: {exc.strerror} (hwpoison_inject not loaded?)") from None


def _copy_routine() -> int:
    page = mmap(None, 4096, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS)
    ctypes.memmove(page, COPY_CODE, len(COPY_CODE))
    libc.mprotect(page, 4096, 0x5)  # r-x
    return page


def _child_main(vms: list[dict[str, Any]], steps: list[dict[str, Any]], out: int,
                results: int, use_kvm: bool) -> None:
    def emit(rec: dict[str, Any]) -> None:
        os.write(results, (json.dumps(rec) + "\n").encode())

    try:
        signal.alarm(CHILD_SECONDS)
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        child = _Child(out, _copy_routine(), Kvm() if use_kvm else None)
        os.write(out, (json.dumps({"copy": child.copy_addr}) + "\n").encode())
        for d in vms:
            child.new_vm(d)
        for s in steps:
            try:
                rec = child.step(s)
            except (OSError, ValueError, KeyError, OverflowError, ctypes.ArgumentError) as exc:
                rec = {"error": f"{type(exc).__name__}: {exc}"}
            if s.get("save") and "value" in rec:
                child.refs[s["save"]] = int(rec.pop("value"))
            emit({"i": s["index"], **rec})
        os._exit(0)
    except BaseException as exc:  # report, never unwind into the caller's code
        emit({"fatal": f"{type(exc).__name__}: {exc}"})
        os._exit(3)


class _user_regs(ctypes.Structure):
    _fields_ = [("r", ctypes.c_uint64 * 27)]


def _recover(pid: int, copy_addr: int) -> bool:
    """Send a faulted copy to its failure exit; False if the fault was elsewhere."""
    regs = _user_regs()
    libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(regs))
    if not copy_addr <= regs.r[RIP] < copy_addr + COPY_FAULTED:
        return False
    regs.r[RIP] = copy_addr + COPY_FAULTED
    libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(regs))
    return True


def run_live(vms: list[dict[str, Any]], steps: list[dict[str, Any]],
             use_kvm: bool = True) -> dict[int, dict[str, Any]]:
    """Run the steps live; per step index ``{"cell", "data"?}``, ``{"skip"}`` or ``{"error"}``.
    ``use_kvm=False``: no /dev/kvm (the VM guest); the VMs are their guest RAM only."""
    r, w = os.pipe()
    results_fd, results_name = tempfile.mkstemp(prefix="kvmpoison-live-")
    os.unlink(results_name)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(r)
        _child_main(vms, steps, w, results_fd, use_kvm)
    os.close(w)
    faults: list[str] = []
    remotes: list[str] = []
    problem = ""
    status = 0
    with os.fdopen(r) as reader:
        first = json.loads(reader.readline() or "{}")
        copy_addr = int(first.get("copy", 0))
        while True:
            _, status = os.waitpid(pid, 0)
            if not os.WIFSTOPPED(status):
                break
            sig = os.WSTOPSIG(status)
            if sig in (signal.SIGBUS, signal.SIGSEGV):
                cell = _signal_cell(pid)
                if not _recover(pid, copy_addr):
                    problem = f"the live child faulted outside an access ({cell})"
                    break
                faults.append(cell)
                sig = 0
            elif sig == signal.SIGSTOP:
                msg = json.loads(reader.readline() or "{}")
                if "remote" in msg:
                    remotes.append(_remote(msg["remote"], pid, int(msg["t"])))
                    sig = 0
            libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(sig))
    if problem:
        libc.ptrace(PTRACE_KILL, pid, None, None)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.lseek(results_fd, 0, os.SEEK_SET)
    with os.fdopen(results_fd) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    out: dict[int, dict[str, Any]] = {}
    for rec in records:
        if "fatal" in rec:
            raise LiveError(f"the live run failed: {rec['fatal']}")
        cell = rec.get("cell", "")
        if cell.startswith("fault:"):
            rec["cell"] = faults[int(cell[6:])]
            rec.pop("data", None)
        elif cell.startswith("remote:"):
            rec["cell"] = remotes[int(cell[7:])]
        out[int(rec.pop("i"))] = rec
    if problem:
        raise LiveError(problem)
    if os.WIFSIGNALED(status):
        raise LiveError(f"the live child was killed by signal {os.WTERMSIG(status)} "
                        f"after {len(out)} of {len(steps)} steps")
    return out
