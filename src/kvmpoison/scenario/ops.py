"""The operations a scenario step may name, per actor kind.

``guest:NAME`` acts through the vCPU, ``vmm:NAME`` is the VMM process (every
local MATRIX path, plus guest-RAM file operations), ``host`` is another host
process or the host kernel (remote MATRIX paths, memory_failure, KVM's own
access, more VMs), ``hw`` is the hardware (DRAM errors, tampering).
Addresses are ``gpa`` (guest-physical, resolved through the VM's memslot)
or ``hva`` (a raw address in the VMM).
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.drivers.char.mem import DEV_MEM
from kvmpoison.kernel.kernel import ForkError
from kvmpoison.machine import Instance, Machine, VmSetupError, VmSpec
from kvmpoison.matrix import protocol as proto
from kvmpoison.matrix.designs import backing_pfn, error_then_free, make_probe
from kvmpoison.matrix.model import run_path
from kvmpoison.mm.fault import vma_lookup
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.filemap import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
)
from kvmpoison.mm.guest_private import alloc_contig_range, move_pages, offline_pages
from kvmpoison.mm.gup import FOLL, get_dump_page, pin_user_pages
from kvmpoison.mm.huge_memory import deferred_split_scan
from kvmpoison.mm.khugepaged import khugepaged_scan
from kvmpoison.mm.ksm import ksm_do_scan
from kvmpoison.mm.madvise import (
    MADV_COLLAPSE,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_HWPOISON,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_UNMERGEABLE,
)
from kvmpoison.mm.memory_failure import memory_failure, soft_offline_page, unpoison_memory
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE
from kvmpoison.mm.page import Page, put_page
from kvmpoison.mm.userfaultfd import (
    O_CLOEXEC,
    O_NONBLOCK,
    UFFD_USER_MODE_ONLY,
    UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_COPY_MODE_WP,
    UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    UffdCtx,
)
from kvmpoison.mm.userfaultfd_k import UFFD_FEATURE_SIGBUS, UserfaultBlocked
from kvmpoison.outcome import Halt, Kind, Outcome
from kvmpoison.scenario.units import VM_MEMORY_MAX, parse_size
from kvmpoison.virt.kvm.guest_memfd import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
from kvmpoison.virt.kvm.kvm_main import Protection
from kvmpoison.virt.kvm.memslot2 import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    set_user_memory_region2,
)

ACTOR_KINDS = ("guest", "vmm", "host", "hw")
ADVICE = {"dontneed": MADV_DONTNEED, "dontfork": MADV_DONTFORK, "pageout": MADV_PAGEOUT,
          "hwpoison": MADV_HWPOISON, "mergeable": MADV_MERGEABLE,
          "unmergeable": MADV_UNMERGEABLE, "hugepage": MADV_HUGEPAGE,
          "nohugepage": MADV_NOHUGEPAGE, "collapse": MADV_COLLAPSE}


GMEM_FLAGS = {"MMAP": GUEST_MEMFD_FLAG_MMAP, "INIT_SHARED": GUEST_MEMFD_FLAG_INIT_SHARED}
FALLOC_MODES = {"KEEP_SIZE": FALLOC_FL_KEEP_SIZE, "PUNCH_HOLE": FALLOC_FL_PUNCH_HOLE,
                "ZERO_RANGE": FALLOC_FL_ZERO_RANGE, "COLLAPSE_RANGE": FALLOC_FL_COLLAPSE_RANGE}
MEMSLOT_FLAGS = {"GUEST_MEMFD": KVM_MEM_GUEST_MEMFD}
WHENCE = {"SET": 0, "CUR": 1, "END": 2}
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
# Ops whose fd/address result a step's ``save`` keeps for later steps as "$name".
SAVES_REF = ("guest_memfd_create", "memfd_create", "mmap", "open", "userfaultfd")
# Arguments that may name a saved value ("$name" or "$name+0x1000").
REF_ARGS = ("fd", "hva", "guest_memfd")


class OpError(Exception):
    """A step asked for something impossible (e.g. an address outside every mapping)."""


@dataclass
class RunCtx:
    machine: Machine
    values: dict[str, bytes] = field(default_factory=dict)
    refs: dict[str, int] = field(default_factory=dict)  # saved fds and addresses ("$name")
    bufs: dict[str, int] = field(default_factory=dict)  # per VMM: the buffer read/write use
    pins: dict[tuple[str, int], Page] = field(default_factory=dict)
    woken: list[tuple[str, str, Outcome]] = field(default_factory=list)  # re-run after a wake

    def inst(self, name: str) -> Instance:
        name = name.removeprefix("vmm:").removeprefix("guest:")
        try:
            inst = self.machine.instances[name]
        except KeyError:
            raise OpError(f"no VM named {name!r}") from None
        if inst.vmm.proc.task.mm is None:
            raise OpError(f"{name}'s VMM has exited: its VM and vCPUs are gone")
        if not inst.vmm.proc.task.alive:  # killed by a signal it does not handle (SIGSEGV)
            raise OpError(f"{name}'s VMM was killed by a signal: {inst.vmm.proc.task}")
        return inst


def data_arg(args: dict[str, Any]) -> bytes:
    value = args.get("data", "")
    if not isinstance(value, str):
        raise OpError("data must be a string ('text' or 'hex:0011...')")
    if value.startswith("hex:"):
        try:
            return bytes.fromhex(value[4:])
        except ValueError:
            raise OpError(f"bad hex data {value!r}") from None
    return value.encode()


def _int(args: dict[str, Any], key: str, default: int | None = None) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OpError(f"{key} must be an integer, not {value!r}")
    return value


# The most bytes one load may read: the data is carried in Python bytes and a trace.
ACCESS_MAX = 1 << 20
U64_MAX = (1 << 64) - 1


def _access_size(args: dict[str, Any], default: int = 8) -> int:
    """The byte count of a load: at least 1, at most ACCESS_MAX."""
    size = _int(args, "size", default)
    if not 1 <= size <= ACCESS_MAX:
        raise OpError(f"size {size} of a load must be from 1 to {ACCESS_MAX} bytes")
    return size


def _loff_t(args: dict[str, Any], key: str, default: int | None = None) -> int:
    """A file offset or length (``loff_t``): signed 64-bit, so a negative one reaches the call."""
    value = _int(args, key, default)
    if not -(1 << 63) <= value < 1 << 63:
        raise OpError(f"{key} {value} must be from -2^63 to 2^63-1 (it is a signed 64-bit loff_t)")
    return value


def _u64(args: dict[str, Any], key: str, default: int | None = None) -> int:
    """A syscall length or hypercall argument: a size_t/u64, so never negative."""
    value = _int(args, key, default)
    if not 0 <= value <= U64_MAX:
        raise OpError(f"{key} {value} must be from 0 to 2^64-1 (it is an unsigned 64-bit value)")
    return value


def parse_ref(text: str) -> tuple[str, int]:
    """``$name``, ``$name+0x2000`` or ``$name-16``: the saved name and the offset."""
    body = text[1:] if text.startswith("$") else ""
    cut = max(body.find("+"), body.find("-"))
    name, off = (body[:cut], body[cut:]) if cut > 0 else (body, "")
    if not name.isidentifier():
        raise OpError(f"{text!r} is not a reference to a saved value ($name or $name+0x1000)")
    try:
        offset = int(off, 0) if off else 0
    except ValueError:
        raise OpError(f"{text!r}: the offset after the name is not an integer") from None
    return name, offset


def ref_int(refs: dict[str, int], args: dict[str, Any], key: str,
            default: int | None = None) -> int:
    """An integer argument, or ``"$name+off"`` naming a value an earlier step saved."""
    value = args.get(key, default)
    if isinstance(value, str):
        name, offset = parse_ref(value)
        if name not in refs:
            raise OpError(f"{key} {value!r}: no earlier step saved an fd or address as {name!r}")
        return refs[name] + offset
    return _int(args, key, default)


def flag_bits(args: dict[str, Any], key: str, names: dict[str, int], bits: int) -> int:
    """A flags argument: a list of names from ``names``, or an integer of ``bits`` bits."""
    value = args.get(key, 0)
    if isinstance(value, list):
        out = 0
        for item in value:
            if item not in names:
                raise OpError(f"{key}: unknown flag {item!r} (known: {', '.join(names)})")
            out |= names[item]
        return out
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise OpError(f"{key} must be a list of {', '.join(names)} or an integer from 0 to "
                      f"2^{bits}-1, not {value!r}")
    return value


def hva_of(ctx: RunCtx, inst: Instance, args: dict[str, Any]) -> int:
    """The VMM address a step names: ``gpa`` through the memslot, or a raw ``hva``."""
    if "gpa" in args:
        gpa = _int(args, "gpa")
        if not 0 <= gpa < inst.vmm.ram_size:
            raise OpError(f"gpa {gpa:#x} is outside guest RAM (0..{inst.vmm.ram_size:#x})")
        return inst.vmm.gpa_to_hva(gpa)
    if "hva" in args:
        hva = ref_int(ctx.refs, args, "hva")
        mm = inst.vmm.proc.task.mm
        if mm is None or vma_lookup(mm, hva) is None:
            raise OpError(f"hva {hva:#x} is outside every mapping of the VMM")
        return hva
    raise OpError("the step needs a gpa or an hva")


def _gpa(inst: Instance, args: dict[str, Any]) -> int:
    gpa = _int(args, "gpa")
    if not 0 <= gpa < inst.vmm.ram_size:
        raise OpError(f"gpa {gpa:#x} is outside guest RAM (0..{inst.vmm.ram_size:#x})")
    return gpa


def _guest_gpa(inst: Instance, args: dict[str, Any]) -> int:
    """A guest-physical address: anywhere a memslot covers (guest RAM or an alias slot)."""
    gpa = _int(args, "gpa")
    if gpa < 0 or inst.vm.gfn_to_memslot(gpa >> PAGE_SHIFT) is None:
        raise OpError(f"gpa {gpa:#x} is in no memslot of {inst.spec.name}")
    return gpa


def _pfn(m: Machine, inst: Instance, gpa: int) -> int:
    try:
        return backing_pfn(m, gpa, inst.vmm, inst.vm)
    except ValueError:
        msg = f"no frame backs gpa {gpa:#x} of {inst.spec.name} yet (touch it first)"
        raise OpError(msg) from None


def _ret(value: int) -> Outcome:
    return Outcome.error(-value) if value < 0 else Outcome.ret(value)


# -- guest -------------------------------------------------------------------------------


def _guest(ctx: RunCtx, who: str, op: str, a: dict[str, Any]) -> Outcome:
    inst = ctx.inst(who)
    if inst.vm.create_error:  # KVM_CREATE_VM failed: the VMM has no vCPU to run
        return Outcome.error(inst.vm.create_error, "KVM_CREATE_VM failed: no VM, no vCPU")
    g = inst.guest
    match op:
        case "load":
            return g.load(_guest_gpa(inst, a), _access_size(a))
        case "store":
            return g.store(_guest_gpa(inst, a), data_arg(a))
        case "share":
            gfn = _u64(a, "gfn") if "gfn" in a else _guest_gpa(inst, a) >> PAGE_SHIFT
            # A hypercall's result is RAX, not an errno: -KVM_ENOSYS is "ret:-1000".
            return Outcome.ret(g.share(gfn, _u64(a, "npages", 1)))
        case "unshare":  # gmem: KVM_HC_MAP_GPA_RANGE(ENCRYPTED); hardened: hypercall 14;
            # the RFC has none (E10)
            gfn = _u64(a, "gfn") if "gfn" in a else _guest_gpa(inst, a) >> PAGE_SHIFT
            if inst.vm.protection is Protection.HARDENED:
                return Outcome.ret(g.unshare(gfn, _u64(a, "npages", 1)))
            if inst.vm.gmem is None:
                raise OpError(f"{inst.spec.name}'s design has no unshare (only gmem and "
                              "hardened convert back to private)")
            return Outcome.ret(g.map_gpa_range(gfn, _u64(a, "npages", 1), private=True))
        case "hypercall":
            return Outcome.ret(g.hypercall(_u64(a, "nr"), _u64(a, "a0", 0), _u64(a, "a1", 0)))
        case "reboot":
            g.reboot()
            return Outcome.ok(detail="; ".join(g.log[-3:]))
    raise AssertionError(op)


# -- vmm ----------------------------------------------------------------------------------


def _vmm(ctx: RunCtx, who: str, op: str, a: dict[str, Any]) -> Outcome:
    m = ctx.machine
    inst = ctx.inst(who)
    vmm = inst.vmm
    match op:
        case "load":
            return vmm.proc.load(hva_of(ctx, inst, a), _access_size(a))
        case "store":
            return vmm.proc.store(hva_of(ctx, inst, a), data_arg(a) or bytes([0x44]) * 8)
    if op in proto.LOCAL_PATHS:
        return run_path(make_probe(m, vmm, hva_of(ctx, inst, a)), op)
    if op in FILE_OPS:
        return _file_op(ctx, inst, op, a)
    match op:
        case "fork_child_load":
            try:
                child = vmm.proc.fork()
            except ForkError as failed:
                return Outcome.error(failed.errno, "fork failed (copy_page_range refused)")
            return child.load(hva_of(ctx, inst, a), _access_size(a))
        case "pagecache_read" | "pagecache_write":
            if vmm.ram_fd is None:
                raise OpError("anonymous guest RAM has no page cache")
            buf = vmm.scratch()
            if op == "pagecache_read":
                out = vmm.pread_ram(_gpa(inst, a), buf, _access_size(a))
                if out.succeeded and out.value:
                    got = vmm.proc.load(buf, out.value)
                    return Outcome.ret(out.value, got.data)
                return out
            data = data_arg(a) or bytes(8)
            vmm.proc.store(buf, data)
            return vmm.pwrite_ram(_gpa(inst, a), buf, len(data))
        case "punch_hole":
            if vmm.ram_fd is None:
                raise OpError("anonymous guest RAM has no file to punch")
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            return vmm.proc.fallocate(vmm.ram_fd, mode, _gpa(inst, a),
                                      _loff_t(a, "size", PAGE_SIZE))
        case "munmap":
            return vmm.proc.munmap(hva_of(ctx, inst, a), _u64(a, "size", PAGE_SIZE))
        case "mprotect":
            return vmm.proc.mprotect(hva_of(ctx, inst, a), _u64(a, "size", PAGE_SIZE),
                                     _int(a, "prot"))
        case "madvise":
            advice = a.get("advice")
            code = ADVICE.get(advice) if isinstance(advice, str) else advice
            if not isinstance(code, int):
                raise OpError(f"advice must be an integer or one of {', '.join(ADVICE)}")
            return vmm.proc.madvise(hva_of(ctx, inst, a), _u64(a, "size", PAGE_SIZE), code)
        case "exit":
            m.destroy_vm(inst.spec.name)
            return Outcome.ok(detail="the VMM exited; its VM is dead")
        case "userfaultfd" | "uffdio_api" | "uffdio_register" | "uffdio_copy" | \
                "uffdio_zeropage":
            return _uffd_op(ctx, inst, op, a)
        case "open":  # open(2) of a device the model has: /dev/mem (drivers/char/mem.py)
            path = a.get("path")
            if path != DEV_MEM:
                raise OpError(f"open takes path = {DEV_MEM!r} (the one device the model has), "
                              f"not {path!r}")
            got = vmm.proc.open(DEV_MEM, O_RDWR)
            return Outcome(Kind.OK, value=got.value) if got.kind is Kind.RET else got
        case "move_pages":  # move_pages(2) of one page to node 0: its status
            mm = vmm.proc.task.mm
            assert mm is not None
            return _ret(move_pages(mm, [hva_of(ctx, inst, a)])[0])
        case "vfio_pin":
            hva = hva_of(ctx, inst, a)
            if (inst.spec.name, hva >> PAGE_SHIFT) in ctx.pins:
                # vfio_dma_do_map (drivers/vfio/vfio_iommu_type1.c, read in Debian's 6.1;
                # the vfio_find_dma check predates v5.12): the iova is mapped already,
                # nothing is pinned again.
                return Outcome.error(errno.EEXIST)
            pages: list[Page] = []
            mm = vmm.proc.task.mm
            assert mm is not None
            npinned = pin_user_pages(mm, hva, 1, FOLL.WRITE | FOLL.LONGTERM, pages)
            if npinned == 1:
                ctx.pins[(inst.spec.name, hva >> PAGE_SHIFT)] = pages[0]
            return _ret(npinned)
        case "dma_read" | "dma_write":
            hva = hva_of(ctx, inst, a)
            page = ctx.pins.get((inst.spec.name, hva >> PAGE_SHIFT))
            if page is None:
                raise OpError("no vfio_pin of that page: the device has no pfn to DMA to")
            pa = (page.pfn << PAGE_SHIFT) | (hva & (PAGE_SIZE - 1))
            hw = m.kernel.core.hw
            if op == "dma_write":
                hw.write(pa, data_arg(a), 0)
                return Outcome.ok()
            return Outcome.ok(hw.read(pa, _access_size(a), 0).data)
    raise AssertionError(op)


# -- userfaultfd -----------------------------------------------------------------------------

UFFD_FLAGS = {"CLOEXEC": O_CLOEXEC, "NONBLOCK": O_NONBLOCK, "USER_MODE_ONLY": UFFD_USER_MODE_ONLY}
UFFD_FEATURES = {"SIGBUS": UFFD_FEATURE_SIGBUS}
UFFD_MODES = {"MISSING": UFFDIO_REGISTER_MODE_MISSING, "WP": UFFDIO_REGISTER_MODE_WP,
              "MINOR": UFFDIO_REGISTER_MODE_MINOR}
UFFD_COPY_MODES = {"DONTWAKE": UFFDIO_COPY_MODE_DONTWAKE, "WP": UFFDIO_COPY_MODE_WP}
UFFD_OPS = ("userfaultfd", "uffdio_api", "uffdio_register", "uffdio_copy", "uffdio_zeropage")


def uffd_call_args(op: str, a: dict[str, Any]) -> dict[str, Any]:
    """The checked arguments of a userfaultfd op (saved fds stay ``"$name"``; the address
    is left to the caller, as ``gpa`` or ``hva``)."""
    if op == "userfaultfd":
        return {"flags": flag_bits(a, "flags", UFFD_FLAGS, 32)}
    out: dict[str, Any] = {"fd": _ref_or(a, "fd", FD_MIN, FD_MAX)}
    match op:
        case "uffdio_api":
            out.update(api=_u64(a, "api", 0xAA), features=flag_bits(a, "features",
                                                                     UFFD_FEATURES, 64))
        case "uffdio_register":
            out.update(size=_u64(a, "size", PAGE_SIZE), mode=flag_bits(a, "mode", UFFD_MODES, 64))
        case "uffdio_copy" | "uffdio_zeropage":
            size = _u64(a, "size", PAGE_SIZE)
            if size > ACCESS_MAX:
                raise OpError(f"size {size} of a {op} must be at most {ACCESS_MAX} bytes")
            modes = UFFD_COPY_MODES if op == "uffdio_copy" else {"DONTWAKE": 1}
            out.update(size=size, mode=flag_bits(a, "mode", modes, 64))
            if op == "uffdio_copy":
                data = data_arg(a) or bytes([0x44])
                out["data"] = (data * (size // len(data) + 1))[:size].hex()
    return out


def _uffd_op(ctx: RunCtx, inst: Instance, op: str, a: dict[str, Any]) -> Outcome:
    """userfaultfd(2) and its ioctls, made by the VMM (mm/userfaultfd.py)."""
    c = uffd_call_args(op, a)
    proc = inst.vmm.proc
    if op == "userfaultfd":
        got = proc.sys_userfaultfd(c["flags"])
        return Outcome(Kind.OK, value=got.value) if got.kind is Kind.RET else got
    fd = ref_int(ctx.refs, c, "fd")
    if op == "uffdio_api":
        return proc.uffd_ioctl(fd, "API", api=c["api"], features=c["features"])
    start = hva_of(ctx, inst, a)
    if op == "uffdio_register":
        return proc.uffd_ioctl(fd, "REGISTER", start, c["size"], c["mode"])
    data = bytes.fromhex(c["data"]) if op == "uffdio_copy" else None
    out = proc.uffd_ioctl(fd, "COPY" if data is not None else "ZEROPAGE", start, c["size"],
                          c["mode"], data)
    uffd = proc.uffd_ctx(fd)
    woke = _run_woken(ctx, uffd) if isinstance(uffd, UffdCtx) else ""
    return dataclasses.replace(out, detail=f"{out.detail}{woke}")


def _run_woken(ctx: RunCtx, uffd: UffdCtx) -> str:
    """Re-run the accesses a wake let go, in the order they slept (the kernel's retried
    fault); each result goes to ``ctx.woken`` and the waking step's detail."""
    notes = []
    while uffd.woken:
        waiter = uffd.woken.pop(0)
        if not isinstance(waiter.token, tuple):
            continue  # a sleeper the model cannot re-run
        actor, op, args = waiter.token
        kind, _, who = actor.partition(":")
        try:
            got = OPS[(kind, op)].run(ctx, who, op, args)
        except UserfaultBlocked as again:  # the retry met another missing page
            if again.waiter is not None:
                again.waiter.token = waiter.token
            got = Outcome.blocked("slept again in handle_userfault")
        except Halt as halt:
            ctx.machine.kernel.core.halted = halt.outcome
            got = halt.outcome
        ctx.woken.append((actor, op, got))
        notes.append(f"{actor} {op} -> {got.cell}")
    return f"; woke: {', '.join(notes)}" if notes else ""


