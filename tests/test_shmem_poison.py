"""A PG_hwpoison page left in a shmem file's cache, per kernel version.

v5.12: ``shmem_getpage_gfp`` has no poison check (memory_failure truncates
the page instead). RFC v2 patch 09 adds one that fails every caller with
-EIO. 6.18: ``shmem_get_folio_gfp`` has none either; a fault gets
VM_FAULT_HWPOISON from ``__do_fault``, read_iter and write_begin give -EIO,
fallocate succeeds.
"""

from __future__ import annotations

import pytest

from helpers import PAGE, RW, anon, boot, ok, proc
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.kernel.process import Process
from kvmpoison.mm.mmap import MAP_SHARED
from kvmpoison.mm.page import PageHWPoison, TestSetPageHWPoison, page_count
from kvmpoison.mm.rmap import TTU, try_to_unmap

V6_18_MF = KernelConfig(version=KernelVersion.V6_18, memory_failure=True)


def poisoned_memfd(kcfg: KernelConfig, rfc_patch_09: bool = False) -> tuple[Process, int, int]:
    """A one-page memfd whose cached page is PG_hwpoison and unmapped (as the RFC leaves it)."""
    k = boot(kcfg)
    k.core.hooks.shmem_getpage_fails_poisoned = rfc_patch_09
    p = proc(k)
    fd = ok(p.memfd_create("guest"))
    ok(p.ftruncate(fd, PAGE))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    ok(p.store(addr, b"\x07" * 8))
    ok(p.munmap(addr, PAGE))
    pfn = p.task.fds[fd].f_mapping.lookup(0)  # type: ignore[union-attr]
    assert pfn is not None
    page = k.core.pages[pfn]
    assert not TestSetPageHWPoison(page)
    assert try_to_unmap(page, TTU.IGNORE_MLOCK)
    return p, fd, pfn


@pytest.mark.parametrize(("kcfg", "cell"), [
    (V6_18_MF, "sig:SIGBUS:BUS_MCEERR_AR"),  # do_sigbus with CONFIG_MEMORY_FAILURE
    (THIS_MACHINE, "sig:SIGBUS:BUS_ADRERR"),  # without it, VM_FAULT_HWPOISON is BUS_ADRERR
    (RFC_BASE, "sig:SIGBUS:BUS_MCEERR_AR"),  # v5.12 without patch 09: the same __do_fault check
])
def test_fault_on_poisoned_shmem_page_is_vm_fault_hwpoison(kcfg: KernelConfig, cell: str) -> None:
    p, fd, pfn = poisoned_memfd(kcfg)
    refs = page_count(p.kernel.core.pages[pfn])
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    assert p.load(addr, 8).cell == cell
    assert page_count(p.kernel.core.pages[pfn]) == refs  # __do_fault dropped ->fault's reference
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None and mapping.lookup(0) == pfn  # the page stays in the cache


def test_rfc_v2_patch_09_fails_the_fault_with_eio_as_sigbus() -> None:
    p, fd, _ = poisoned_memfd(RFC_BASE, rfc_patch_09=True)
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    assert p.load(addr, 8).cell == "sig:SIGBUS:BUS_ADRERR"  # vmf_error(-EIO) = VM_FAULT_SIGBUS


@pytest.mark.parametrize(("kcfg", "patch_09", "io", "falloc"), [
    (V6_18_MF, False, "err:EIO", "ret:0"),
    (THIS_MACHINE, False, "err:EIO", "ret:0"),
    (RFC_BASE, True, "err:EIO", "err:EIO"),
    (RFC_BASE, False, "ret:8", "ret:0"),
])
def test_shmem_io_and_fallocate_on_poisoned_page(kcfg: KernelConfig, patch_09: bool, io: str,
                                                 falloc: str) -> None:
    p, fd, pfn = poisoned_memfd(kcfg, rfc_patch_09=patch_09)
    buf = anon(p, 1, fill=0)
    assert p.pread(fd, buf, 8, 0).cell == io
    assert p.pwrite(fd, buf, 8, 0).cell == io
    assert p.fallocate(fd, 0, 0, 2 * PAGE).cell == falloc
    if falloc == "ret:0":
        assert p.task.fds[fd].f_inode.i_size == 2 * PAGE
    assert PageHWPoison(p.kernel.core.pages[pfn])


def test_memfd_create_flags_and_name_per_version() -> None:
    old, new = proc(boot(RFC_BASE)), proc(boot(THIS_MACHINE))
    assert old.memfd_create("x", 0x8).cell == "err:EINVAL"  # MFD_NOEXEC_SEAL is v6.3+
    assert new.memfd_create("x", 0x8).succeeded
    assert new.memfd_create("x", 0x18).cell == "err:EINVAL"  # EXEC and NOEXEC_SEAL
    assert new.memfd_create("n" * 249).succeeded
    assert new.memfd_create("n" * 250).cell == "err:EINVAL"
