"""The THP columns of the access matrix (issue 12): protocol, the model's set-up, live probes.

The live probes run in a child on this machine's kernel (``backends/kvm/thp.py``); they
are marked ``kvm`` like the oracle's. The model's THP counters sit behind one seam in
``matrix/model.py``; until the model's mm maps THPs its set-up check says so, and the
tests hold the check to the counters either way.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from kvmpoison.backends.kvm import thp
from kvmpoison.backends.kvm.libc import MAP_ANONYMOUS, MAP_PRIVATE, libc, mmap
from kvmpoison.backends.kvm.probes import run_probe
from kvmpoison.kconfig import THIS_MACHINE
from kvmpoison.matrix import real_6_18
from kvmpoison.matrix.model import (
    _setup,
    model_thp_check,
    run_cell,
    smaps_counters,
    smaps_rollup_anon_huge,
    smaps_rss,
    smaps_shmem_pmd_mapped,
)
from kvmpoison.matrix.protocol import (
    HPAGE_PMD_SIZE,
    NOT_REFEREED,
    PATHS,
    REMOTE_PATHS,
    THP_BACKINGS,
    THP_PATHS,
    child_cell,
    smaps_cell,
    thp_mode,
    vec_runs_cell,
)
from kvmpoison.mm.huge_memory import ThpSettings

HUGE = smaps_cell(2048, 2048, 0)


def _host_mode(name: str) -> str:
    try:
        with open(f"{thp.THP_SYSFS}/{name}") as fh:
            return thp_mode(fh.read())
    except OSError:
        return "absent"


def _live(path: str, backing: str = "anon_thp") -> str:
    if _host_mode("enabled") in ("never", "absent"):
        pytest.skip(f"THP is {_host_mode('enabled')} on this host")
    got = run_probe(path, backing, REMOTE_PATHS)
    assert got.cell not in ("error", NOT_REFEREED), got.detail
    return got.cell


# -- the notation ------------------------------------------------------------------------------


def test_cells_of_the_thp_probes_are_written_one_way() -> None:
    assert smaps_cell(2044, 0, 0) == "smaps:Rss=2044:AnonHugePages=0:ShmemPmdMapped=0"
    assert vec_runs_cell(bytes([1]) * 512) == "vec:1*512"
    assert vec_runs_cell(bytes([1] * 256 + [0] + [1] * 255)) == "vec:1*256,0*1,1*255"
    assert vec_runs_cell(bytes([0x81, 0x80])) == "vec:1*1,0*1"  # bit 0 only
    assert child_cell("ok", HUGE) == "ok;" + HUGE
    assert thp_mode("always [madvise] never\n") == "madvise"
    with pytest.raises(ValueError, match="not a THP sysfs mode line"):
        thp_mode("madvise")


def test_thp_paths_are_new_ids() -> None:
    assert len(THP_PATHS) == len(set(THP_PATHS)) == 9
    assert not set(THP_PATHS) & set(PATHS)
    assert set(THP_BACKINGS) == {"anon_thp", "shmem_thp"}


# -- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", THP_BACKINGS)
def test_model_set_up_is_aligned_and_its_check_agrees_with_its_counters(backing: str) -> None:
    probe = _setup(THIS_MACHINE, backing)
    t, mm = probe.t, probe.target.mm
    assert t % HPAGE_PMD_SIZE == 0
    assert probe.target.load(t - 4096, 1).data == bytes([0x11])  # page 0 right below T
    field = smaps_shmem_pmd_mapped if backing == "shmem_thp" else smaps_rollup_anon_huge
    huge = field(mm, t, t + HPAGE_PMD_SIZE)
    # The check is honest: it passes exactly when the counter says one PMD maps the region.
    assert (probe.thp_check == "") == (huge == 2048)
    assert probe.thp_check == model_thp_check(THIS_MACHINE, backing)
    if probe.thp_check:
        assert "not PMD-mapped" in probe.thp_check and backing in probe.thp_check
        assert smaps_rss(mm, t, t + HPAGE_PMD_SIZE) == 4  # the one 4 KiB page touched


def test_model_set_up_is_pmd_mapped_with_the_referees_modes() -> None:
    """The model's set-up maps one THP by PMD, as the live one must: anon_thp with this
    machine's modes, shmem_thp once shmem_enabled=advise (the 6.1 guest's setting)."""
    probe = _setup(THIS_MACHINE, "anon_thp")
    assert probe.thp_check == ""
    assert smaps_counters(probe.target.mm, probe.t) == "smaps:Rss=2048:AnonHugePages=2048:" \
        "ShmemPmdMapped=0"
    never = _setup(THIS_MACHINE, "shmem_thp", ThpSettings(shmem_enabled="never"))
    assert "not PMD-mapped" in never.thp_check
    advise = _setup(THIS_MACHINE, "shmem_thp", ThpSettings(shmem_enabled="advise"))
    assert advise.thp_check == ""
    assert smaps_counters(advise.target.mm, advise.t) == "smaps:Rss=2048:AnonHugePages=0:" \
        "ShmemPmdMapped=2048"


def test_model_runs_every_path_on_the_thp_columns_as_on_anon() -> None:
    """Live, both THP columns give anon's cells on all 32 paths (6.18 here, 6.1 in the VM)."""
    for path in PATHS:
        for backing in THP_BACKINGS:
            assert run_cell(THIS_MACHINE, path, backing).cell == real_6_18.cell(path, "anon"), \
                (path, backing)