# -- files and memslots ---------------------------------------------------------------------

FD_MIN, FD_MAX = -(1 << 31), (1 << 31) - 1


def _ref_or(args: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> Any:
    """``"$name..."`` as written (checked for syntax), or an integer from ``lo`` to ``hi``."""
    value = args.get(key, default)
    if isinstance(value, str):
        parse_ref(value)
        return value
    number = _int(args, key, default)
    if not lo <= number <= hi:
        raise OpError(f"{key} {number} must be from {lo} to {hi}")
    return number


def call_args(op: str, a: dict[str, Any]) -> dict[str, Any]:
    """The checked arguments of a file or memslot op, names turned into numbers.

    Saved values stay ``"$name+off"`` strings: the model and the live kernel each
    resolve them against their own fds and addresses.
    """
    out: dict[str, Any] = {}
    if op not in ("set_user_memory_region2", "guest_memfd_create", "memfd_create") and \
            (op != "ftruncate" or "fd" in a):
        out["fd"] = _ref_or(a, "fd", FD_MIN, FD_MAX)
    match op:
        case "guest_memfd_create":
            out.update(size=_u64(a, "size"), flags=flag_bits(a, "flags", GMEM_FLAGS, 64))
            if "vm" in a:  # the ioctl goes to another VM's fd, as a selftest holding two does
                out["vm"] = str(a["vm"]).removeprefix("vmm:")
        case "close":
            if not isinstance(out["fd"], str):
                raise OpError("close takes a saved fd (\"$name\"): the tool's own fds are not "
                              "the scenario's to close")
        case "mmap":
            shared = a.get("shared", True)
            if not isinstance(shared, bool):
                raise OpError(f"shared must be true or false, not {shared!r}")
            out.update(size=_u64(a, "size"), offset=_loff_t(a, "offset", 0), shared=shared)
        case "fallocate":
            out.update(mode=flag_bits(a, "mode", FALLOC_MODES, 31), offset=_loff_t(a, "offset"),
                       len=_loff_t(a, "len"))
        case "read" | "write" | "pread" | "pwrite":
            size = _int(a, "size")
            if not 0 <= size <= ACCESS_MAX:
                raise OpError(f"size {size} must be from 0 to {ACCESS_MAX} bytes")
            out["size"] = size
            if op.startswith("p"):
                out["offset"] = _loff_t(a, "offset")
            if op.endswith("write"):
                data = data_arg(a) or bytes([0x44])
                out["data"] = (data * (size // len(data) + 1))[:size].hex()
        case "lseek":
            whence = a.get("whence", "SET")
            out.update(offset=_loff_t(a, "offset"), whence=WHENCE[whence]
                       if isinstance(whence, str) and whence in WHENCE
                       else flag_bits(a, "whence", WHENCE, 31))
        case "ftruncate":
            out["size"] = _loff_t(a, "size")
        case "set_user_memory_region2":
            slot = _int(a, "slot")
            if not 0 <= slot < 1 << 32:
                raise OpError(f"slot {slot} must be from 0 to 2^32-1 (a u32)")
            if "vm" in a:  # the ioctl goes to another VM's fd
                out["vm"] = str(a["vm"]).removeprefix("vmm:")
            out.update(slot=slot, gpa=_u64(a, "gpa"),
                       size=_u64(a, "size"), hva=_ref_or(a, "hva", 0, U64_MAX, 0),
                       guest_memfd=_ref_or(a, "guest_memfd", 0, (1 << 32) - 1, 0),
                       guest_memfd_offset=_u64(a, "guest_memfd_offset", 0),
                       flags=flag_bits(a, "flags", MEMSLOT_FLAGS, 32))
    return out


def _buffer(ctx: RunCtx, inst: Instance) -> int:
    """The VMM's read/write buffer: ACCESS_MAX bytes of anonymous memory, mapped once."""
    buf = ctx.bufs.get(inst.spec.name)
    if buf is None:
        out = inst.vmm.proc.mmap(0, ACCESS_MAX, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS)
        if not out.succeeded or out.value is None:
            raise OpError(f"no room for a {ACCESS_MAX}-byte buffer in the VMM: {out.cell}")
        buf = ctx.bufs[inst.spec.name] = out.value
    return buf


def _file_op(ctx: RunCtx, inst: Instance, op: str, a: dict[str, Any]) -> Outcome:
    """The calls of ``call_args``, made by the VMM process of ``inst``."""
    c = call_args(op, a)
    proc = inst.vmm.proc
    fd = ref_int(ctx.refs, c, "fd") if "fd" in c else None
    match op:
        case "guest_memfd_create":
            size = c["size"] - (1 << 64) if c["size"] >= 1 << 63 else c["size"]  # a loff_t
            if size > VM_MEMORY_MAX:
                raise OpError(f"size {size} of a guest_memfd is beyond the model's "
                              f"{VM_MEMORY_MAX} bytes")
            vm = ctx.inst(c["vm"]).vm if "vm" in c else inst.vm
            out = proc.guest_memfd(vm, size, c["flags"])
        case "memfd_create":
            out = proc.memfd_create("kvmpoison-memfd")
        case "mmap":
            assert fd is not None
            flags = MAP_SHARED if c["shared"] else MAP_PRIVATE
            out = proc.mmap(0, c["size"], PROT_READ | PROT_WRITE, flags, fd, c["offset"])
        case "fallocate":
            assert fd is not None
            return proc.fallocate(fd, c["mode"], c["offset"], c["len"])
        case "read" | "pread":
            assert fd is not None
            buf = _buffer(ctx, inst)
            got = proc.read(fd, buf, c["size"]) if op == "read" else \
                proc.pread(fd, buf, c["size"], c["offset"])
            if got.kind is Kind.RET and got.value:
                return Outcome.ret(got.value, proc.load(buf, got.value).data)
            return got
        case "write" | "pwrite":
            assert fd is not None
            buf = _buffer(ctx, inst)
            data = bytes.fromhex(c["data"])
            if data:
                proc.store(buf, data)
            return proc.write(fd, buf, c["size"]) if op == "write" else \
                proc.pwrite(fd, buf, c["size"], c["offset"])
        case "lseek":
            assert fd is not None
            return proc.lseek(fd, c["offset"], c["whence"])
        case "close":
            assert fd is not None
            return proc.close(fd)
        case "fstat":
            assert fd is not None
            return proc.fstat(fd)
        case "ftruncate":
            if fd is None:
                if inst.vmm.ram_fd is None:
                    raise OpError("anonymous guest RAM has no file to truncate")
                fd = inst.vmm.ram_fd
            return proc.ftruncate(fd, c["size"])
        case "set_user_memory_region2":
            err = set_user_memory_region2(
                ctx.inst(c["vm"]).vm if "vm" in c else inst.vm, proc.task.fds, c["slot"],
                c["flags"], c["gpa"], c["size"], ref_int(ctx.refs, c, "hva"),
                ref_int(ctx.refs, c, "guest_memfd"), c["guest_memfd_offset"])
            return Outcome.error(-err) if err else Outcome.ret(0)
        case _:
            raise AssertionError(op)
    # guest_memfd_create, memfd_create and mmap: "ok", and the fd or address a save keeps.
    return Outcome(Kind.OK, value=out.value) if out.kind is Kind.RET else out


FILE_OPS = ("guest_memfd_create", "mmap", "fallocate", "read", "write", "pread", "pwrite",
            "lseek", "ftruncate", "set_user_memory_region2", "close", "fstat", "memfd_create")


# -- host ----------------------------------------------------------------------------------


def _host(ctx: RunCtx, who: str, op: str, a: dict[str, Any]) -> Outcome:
    m = ctx.machine
    if op in proto.REMOTE_PATHS:
        inst = ctx.inst(str(a["target"]))
        hva = hva_of(ctx, inst, a)
        return run_path(make_probe(m, inst.vmm, hva), op)
    if op == "new_vm":
        try:
            spec = VmSpec(name=str(a["name"]), memory=parse_size(a.get("memory", 4 << 20),
                                                                 "memory", hi=VM_MEMORY_MAX),
                          backing=str(a.get("backing", "memfd")),
                          share_ram_with=a.get("share_ram_with"), fork_of=a.get("fork_of"))
            inst = m.add_vm(spec)
        except VmSetupError as failed:  # KVM refused the guest RAM (hardened: a bound file)
            return Outcome.error(failed.errno, str(failed))
        except ForkError as failed:  # fork_of: the VMM's fork failed (hardened: private pages)
            return Outcome.error(failed.errno, "fork failed (copy_page_range refused)")
        except (ValueError, RuntimeError) as exc:  # bad arguments, or the VMM's set-up failed
            raise OpError(f"new_vm: {exc}") from None
        return Outcome.ok(detail=f"VM {spec.name} has kvm->id {inst.vm.ident}")
    if op == "ksmd":  # one full pass of ksmd over every MADV_MERGEABLE range
        return Outcome.ret(ksm_do_scan(m.kernel.core))
    if op == "khugepaged_scan":  # one full khugepaged pass: the THPs collapsed
        return Outcome.ret(khugepaged_scan(m.kernel.core))
    if op == "deferred_split_scan":  # the deferred-split shrinker: the THPs split
        return Outcome.ret(deferred_split_scan(m.kernel.core))
    if op == "set_memory_region":  # KVM_SET_USER_MEMORY_REGION, e.g. an alias of guest RAM
        inst = ctx.inst(str(a["vm"]))
        flags = _int(a, "flags", 0)
        if not 0 <= flags < 1 << 32:
            raise OpError(f"flags {flags} must be from 0 to 2^32-1 (a u32)")
        if flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
            # kvm_vm_ioctl (virt/kvm/kvm_main.c, 6.8 on): the v1 ioctl takes no v2-only flag.
            return Outcome.error(errno.EINVAL)
        if flags:
            raise OpError("set_memory_region models no LOG_DIRTY_PAGES or READONLY slot")
        hva = hva_of(ctx, inst, {"gpa": a["alias_gpa"]} if "alias_gpa" in a else a)
        return _ret(inst.vm.set_user_memory_region(_int(a, "slot"), _int(a, "guest_phys_addr"),
                                                   _int(a, "size"), hva))
    if op == "fail_xa_store":  # fault injection: the next xa_store(kvm_pfn_map) calls fail
        times = _int(a, "times", 1)
        if times < 1:
            raise OpError("times must be at least 1")
        m.kvm.kvm_pfn_map.fail_stores += times
        return Outcome.ok(detail=f"the next {times} xa_store call(s) return -ENOMEM")
    inst = ctx.inst(str(a["vm"]))
    core = m.kernel.core
    match op:
        case "memory_failure":
            return _ret(memory_failure(core, _pfn(m, inst, _gpa(inst, a)), 0))
        case "offline_pages":  # memory hot-unplug of the page's frame (its verdict)
            return _ret(offline_pages(core, _pfn(m, inst, _gpa(inst, a)), 1))
        case "alloc_contig_range":  # CMA over the page's frame (its verdict)
            return _ret(alloc_contig_range(core, _pfn(m, inst, _gpa(inst, a)), 1))
        case "soft_offline":  # what a RAS daemon does on corrected errors
            if not core.kcfg.memory_failure:
                raise OpError("soft_offline needs CONFIG_MEMORY_FAILURE ([machine] "
                              "memory_failure = true)")
            return _ret(soft_offline_page(core, _pfn(m, inst, _gpa(inst, a)), 0))
        case "unpoison":
            return _ret(unpoison_memory(core, _pfn(m, inst, _gpa(inst, a))))
        case "kvm_read":
            read = inst.vm.read_guest(_gpa(inst, a), _access_size(a))
            return Outcome.error(-read) if isinstance(read, int) else Outcome.ok(read)
        case "kvm_write":
            return _ret(inst.vm.write_guest(_gpa(inst, a), data_arg(a)))
        case "real_memory_error_then_free":
            return error_then_free(m, _gpa(inst, a), inst.vmm, inst.vm)
        case "kernel_read" | "kernel_write":
            # A kernel access through the direct map (hibernation, a kdump, a bug).
            gpa = _gpa(inst, a)
            pa = (_pfn(m, inst, gpa) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))
            if op == "kernel_write":
                core.hw.write(pa, data_arg(a), 0)
                return Outcome.ok()
            got = core.hw.load(pa, _access_size(a), 0, Ctx.HOST_KERNEL)
            if got.kind is Kind.PANIC:
                raise Halt(got)
            return got
        case "core_dump_page":
            mm = inst.vmm.proc.task.mm
            if mm is None:
                raise OpError("the VMM has exited: nothing to dump")
            page = get_dump_page(mm, hva_of(ctx, inst, a))
            if page is None:
                return Outcome.ret(0, detail="a hole in the core dump")
            put_page(page)
            return Outcome.ret(1, detail="the page is in the core dump")
    raise AssertionError(op)


# -- hw --------------------------------------------------------------------------------------


def _hw(ctx: RunCtx, who: str, op: str, a: dict[str, Any]) -> Outcome:
    m = ctx.machine
    inst = ctx.inst(str(a["vm"]))
    gpa = _gpa(inst, a)
    pa = (_pfn(m, inst, gpa) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))
    hw = m.kernel.core.hw
    match op:
        case "inject_dram_error":
            hw.inject_dram_error(pa)
        case "tamper":
            hw.tamper_ciphertext(pa)
        case "seam_read":
            # The TDX module (SEAM root) reads the line with the TD's KeyID.
            keyid = inst.vm.td_keyid if inst.vm.td_keyid is not None else 0
            got = hw.load(pa, 8, keyid, Ctx.SEAM_ROOT)
            if got.kind in (Kind.SHUTDOWN, Kind.PANIC):
                raise Halt(got)
            return got
    return Outcome.ok()


@dataclass(frozen=True)
class OpSpec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    run: Callable[[RunCtx, str, str, dict[str, Any]], Outcome]
    refers_to_vm: bool = True


_ADDR = ("gpa", "hva")
OPS: dict[tuple[str, str], OpSpec] = {
    ("guest", "load"): OpSpec(("gpa",), ("size",), _guest),
    ("guest", "store"): OpSpec(("gpa", "data"), (), _guest),
    ("guest", "share"): OpSpec((), ("gpa", "gfn", "npages"), _guest),
    ("guest", "unshare"): OpSpec((), ("gpa", "gfn", "npages"), _guest),
    ("guest", "hypercall"): OpSpec(("nr",), ("a0", "a1"), _guest),
    ("guest", "reboot"): OpSpec((), (), _guest),
    **{("vmm", p): OpSpec((), _ADDR, _vmm) for p in proto.LOCAL_PATHS},
    ("vmm", "load"): OpSpec((), (*_ADDR, "size"), _vmm),
    ("vmm", "store"): OpSpec((), (*_ADDR, "data"), _vmm),
    ("vmm", "fork_child_load"): OpSpec((), (*_ADDR, "size"), _vmm),
    ("vmm", "pagecache_read"): OpSpec(("gpa",), ("size",), _vmm),
    ("vmm", "pagecache_write"): OpSpec(("gpa",), ("data",), _vmm),
    ("vmm", "punch_hole"): OpSpec(("gpa",), ("size",), _vmm),
    ("vmm", "ftruncate"): OpSpec(("size",), ("fd",), _vmm),
    ("vmm", "guest_memfd_create"): OpSpec(("size",), ("flags", "vm"), _vmm),
    ("vmm", "close"): OpSpec(("fd",), (), _vmm),
    ("vmm", "memfd_create"): OpSpec((), (), _vmm),
    ("vmm", "open"): OpSpec(("path",), (), _vmm),
    ("vmm", "userfaultfd"): OpSpec((), ("flags",), _vmm),
    ("vmm", "uffdio_api"): OpSpec(("fd",), ("api", "features"), _vmm),
    ("vmm", "uffdio_register"): OpSpec(("fd", "mode"), (*_ADDR, "size"), _vmm),
    ("vmm", "uffdio_copy"): OpSpec(("fd",), (*_ADDR, "size", "data", "mode"), _vmm),
    ("vmm", "uffdio_zeropage"): OpSpec(("fd",), (*_ADDR, "size", "mode"), _vmm),
    ("vmm", "fstat"): OpSpec(("fd",), (), _vmm),
    ("vmm", "mmap"): OpSpec(("fd", "size"), ("offset", "shared"), _vmm),
    ("vmm", "fallocate"): OpSpec(("fd", "mode", "offset", "len"), (), _vmm),
    ("vmm", "read"): OpSpec(("fd", "size"), (), _vmm),
    ("vmm", "write"): OpSpec(("fd", "size"), ("data",), _vmm),
    ("vmm", "pread"): OpSpec(("fd", "size", "offset"), (), _vmm),
    ("vmm", "pwrite"): OpSpec(("fd", "size", "offset"), ("data",), _vmm),
    ("vmm", "lseek"): OpSpec(("fd", "offset"), ("whence",), _vmm),
    ("vmm", "set_user_memory_region2"): OpSpec(
        ("slot", "gpa", "size"), ("hva", "guest_memfd", "guest_memfd_offset", "flags", "vm"),
        _vmm),
    ("vmm", "munmap"): OpSpec((), (*_ADDR, "size"), _vmm),
    ("vmm", "mprotect"): OpSpec(("prot",), (*_ADDR, "size"), _vmm),
    ("vmm", "madvise"): OpSpec(("advice",), (*_ADDR, "size"), _vmm),
    ("vmm", "exit"): OpSpec((), (), _vmm),
    ("vmm", "vfio_pin"): OpSpec((), _ADDR, _vmm),
    ("vmm", "move_pages"): OpSpec((), _ADDR, _vmm),
    ("vmm", "dma_read"): OpSpec((), (*_ADDR, "size"), _vmm),
    ("vmm", "dma_write"): OpSpec(("data",), _ADDR, _vmm),
    **{("host", p): OpSpec(("target",), _ADDR, _host) for p in proto.REMOTE_PATHS},
    ("host", "new_vm"): OpSpec(("name",), ("memory", "backing", "share_ram_with", "fork_of"),
                               _host, refers_to_vm=False),
    ("host", "memory_failure"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "soft_offline"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "offline_pages"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "alloc_contig_range"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "fail_xa_store"): OpSpec((), ("times",), _host),
    ("host", "set_memory_region"): OpSpec(("vm", "slot", "guest_phys_addr", "size"),
                                          ("alias_gpa", "hva", "flags"), _host),
    ("host", "ksmd"): OpSpec((), (), _host),
    ("host", "khugepaged_scan"): OpSpec((), (), _host),
    ("host", "deferred_split_scan"): OpSpec((), (), _host),
    ("host", "unpoison"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "kvm_read"): OpSpec(("vm", "gpa"), ("size",), _host),
    ("host", "kvm_write"): OpSpec(("vm", "gpa", "data"), (), _host),
    ("host", "real_memory_error_then_free"): OpSpec(("vm", "gpa"), (), _host),
    ("host", "kernel_read"): OpSpec(("vm", "gpa"), ("size",), _host),
    ("host", "kernel_write"): OpSpec(("vm", "gpa", "data"), (), _host),
    ("host", "core_dump_page"): OpSpec(("vm",), _ADDR, _host),
    ("hw", "inject_dram_error"): OpSpec(("vm", "gpa"), (), _hw),
    ("hw", "tamper"): OpSpec(("vm", "gpa"), (), _hw),
    ("hw", "seam_read"): OpSpec(("vm", "gpa"), (), _hw),
}
