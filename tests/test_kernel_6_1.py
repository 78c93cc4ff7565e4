"""Kernel 6.1 in the model: its swap type numbers, its madvise set, its zap rules and hwpoison.

Facts from Debian's linux-source-6.1 (6.1.192): include/linux/swap.h,
mm/madvise.c, mm/memory.c (zap_pte_range, should_zap_cows), mm/shmem.c,
mm/memory-failure.c (unpoison_memory). The cells are what the real 6.1
kernel gave under ``kvmpoison oracle --kernel debian-6.1``.
"""

from __future__ import annotations

import pytest

from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.matrix.model import SetupError, run_cell
from kvmpoison.mm.swapops import SwapTypes

DEBIAN_6_1 = KernelConfig(version=KernelVersion.V6_1, memory_failure=True, migration=True,
                          device_private=False, mem_soft_dirty=True, x86_5level=True)


def test_a_debian_release_string_is_6_1() -> None:
    assert KernelVersion.parse("6.1.0-57-amd64") is KernelVersion.V6_1
    assert KernelVersion.V5_12 < KernelVersion.V6_1 < KernelVersion.V6_18


def test_swap_types_of_debian_6_1() -> None:
    """No DEVICE_PRIVATE: 32 - 3 migration - 1 hwpoison - 1 marker - 1 swapin error = 26."""
    t = SwapTypes.for_config(DEBIAN_6_1)
    assert (t.max_swapfiles, t.hwpoison) == (26, 26)
    assert (t.migration_read, t.migration_read_exclusive, t.migration_write) == (27, 28, 29)
    assert (t.pte_marker, t.swapin_error) == (30, 31)
    assert t.device_write is None and t.device_exclusive is None
    assert t.name_of(31) == "SWP_SWAPIN_ERROR"


def test_swap_types_of_6_1_with_device_private() -> None:
    """v6.1 has four device types, the exclusive ones split into WRITE and READ."""
    t = SwapTypes.for_config(KernelConfig(version=KernelVersion.V6_1))
    assert (t.max_swapfiles, t.device_write, t.device_read) == (22, 26, 27)
    assert t.name_of(28) == "SWP_DEVICE_EXCLUSIVE_WRITE"
    assert t.name_of(29) == "SWP_DEVICE_EXCLUSIVE_READ"
    assert (t.pte_marker, t.swapin_error) == (30, 31)
    assert SwapTypes.for_config(KernelConfig(version=KernelVersion.V6_18)).swapin_error is None


@pytest.mark.parametrize("backing", ["anon_prot_none", "file_beyond_eof", "hwpoison_anon"])
def test_6_1_writes_a_straddling_buffer_short(backing: str) -> None:
    """generic_perform_write (mm/filemap.c, v6.1.192) fails a chunk only when
    ``fault_in_iov_iter_readable(i, bytes) == bytes``: the 16 readable bytes are
    written (the live 6.1 guest returns 16); v5.12 faulted the whole chunk in first."""
    assert run_cell(DEBIAN_6_1, "pwrite_buf_to_file_straddle", backing).cell == "ret:16"


def test_debian_6_1_secretmem_vmas_are_not_vm_locked() -> None:
    """Debian's 6.1.192 secretmem_mmap sets VM_DONTDUMP only (the pages are charged to the
    locked limit per folio instead): MADV_DONTNEED is allowed (madvise_dontneed_free_valid_vma
    forbids VM_LOCKED), as the live guest shows; 6.18 keeps VM_LOCKED and refuses it."""
    assert run_cell(DEBIAN_6_1, "dontneed_load", "memfd_secret").cell == "ok"
    assert run_cell(DEBIAN_6_1, "mlock", "memfd_secret").cell == "err:ENOMEM"
    v6_18 = KernelConfig(version=KernelVersion.V6_18, memory_failure=False)
    assert run_cell(v6_18, "dontneed_load", "memfd_secret").cell == "err:EINVAL"


def test_the_pagemap_cell_follows_the_build() -> None:
    """With DEVICE_PRIVATE, 6.1's four device types move SWP_HWPOISON down to 22."""
    with_device = KernelConfig(version=KernelVersion.V6_1, device_private=True)
    assert run_cell(with_device, "pagemap", "hwpoison_anon").cell == \
        "pagemap:swap:type=22:offset=pfn"


def test_6_1_has_populate_but_neither_guard_pages_nor_uffdio_poison() -> None:
    assert DEBIAN_6_1.has_madv_populate and DEBIAN_6_1.has_pte_markers
    assert not DEBIAN_6_1.has_guard_pages and not DEBIAN_6_1.has_uffdio_poison
    assert run_cell(DEBIAN_6_1, "populate_read", "anon").cell == "ret:0"


