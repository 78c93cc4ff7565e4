"""``kvm_share_memory``'s vectorised path leaves exactly the state the RFC's per-page loop
(``gfn_to_page``, share, ``put_page`` for each gfn) leaves: every field of every object
of the machine, every array byte, every pfn."""

import functools
import itertools
import types
from collections.abc import Callable

import numpy as np
import pytest

from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm import shmem
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.madvise import MADV_DONTNEED
from kvmpoison.mm.page_flags import PG
from kvmpoison.virt.kvm import mem_protected
from kvmpoison.virt.kvm.kvm_main import Vm
from kvmpoison.virt.kvm.mem_protected import kvm_share_memory

SCALARS = (int, float, complex, str, bytes, bool, type(None), range, np.generic)


def assert_same_state(a: object, b: object, path: str = "machine",
                      seen: set[int] | None = None) -> None:
    """Walk two object graphs side by side; any difference fails with its path."""
    seen = set() if seen is None else seen
    if isinstance(a, types.BuiltinMethodType) and not isinstance(a.__self__, types.ModuleType):
        assert isinstance(b, types.BuiltinMethodType) and a.__name__ == b.__name__, path
        assert_same_state(a.__self__, b.__self__, f"{path}.__self__", seen)
        return
    if isinstance(a, (*SCALARS, type, types.ModuleType, types.FunctionType,
                      types.BuiltinFunctionType)):
        assert type(a) is type(b) and (a == b or a is b), path
        return
    if id(a) in seen:
        return
    seen.add(id(a))
    assert type(a) is type(b), path
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert np.array_equal(a.view(np.uint8) if a.dtype == object else a, b), path
    elif isinstance(a, memoryview):
        assert isinstance(b, memoryview) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same_state(ka, kb, f"{path} key", seen)
            assert_same_state(va, vb, f"{path}[{ka!r}]", seen)
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for n, (xa, xb) in enumerate(zip(a, b, strict=True)):
            assert_same_state(xa, xb, f"{path}[{n}]", seen)
    elif isinstance(a, set | frozenset):
        assert a == b, path
    elif isinstance(a, types.MethodType):
        assert isinstance(b, types.MethodType) and a.__func__ is b.__func__, path
        assert_same_state(a.__self__, b.__self__, f"{path}.__self__", seen)
    elif isinstance(a, functools.partial):
        assert isinstance(b, functools.partial) and a.func.__name__ == b.func.__name__, path
        assert_same_state((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), path, seen)
    elif isinstance(a, itertools.count):
        assert repr(a) == repr(b), path
    elif hasattr(a, "digest") and hasattr(a, "copy"):  # a keyed hashlib object
        assert a.copy().digest() == b.copy().digest(), path  # type: ignore[attr-defined]
    elif hasattr(a, "getstate") and hasattr(a, "setstate"):  # random.Random
        assert a.getstate() == b.getstate(), path  # type: ignore[attr-defined]
    else:
        state_a = dict(vars(a)) if hasattr(a, "__dict__") else {}
        state_b = dict(vars(b)) if hasattr(b, "__dict__") else {}
        for cls in type(a).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(a, name):
                    state_a[name], state_b[name] = getattr(a, name), getattr(b, name)
        assert state_a.keys() == state_b.keys(), path
        assert state_a or hasattr(a, "__dict__") or a == b, f"{path}: cannot compare {type(a)}"
        if "stack" in state_a and "top" in state_a:  # a free area: entries past top are garbage
            state_a["stack"] = state_a["stack"][: state_a["top"]]
            state_b["stack"] = state_b["stack"][: state_b["top"]]
        for name, va in state_a.items():
            # Skipped: derived caches (a copy starts with them empty) and the registry's
            # index by id() (ids differ between any two objects).
            if "cache" not in name and not (name == "_ids" and hasattr(a, "_objects")):
                assert_same_state(va, state_b[name], f"{path}.{name}", seen)


