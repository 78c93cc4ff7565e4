"""``Machine.copy()``: a booted machine copied shares no mutable state with its original,
and each evolves on its own (guest memory, page tables, struct page, KVM EPT and pfn map,
file pages)."""

import dataclasses
import enum
import types

import numpy as np

from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE

PAGE = 4096
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), enum.Enum, range, np.generic,
             types.BuiltinFunctionType, type, types.ModuleType)


def _immutable(obj: object) -> bool:
    if isinstance(obj, IMMUTABLE):
        return True
    if isinstance(obj, (tuple, frozenset)):
        return all(_immutable(x) for x in obj)
    if isinstance(obj, types.FunctionType):
        return obj.__closure__ is None or all(_immutable(c.cell_contents) for c in obj.__closure__)
    if dataclasses.is_dataclass(obj) and type(obj).__dataclass_params__.frozen:  # type: ignore[union-attr]
        return True
    return type(obj).__name__ in ("LineMac", "HASH")  # immutable after construction


def _graph(root: object) -> tuple[dict[int, object], list[np.ndarray]]:
    """Every mutable object reachable from ``root`` (by id), and every numpy array."""
    seen: dict[int, object] = {}
    arrays: list[np.ndarray] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or _immutable(obj):
            continue
        seen[id(obj)] = obj
        if isinstance(obj, np.ndarray):
            arrays.append(obj)
            continue
        if isinstance(obj, memoryview):
            stack.append(obj.obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or ())
        else:
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
            for cls in type(obj).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(obj, name):
                        stack.append(getattr(obj, name))
            if hasattr(obj, "func") and hasattr(obj, "args"):  # functools.partial
                stack.extend((obj.func, obj.args, obj.keywords))  # type: ignore[attr-defined]
    return seen, arrays


def booted() -> Machine:
    m = Machine(Config(design="rfc-v2", vm_mem=4 << 20))
    assert m.guest.store(0x40000, b"private data").succeeded
    return m


def test_copy_shares_no_mutable_object_and_no_array_memory() -> None:
    m = booted()
    c = m.copy()
    mine, my_arrays = _graph(m)
    theirs, their_arrays = _graph(c)
    assert len(mine) > 100 and len(my_arrays) > 20  # the walk reached every layer
    shared = [type(v).__name__ for k, v in theirs.items() if k in mine]
    assert shared == []
    for a in my_arrays:
        for b in their_arrays:
            assert not np.shares_memory(a, b), (a.shape, b.shape)


def fingerprint(m: Machine) -> dict[str, object]:
    """The state of every layer, as plain values."""
    core = m.kernel.core
    hw = core.hw
    mem = hw.mem
    top = mem._top
    vmm = m.vmm
    td = m.vm.td_keyid
    assert vmm.ram_fd is not None
    ram = vmm.proc.task.fds[vmm.ram_fd].f_inode.mapping
    assert ram is not None
    return {
        "guest memory": [hw.read(pfn * PAGE, PAGE,
                                 (td or 0) if hw.line_state(pfn * PAGE).td else 0)
                         for pfn in mem.allocated_pfns()],  # as its owner reads it
        "frames": [a[:top].tobytes() for a in (mem.ct, mem.mac, mem.flags, mem.writer)]
                  + [mem.slot_of.tobytes(), mem.zstate.tobytes()],
        "struct page": [a.tobytes() for a in (core.pages.flags, core.pages._refcount,
                                              core.pages._mapcount, core.pages.mapping,
                                              core.pages.index)],
        "page tables": core.ptes.rows.tobytes(),
        "vmas": [(v.vm_start, v.vm_end, int(v.vm_flags)) for v in vmm.proc.mm.vmas],
        "ept": m.vm.ept.store.rows.tobytes(),
        "kvm pfn map": m.kvm.kvm_pfn_map.owner.tobytes(),
        "file pages": ram.pages.tobytes(),
        "tlbs": [list(cpu.tlb._entries.items()) for cpu in core.cpus],
        "processes": [(pid, t.comm, t.alive, sorted(t.fds)) for pid, t in m.kernel.tasks.items()],
        "guest": (list(m.guest.shared), list(m.guest.conversions), list(m.guest.log)),
        "vmm": (vmm.ram_fd, vmm.gmem_fd, list(vmm.conversions)),
        "free lists": [a.stack[: a.top].tobytes() for a in core.buddy.areas],
    }


def mutate_every_layer(m: Machine) -> None:
    vmm = m.vmm
    assert m.guest.store(0x80000, b"more guest data").succeeded  # memory, EPT, pfn map
    addr = vmm.proc.mmap(0, 4 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS).value
    assert addr is not None and vmm.proc.store(addr, b"anon").succeeded  # PTEs, struct page
    assert vmm.ram_fd is not None
    punched = vmm.proc.fallocate(vmm.ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 0x200000, 0x10000)  # file pages
    assert punched.cell == "ret:0"
    assert vmm.proc.load(addr, 4).data == b"anon"  # a TLB entry
    m.process("attacker").pipe()  # a task and its fds, pages off the free lists
    assert m.guest.share(0x90, 1) == 0  # the guest's shared ranges and log
    vmm.conversions.append("kvm_convert_memory")  # the VMM's own record


def test_copy_and_original_evolve_independently() -> None:
    m = booted()
    assert m.vmm.store(0x200000, b"file page").succeeded
    c = m.copy()
    before = fingerprint(m)
    assert fingerprint(c) == before
    mutate_every_layer(c)
    after_copy = fingerprint(c)
    assert fingerprint(m) == before  # the original did not see the copy's changes
    for layer in before:
        assert after_copy[layer] != before[layer], layer  # every layer did change
    mutate_every_layer(m)
    assert fingerprint(c) == after_copy  # ... nor the copy the original's
    assert fingerprint(m) == after_copy  # and both ran the same steps to the same state


def test_restore_goes_back_to_a_snapshot_again_and_again() -> None:
    m = booted()
    snap = m.snapshot()
    before = fingerprint(m)
    for _ in range(2):
        mutate_every_layer(m)
        assert fingerprint(m) != before
        m.restore(snap)
        assert fingerprint(m) == before
    assert fingerprint(snap) == before  # restoring did not consume the snapshot


def test_copy_has_its_own_random_state_at_the_same_point() -> None:
    m = booted()
    m.kernel.rng.random()
    c = m.copy()
    assert c.kernel.rng is not m.kernel.rng
    first = [m.kernel.rng.random() for _ in range(3)]
    assert [c.kernel.rng.random() for _ in range(3)] == first  # same point, advanced alone


def test_copy_of_a_file_backed_vm_faults_through_its_own_file() -> None:
    m = Machine(Config(design="baseline", vm_mem=4 << 20, backing="file"))
    c = m.copy()
    mine, _ = _graph(m)
    theirs, _ = _graph(c)
    assert [type(v).__name__ for k, v in theirs.items() if k in mine] == []
    # The copy's guest RAM faults in from the copy's page cache, not the original's.
    assert c.guest.store(0x30000, b"guest").succeeded
    assert c.guest.load(0x30000, 5).data == b"guest"
    assert m.guest.load(0x30000, 5).data == bytes(5)