@pytest.mark.parametrize(("path", "backing", "cell"), [
    # force_sig_mceerr(BUS_MCEERR_AR, the faulting address, PAGE_SHIFT)
    ("load_siginfo", "hwpoison_shmem", "sig:SIGBUS:BUS_MCEERR_AR:addr=T+0x0:lsb=12"),
    ("load_siginfo", "file_beyond_eof", "sig:SIGBUS:BUS_ADRERR:addr=T+0x0"),
    # pagemap shows the entry's swap type: SWP_HWPOISON is 26 in Debian's 6.1 (the live
    # guest says 26 too), and the offset is the poisoned pfn.
    ("pagemap", "hwpoison_anon", "pagemap:swap:type=26:offset=pfn"),
    ("pagemap", "hwpoison_shmem", "pagemap:swap:type=26:offset=pfn"),
    ("pagemap", "file_beyond_eof", "pagemap:none"),
    # a second MADV_HWPOISON: GUP faults on the entry, VM_FAULT_HWPOISON without
    # FOLL_HWPOISON is -EFAULT (vm_fault_to_errno)
    ("hwpoison_again", "hwpoison_anon", "err:EFAULT"),
    # zap_pte_range with details->even_cows false (shmem_fallocate's hole punch) keeps the
    # hwpoison entry: the next load still gets BUS_MCEERR_AR, not a fresh zero page.
    ("punch_hole_load", "hwpoison_shmem", "sig:SIGBUS:BUS_MCEERR_AR"),
    # truncation zaps with even_cows: the entry goes and T lies beyond EOF.
    ("truncate_load", "hwpoison_shmem", "sig:SIGBUS:BUS_ADRERR"),
    # a regular file's hole punch (truncate_pagecache_range) zaps with even_cows false too
    ("punch_hole_load", "hwpoison_file", "sig:SIGBUS:BUS_MCEERR_AR"),
    ("truncate_load", "hwpoison_file", "sig:SIGBUS:BUS_ADRERR"),
    # the dirty page left the page cache (generic_error_remove_page): pread reads the disk
    ("file_pread", "hwpoison_file", "ret:8"),
    # fork does not copy a shared file mapping's PTEs: the child refaults from the file
    ("fork_child_load", "hwpoison_file", "ok"),
    # MADV_DONTNEED zaps without details; shmem keeps the poisoned page in its page cache
    # (shmem_error_remove_page), so the refault finds it poisoned; anon refaults a zero page.
    ("dontneed_load", "hwpoison_shmem", "sig:SIGBUS:BUS_MCEERR_AR"),
    ("dontneed_load", "hwpoison_anon", "ok"),
    ("fork_child_load", "hwpoison_anon", "sig:SIGBUS:BUS_MCEERR_AR"),
    ("file_pread", "hwpoison_shmem", "err:EIO"),
    # unpoison_memory: an anon page is free once unmapped; a shmem page has a mapping.
    ("unpoison", "hwpoison_anon", "ret:0"),
    ("unpoison", "hwpoison_shmem", "err:EBUSY"),
    ("unpoison_load", "hwpoison_anon", "sig:SIGBUS:BUS_MCEERR_AR"),
    ("mincore", "hwpoison_anon", "vec:1"),
    ("populate_read", "hwpoison_shmem", "err:EHWPOISON"),
])
def test_hwpoison_cells_of_6_1(path: str, backing: str, cell: str) -> None:
    assert run_cell(DEBIAN_6_1, path, backing).cell == cell


def test_the_matrix_command_models_6_1_with_the_hwpoison_columns(
        capsys: pytest.CaptureFixture[str]) -> None:
    from kvmpoison.cli.main import main

    assert main(["matrix", "--kernel", "6.1", "--memory-failure", "--backings",
                 "hwpoison_shmem", "--paths", "load", "--format", "md"]) == 0
    assert "`sig:SIGBUS:BUS_MCEERR_AR`" in capsys.readouterr().out
    assert main(["matrix", "--kernel", "6.1", "--backings", "hwpoison_anon"]) == 2
    assert "need --memory-failure" in capsys.readouterr().err


@pytest.mark.parametrize(("backing", "step"), [("uffd_poison", "UFFDIO_POISON"),
                                               ("madv_guard", "MADV_GUARD_INSTALL")])
def test_6_1_refuses_what_came_later_with_einval(backing: str, step: str) -> None:
    """Seen live in the 6.1 guest: both set-up steps fail with EINVAL."""
    with pytest.raises(SetupError, match=f"{step}.*EINVAL"):
        run_cell(DEBIAN_6_1, "load", backing)


def test_the_pagemap_swap_type_follows_the_build() -> None:
    """6.18 has no SWP_SWAPIN_ERROR type: its SWP_HWPOISON is one higher than 6.1's."""
    # (The 6.18 matrix cell itself cannot be built: 6.5+ MADV_HWPOISON passes
    # MF_ACTION_REQUIRED, so the target that poisons T is killed during the set-up.)
    v6_18 = KernelConfig(version=KernelVersion.V6_18, device_private=False)
    v6_1 = KernelConfig(version=KernelVersion.V6_1, device_private=False)
    assert SwapTypes.for_config(v6_18).hwpoison == 27
    assert SwapTypes.for_config(v6_1).hwpoison == 26
