"""The second referee, live: Debian's Linux 6.1 booted under QEMU agrees with the model.

One boot for the whole session (about a minute under TCG; the kernel and
initramfs come from the cache after the first run). The boot is opt-in
(KVMPOISON_VMKERNEL=1, which ``.ci/run`` sets) so the default test run stays
fast; without qemu, busybox-static, cpio or access to the package the tests
skip with the reason, never fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvmpoison.backends.vmkernel import qemu
from kvmpoison.backends.vmkernel.cache import KernelFiles
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.backends.vmkernel.session import prepare
from kvmpoison.cli.main import main
from kvmpoison.matrix.protocol import (
    HWPOISON_BACKINGS,
    NOT_REFEREED,
    PATHS,
    THP_BACKINGS,
    THP_PATHS,
    child_cell,
    smaps_cell,
)
from kvmpoison.report.vm_oracle import VM_BACKINGS, VmComparison, compare_vm

pytestmark = pytest.mark.vmkernel


@pytest.fixture(scope="session")
def referee() -> VmComparison:
    if os.environ.get("KVMPOISON_VMKERNEL") != "1":
        pytest.skip("set KVMPOISON_VMKERNEL=1 to boot Debian's 6.1 under QEMU (about a minute)")
    try:
        return compare_vm("debian-6.1", "auto")
    except VmKernelUnavailableError as exc:
        pytest.skip(f"the 6.1 VM cannot run here: {exc}")


@pytest.fixture(scope="session")
def library_live() -> dict[str, Any]:
    """``run --all --live --kernel debian-6.1 --format json``: one more boot (about 20 s)."""
    if os.environ.get("KVMPOISON_VMKERNEL") != "1":
        pytest.skip("set KVMPOISON_VMKERNEL=1 to boot Debian's 6.1 under QEMU (about a minute)")
    if shutil.which(qemu.QEMU) is None:
        pytest.skip(f"the 6.1 VM cannot run here: no {qemu.QEMU}")
    try:
        prepare()
    except VmKernelUnavailableError as exc:
        pytest.skip(f"the 6.1 VM cannot run here: {exc}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", "--all", "--live", "--kernel", "debian-6.1", "--format", "json"])
    doc: dict[str, Any] = json.loads(out.getvalue())
    doc["rc"] = rc
    return doc


def test_the_library_agrees_with_the_model_in_the_6_1_guest(library_live: dict[str, Any]
                                                             ) -> None:
    assert library_live["disagreements"] == 0
    assert library_live["refereed"] > 0 and library_live["rc"] == 0
    assert library_live["against"].startswith("6.1.")


def test_hwpoison_steps_are_refereed_in_the_guest_and_kvm_steps_are_not(
        library_live: dict[str, Any]) -> None:
    steps = [s for r in library_live["live"] for s in r["steps"]]
    agreed = {s["op"] for s in steps if s["verdict"] == "agree"}
    assert {"memory_failure", "unpoison"} <= agreed
    assert any(s["op"] == "madvise" and s["verdict"] == "agree" and s["model"] == "ret:0"
               for r in library_live["live"] if r["scenario"] == "e14-real-mce-before-protection"
               for s in r["steps"])
    assert all(s["verdict"] == "not refereed" for s in steps if s["actor"].startswith("guest"))
    punch = next(r for r in library_live["live"] if r["scenario"] == "hwpoison-dirty-file-punch")
    assert [(s["op"], s["live"], s["verdict"]) for s in punch["steps"]][2:5] == [
        ("memory_failure", "ret:0", "agree"), ("punch_hole", "err:EIO", "agree"),
        ("punch_hole", "ret:0", "agree")]


def test_every_cell_agrees_with_the_model(referee: VmComparison) -> None:
    # Every cell agrees, the THP columns included: the model runs them with the guest's
    # own THP modes (its runner set shmem_enabled=advise and reports them).
    assert referee.disagreements == [], referee.notes
    assert {b for _, b, _, _ in referee.cells} >= set(THP_BACKINGS)
    assert referee.kcfg.memory_failure and referee.kcfg.version.value == "6.1"
    assert referee.kernel.startswith("6.1.")


def test_every_path_was_refereed_on_every_backing(referee: VmComparison) -> None:
    seen = {(p, b) for p, b, _, _ in referee.cells}
    assert {(p, b) for p in PATHS for b in VM_BACKINGS} <= seen


def test_the_real_kernel_shows_the_seeds_hwpoison_semantics(referee: VmComparison) -> None:
    live = {(p, b): cell for p, b, cell, _ in referee.cells}
    for backing in HWPOISON_BACKINGS:
        assert live[("load", backing)] == "sig:SIGBUS:BUS_MCEERR_AR"
        assert live[("load_siginfo", backing)] == "sig:SIGBUS:BUS_MCEERR_AR:addr=T+0x0:lsb=12"
        assert live[("process_vm_readv", backing)] == "err:EFAULT"
        assert live[("populate_read", backing)] == "err:EHWPOISON"
        assert live[("pagemap", backing)] == "pagemap:swap:type=26:offset=pfn"
    for backing in ("hwpoison_anon", "hwpoison_shmem"):  # a shared file mapping is not copied
        assert live[("fork_child_load", backing)] == "sig:SIGBUS:BUS_MCEERR_AR"
    assert live[("fork_child_load", "hwpoison_file")] == "ok"
    assert live[("punch_hole_load", "hwpoison_file")] == "sig:SIGBUS:BUS_MCEERR_AR"
    assert live[("file_pread", "hwpoison_shmem")] == "err:EIO"
    assert live[("punch_hole_load", "hwpoison_shmem")] == "sig:SIGBUS:BUS_MCEERR_AR"


def test_both_thp_columns_are_refereed_by_the_6_1_guest(referee: VmComparison) -> None:
    """The guest's runner sets ITS shmem_enabled to advise: shmem_thp runs there too."""
    assert referee.not_refereed == []
    assert any(n.startswith("the guest's shmem_enabled: advise") for n in referee.notes)
    live = {(p, b): cell for p, b, cell, _ in referee.cells}
    assert NOT_REFEREED not in live.values()
    assert {(p, b) for p in PATHS + THP_PATHS for b in THP_BACKINGS} <= set(live)
    assert live[("thp_smaps", "anon_thp")] == smaps_cell(2048, 2048, 0)
    assert live[("thp_smaps", "shmem_thp")] == smaps_cell(2048, 0, 2048)
    # One page's mprotect splits an anonymous PMD into 512 PTEs; a shmem PMD is only
    # zapped (__split_huge_pmd_locked of a file VMA), so nothing stays mapped.
    assert live[("thp_mprotect_one", "anon_thp")] == smaps_cell(2048, 0, 0)
    assert live[("thp_mprotect_one", "shmem_thp")] == smaps_cell(0, 0, 0)
    assert live[("thp_mincore_after_dontneed", "anon_thp")] == "vec:1*256,0*1,1*255"
    assert live[("thp_mincore_after_dontneed", "shmem_thp")] == "vec:1*512"  # page cache
    assert live[("thp_fork_child_store", "anon_thp")] == child_cell("ok", smaps_cell(2048, 0, 0))
    assert live[("thp_fork_child_load", "shmem_thp")] == child_cell("ok",
                                                                   smaps_cell(2048, 0, 2048))
    for backing in THP_BACKINGS:  # every matrix path sees the same as on a 4 KiB anon page
        assert all(live[(p, backing)] == live[(p, "anon")] for p in PATHS), backing


def test_missing_qemu_is_reported_with_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VmKernelUnavailableError, match="apt-get install qemu-system-x86"):
        qemu.boot(KernelFiles(tmp_path), {"kvmpoison.job": "/x"})