def test_model_thp_probe_on_another_backing_is_refused() -> None:
    with pytest.raises(ValueError, match="probes a THP"):
        run_cell(THIS_MACHINE, "thp_smaps", "anon")
    with pytest.raises(ValueError, match="not a THP backing"):
        model_thp_check(THIS_MACHINE, "anon")


# -- live: the kernel's view, read only --------------------------------------------------------


def test_smaps_region_counts_the_region_only() -> None:
    addr = mmap(None, 3 * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        libc.madvise(addr, 3 * 4096, 15)  # MADV_NOHUGEPAGE: 4 KiB pages
        ctypes.memset(addr + 4096, 1, 4096)
        got = thp.smaps_region("self", addr, addr + 3 * 4096)
        assert got == {"Rss": 4, "AnonHugePages": 0, "ShmemPmdMapped": 0}
    finally:
        libc.munmap(addr, 3 * 4096)


def test_a_region_without_a_huge_page_is_not_refereed_with_the_reason() -> None:
    size = 2 * HPAGE_PMD_SIZE
    addr = mmap(None, size, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        t = (addr + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        libc.madvise(addr, size, 15)  # MADV_NOHUGEPAGE
        ctypes.memset(t, 1, 4096)
        with pytest.raises(thp.ThpNotMapped, match=r"not PMD-mapped .*AnonHugePages=0 kB.*"
                                                    r"enabled=\["):
            thp.check_pmd_mapped("anon_thp", t)
    finally:
        libc.munmap(addr, size)
    with pytest.raises(ValueError, match="unknown THP backing"):
        thp.setup("hugetlb", [])


@pytest.mark.kvm
def test_live_set_up_is_one_pmd_mapped_thp() -> None:
    assert _live("thp_smaps") == HUGE
    assert _live("thp_mincore") == "vec:1*512"
    assert _live("load") == "ok" and _live("process_vm_readv") == "ret:8"


@pytest.mark.kvm
def test_live_one_page_mprotect_or_dontneed_splits_the_pmd() -> None:
    assert _live("thp_mprotect_one") == smaps_cell(2048, 0, 0)  # split to 512 PTEs
    assert _live("thp_dontneed_one") == smaps_cell(2044, 0, 0)  # split, one PTE zapped
    assert _live("thp_munmap_one") == smaps_cell(2044, 0, 0)
    assert _live("thp_mincore_after_dontneed") == "vec:1*256,0*1,1*255"


@pytest.mark.kvm
def test_live_fork_copies_the_pmd_and_a_child_store_splits_only_the_childs() -> None:
    assert _live("thp_fork_child_load") == child_cell("ok", HUGE)  # copy_huge_pmd
    assert _live("thp_fork_child_store") == child_cell("ok", smaps_cell(2048, 0, 0))
    assert _live("thp_fork_parent_after_child_store") == HUGE


@pytest.mark.kvm
def test_live_shmem_thp_follows_the_hosts_shmem_enabled() -> None:
    mode = _host_mode("shmem_enabled")
    got = run_probe("thp_smaps", "shmem_thp", REMOTE_PATHS)
    if mode in ("never", "deny", "absent"):
        assert got.cell == NOT_REFEREED
        assert f"shmem_enabled=[{mode}]" in got.detail and "ShmemPmdMapped=0 kB" in got.detail
    else:
        assert got.cell == smaps_cell(2048, 0, 2048), got.detail
    assert os.path.exists(f"{thp.THP_SYSFS}/shmem_enabled") == (mode != "absent")


def test_matrix_cli_runs_the_thp_columns_on_the_model(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    import json

    from kvmpoison.cli.main import main

    rc = main(["matrix", "--backings", "anon_thp", "--paths", "thp_mincore,load",
               "--format", "json"])
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert rc == 0 and cells["load"]["anon_thp"] == "ok"
    assert cells["thp_mincore"]["anon_thp"].startswith("vec:1*")
    assert main(["matrix", "--paths", "thp_smaps"]) == 2  # the default columns are not THP
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probes a transparent huge page" in err[0]


def test_legend_names_the_thp_cells_and_a_fork_cells_parts() -> None:
    from kvmpoison.report.table import legend

    text = legend([child_cell("ok", HUGE), "vec:1*512"])
    assert "smaps:... = the THP region's smaps counters" in text
    assert "ok = the access succeeded" in text and "runs of N pages" in text
    assert "see docs/" not in text


def test_the_shmem_thp_switch_is_written_only_inside_the_vm_guest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmpoison.backends.vmkernel import guest

    written: list[str] = []

    def no_write(path: str, mode: str = "r", *args: object, **kw: object) -> object:
        if "w" in mode:
            written.append(path)
        raise OSError(2, "not opened in this test")

    monkeypatch.setenv("KVMPOISON_IN_VM_GUEST", "1")  # the host's cmdline still says: not it
    monkeypatch.setattr("builtins.open", no_write)
    with pytest.raises(PermissionError, match="only inside the kvmpoison VM guest"):
        guest.shmem_thp_advise()
    assert written == []


def test_the_6_1_referee_probes_both_thp_columns() -> None:
    from kvmpoison.report.vm_oracle import vm_cells

    cells = vm_cells()
    for backing in THP_BACKINGS:
        assert [p for p, b in cells if b == backing] == list(PATHS + THP_PATHS)
