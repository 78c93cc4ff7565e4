"""mremap(2) (mm/mremap.c v5.12, 6.18 where it differs) and KSM's edges (mm/ksm.c,
mm/memory-failure.c v5.12/6.1)."""

from __future__ import annotations

import errno

import pytest

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.kernel.process import Process
from kvmpoison.mm.ksm import ksm_do_scan
from kvmpoison.mm.madvise import MADV_MERGEABLE
from kvmpoison.mm.memory_failure import memory_failure
from kvmpoison.mm.mm_types import VM
from kvmpoison.mm.mmap import MAP_FIXED, MAP_PRIVATE, MAP_SHARED
from kvmpoison.mm.mremap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE
from kvmpoison.mm.page import PageKsm
from kvmpoison.virt.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    kvm_gmem_init,
)

MOVE = MREMAP_MAYMOVE


def shared_memfd(p: Process, pages: int = 1) -> tuple[int, int]:
    fd = ok(p.memfd_create("m"))
    ok(p.ftruncate(fd, pages * PAGE))
    return fd, ok(p.mmap(0, pages * PAGE, RW, MAP_SHARED, fd))


def test_dontunmap_moves_without_fixed_and_leaves_an_empty_vma() -> None:
    p = proc(boot())
    addr = anon(p, 1, fill=4)
    new = ok(p.mremap(addr, PAGE, PAGE, MOVE | MREMAP_DONTUNMAP))
    assert new != addr and p.load(new, 1).data == b"\x04"
    assert p.load(addr, 1).data == b"\x00"  # the old VMA stays, its pages moved away
    assert p.mremap(addr, PAGE, 2 * PAGE, MOVE | MREMAP_DONTUNMAP).cell == "err:EINVAL"
    assert p.mremap(addr, PAGE, PAGE, MREMAP_DONTUNMAP).cell == "err:EINVAL"


@pytest.mark.parametrize(("kcfg", "cell"), [(RFC_BASE, "err:EINVAL"), (THIS_MACHINE, "ok")])
def test_dontunmap_of_a_shared_mapping_from_5_13(kcfg: KernelConfig, cell: str) -> None:
    p = proc(boot(kcfg))
    _, addr = shared_memfd(p)
    out = p.mremap(addr, PAGE, PAGE, MOVE | MREMAP_DONTUNMAP)
    assert out.cell == cell or (cell == "ok" and out.succeeded)


def test_old_len_zero_duplicates_a_shared_mapping_only() -> None:
    p = proc(boot())
    _, addr = shared_memfd(p)
    ok(p.store(addr, b"d"))
    dup = ok(p.mremap(addr, 0, PAGE, MOVE))
    assert dup != addr and p.load(dup, 1).data == b"d" and p.load(addr, 1).data == b"d"
    priv = anon(p, 1, fill=1)
    assert p.mremap(priv, 0, PAGE, MOVE).cell == "err:EINVAL"


def test_growing_a_dontexpand_mapping_is_efault() -> None:
    k = boot(THIS_MACHINE)
    kvm_gmem_init(k)
    p = proc(k)
    fd = ok(p.guest_memfd(object(), 2 * PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    assert p.mremap(addr, PAGE, 2 * PAGE, MOVE).cell == "err:EFAULT"


def test_shrinking_never_looks_at_the_vma() -> None:
    p = proc(boot())
    assert ok(p.mremap(0x6000_0000, 2 * PAGE, PAGE, 0)) == 0x6000_0000


def test_fixed_unmaps_the_target_before_checking_the_source() -> None:
    p = proc(boot())
    target = ok(p.mmap(0x7000_0000, PAGE, RW, ANON | MAP_FIXED))
    assert p.mremap(0x6000_0000, PAGE, PAGE, MOVE | MREMAP_FIXED, target).cell == "err:EFAULT"
    assert p.load(target, 1).cell == "sig:SIGSEGV:SEGV_MAPERR"


def test_growing_a_locked_mapping_populates_the_new_part() -> None:
    p = proc(boot())
    addr = anon(p, 1, fill=1)
    ok(p.mlock(addr, PAGE))
    assert ok(p.mremap(addr, PAGE, 2 * PAGE, 0)) == addr
    assert p.mm.pgd.get(addr + PAGE) != 0 and p.mm.locked_vm == 2


def merged_pair() -> tuple[Process, int, int]:
    p = proc(boot())
    a, b = anon(p, 1, fill=9), anon(p, 1, fill=9)
    for addr in (a, b):
        ok(p.madvise(addr, PAGE, MADV_MERGEABLE))
    assert ksm_do_scan(p.kernel.core) == 1
    assert pte_pfn(p.mm.pgd.get(a)) == pte_pfn(p.mm.pgd.get(b))
    return p, a, b


def test_mremap_breaks_ksm_pages_of_the_moved_range() -> None:
    p, a, _ = merged_pair()
    new = ok(p.mremap(a, PAGE, PAGE, MOVE | MREMAP_FIXED, 0x7100_0000))
    core = p.kernel.core
    assert not PageKsm(core.pages[pte_pfn(p.mm.pgd.get(new))])
    assert p.load(new, 1).data == b"\x09"


def test_memory_failure_refuses_a_ksm_page() -> None:
    p, a, _ = merged_pair()
    pfn = pte_pfn(p.mm.pgd.get(a))
    assert memory_failure(p.kernel.core, pfn, 0) == -errno.EBUSY  # "unmapping failed"
    assert pte_pfn(p.mm.pgd.get(a)) == pfn and p.task.pending == []


def test_madv_mergeable_accepts_a_private_file_mapping() -> None:
    p = proc(boot())
    fd, _ = shared_memfd(p)
    addr = ok(p.mmap(0, PAGE, RW, MAP_PRIVATE, fd))
    ok(p.madvise(addr, PAGE, MADV_MERGEABLE))
    (vma,) = [v for v in p.mm.vmas if v.vm_start == addr]
    assert vma.vm_flags & VM.MERGEABLE