def shares_per_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mem_protected, "_share_shmem_holes", lambda vm, hvas, i: 0)


def boot(design: str, backing: str, monkeypatch: pytest.MonkeyPatch) -> Machine:
    monkeypatch.setattr(shmem, "_inodes", itertools.count(1000))  # the same inode numbers
    return Machine(Config(design=design, vm_mem=8 << 20, backing=backing))


@pytest.mark.parametrize(("design", "backing"), [("rfc-v1", "memfd"), ("rfc-v2", "memfd"),
                                                  ("rfc-v2", "anon"), ("rfc-v2", "file")])
def test_a_guest_boots_to_the_same_machine_either_way(
        design: str, backing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bulk = boot(design, backing, monkeypatch)
    with monkeypatch.context() as m:
        shares_per_page(m)
        per_page = boot(design, backing, monkeypatch)
    assert_same_state(bulk, per_page)
    assert bulk.vm.shared_ranges  # the boot did share


def test_the_walk_finds_a_difference() -> None:
    """The comparison is not vacuous: one refcount, one PTE or one dict entry differs."""
    m = Machine(Config(design="rfc-v2", vm_mem=4 << 20))
    changes: list[Callable[[Machine], object]] = [
        lambda c: c.kernel.core.pages._refcount.__setitem__(5, 7),
        lambda c: c.vmm.proc.mm.pgd.set(0x7000_0000_0000, 0x1),
        lambda c: c.vm.shared_ranges.append((1, 2))]
    for change in changes:
        c = m.copy()
        change(c)
        with pytest.raises(AssertionError):
            assert_same_state(m, c)


def prepared(design: str) -> Machine:
    """A booted guest whose RAM around gfn 0x1f0..0x240 is a mix: some pages cached and
    mapped, one cached but unmapped, one private (protected), the rest holes."""
    m = Machine(Config(design=design, vm_mem=8 << 20))
    vmm = m.vmm
    assert m.guest.store(0x1F8 << 12, b"private").succeeded  # protected (v1, v2)
    assert vmm.store(0x210 << 12, b"vmm page").succeeded  # cached and mapped
    assert vmm.store(0x220 << 12, b"cached").succeeded
    dropped = vmm.proc.madvise(vmm.gpa_to_hva(0x220 << 12), 1 << 12, MADV_DONTNEED)
    assert dropped.succeeded  # cached, no PTE
    assert vmm.ram_fd is not None
    punch = vmm.proc.fallocate(vmm.ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               0x218 << 12, 1 << 12)
    assert punch.cell == "ret:0"
    return m


def share_both_ways(m: Machine, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Share 0x80 pages from gfn 0x1f0 (across the 2 MiB boundary at gfn 0x200, a new PTE
    table) on ``m`` the bulk way and on a copy page by page, check both end in the same
    state, and return how many pages each took through the per-page path."""
    c = m.copy()
    calls: list[int] = []
    one = mem_protected._share_one

    def counted(vm: Vm, hva: int) -> object:
        calls.append(hva)
        return one(vm, hva)

    monkeypatch.setattr(mem_protected, "_share_one", counted)
    assert kvm_share_memory(m.vm, 0x1F0, 0x80) == 0
    bulk_calls = len(calls)
    assert kvm_share_memory(c.vm, 0x1F0, 0x80, bulk=False) == 0
    assert_same_state(m, c)
    return bulk_calls, len(calls) - bulk_calls


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_sharing_a_mixed_range_gives_the_per_page_state(
        design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = prepared(design)
    bulk_calls, per_page_calls = share_both_ways(m, monkeypatch)
    assert per_page_calls == 0x80
    assert bulk_calls < 0x80 // 4  # most pages went the vectorised way


def test_running_out_of_memory_mid_run_gives_the_per_page_state() -> None:
    m = Machine(Config(design="rfc-v2", vm_mem=8 << 20))
    buddy = m.kernel.core.buddy
    buddy.alloc_pages_bulk(buddy.nr_free - 5)  # five pages left
    c = m.copy()
    kvm_share_memory(m.vm, 0x100, 0x40)
    kvm_share_memory(c.vm, 0x100, 0x40, bulk=False)
    assert buddy.nr_free == 0
    assert_same_state(m, c)


@pytest.mark.parametrize("left", [None, 0x40 + 2, 2])
def test_sharing_where_no_page_table_exists_gives_the_per_page_state(
        left: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """gfns 0x600..0x640: no PTE table yet. The first fault allocates its page, then the
    tables; with memory short (``left`` free pages) the per-page path meets the failure."""
    m = Machine(Config(design="rfc-v2", vm_mem=8 << 20))
    assert m.vmm.proc.mm.pgd.pte_slot(m.vmm.gpa_to_hva(0x600 << 12)) is None
    if left is not None:
        buddy = m.kernel.core.buddy
        buddy.alloc_pages_bulk(buddy.nr_free - left)
    c = m.copy()
    calls: list[int] = []
    one = mem_protected._share_one
    def counted(vm: Vm, hva: int) -> object:
        calls.append(hva)
        return one(vm, hva)

    monkeypatch.setattr(mem_protected, "_share_one", counted)
    kvm_share_memory(m.vm, 0x600, 0x40)
    assert (len(calls) == 0) is (left is None)  # vectorised unless memory is short
    kvm_share_memory(c.vm, 0x600, 0x40, bulk=False)
    assert_same_state(m, c)


def mapped_mix(design: str) -> Machine:
    """:func:`prepared`, its range shared once (so faulted in and mapped), then one clean
    PTE, a page poisoned for this VM, one poisoned for another VM id and one without a
    reference (GUP refuses it) in the range: pages the vectorised path must leave alone
    or treat as the per-page path does."""
    m = prepared(design)
    assert kvm_share_memory(m.vm, 0x1F0, 0x80) == 0
    mm, core = m.vmm.proc.mm, m.kernel.core
    mem, owner = core.pages, m.kvm.kvm_pfn_map.owner

    def pfn_of(gfn: int) -> int:
        pte = mm.pgd.get(m.vmm.gpa_to_hva(gfn << 12))
        assert pte & 1, hex(gfn)
        return (pte >> 12) & ((1 << 40) - 1)

    mm.pgd.set(m.vmm.gpa_to_hva(0x1F3 << 12), mm.pgd.get(m.vmm.gpa_to_hva(0x1F3 << 12)) & ~0x40)
    mem.flags[pfn_of(0x1F3)] &= ~np.uint32(mem.mask(PG.dirty))  # a clean page, clean PTE
    for gfn, ident in ((0x1F5, m.vm.ident), (0x230, m.vm.ident + 7), (0x238, m.vm.ident)):
        mem.flags[pfn_of(gfn)] |= np.uint32(mem.mask(PG.hwpoison))
        owner[pfn_of(gfn)] = ident
    mem._refcount[pfn_of(0x238)] = 0  # and poisoned: a share that took it would unpoison it
    return m


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_sharing_mapped_pages_again_gives_the_per_page_state(
        design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = mapped_mix(design)
    bulk_calls, _ = share_both_ways(m, monkeypatch)
    assert bulk_calls < 0x80 // 4  # most pages went the vectorised way
    mem = m.kernel.core.pages
    assert (mem.flags & np.uint32(mem.mask(PG.dirty))).any()


@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_a_reboot_shares_to_the_per_page_state(
        design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(Config(design=design, vm_mem=8 << 20))
    assert m.guest.store(0x10 << 12, b"swiotlb").succeeded
    c = m.copy()
    m.guest.reboot()
    monkeypatch.setattr(mem_protected, "_share_mapped_run", lambda vm, hvas, i: 0)
    shares_per_page(monkeypatch)
    c.guest.reboot()
    assert_same_state(m, c)
