"""Bad input, odd files and odd hosts: one line and exit 2, never a traceback or a hang."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

from kvmpoison.backends.kvm import host
from kvmpoison.backends.kvm.probes import LOCAL_KVM_BACKINGS
from kvmpoison.cli import main as cli_main
from kvmpoison.cli.main import main
from kvmpoison.kconfig import host_kernel_config
from kvmpoison.matrix import protocol
from kvmpoison.report import oracle as report_oracle
from kvmpoison.scenario import library
from kvmpoison.scenario.loader import SCENARIO_MAX_BYTES, load_text
from kvmpoison.scenario.ops import ACCESS_MAX
from kvmpoison.scenario.runner import build_machine, run_scenario


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, out: str, err: str) -> str:
    """Exit 2 with exactly one line on stderr, no traceback anywhere: that line."""
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("kvmpoison: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


LOAD_STEP = '[[step]]\nactor = "guest:vm0"\nop = "load"\ngpa = 0\n'


def scenario_file(tmp_path: Path, text: str, name: str = "s.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- machine and VM sizes ------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "limit"), [(8192, "1M"), (1_000_000_000_000, "16G"),
                                               ('"64G"', "16G")])
def test_machine_memory_out_of_range_is_refused_naming_the_limit(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, memory: object, limit: str) -> None:
    path = scenario_file(tmp_path, f"[machine]\nmemory = {memory}\n{LOAD_STEP}")
    line = one_error_line(*cli(capsys, "run", path))
    assert "machine.memory" in line and limit in line


@pytest.mark.timeout(30, method="thread")
def test_vm_memory_above_the_limit_is_refused(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    path = scenario_file(tmp_path, f'[[vm]]\nname = "vm0"\nmemory = "8G"\n{LOAD_STEP}')
    line = one_error_line(*cli(capsys, "run", path))
    assert "4G" in line


@pytest.mark.parametrize(("setting", "message"), [
    ("seed = 1e400", "seed must be an integer"), ("kvm_id_bits = 0", "from 1 to 63"),
    ("kvm_id_bits = -3", "from 1 to 63"), ('mac_bits = "28"', "mac_bits must be an integer"),
    ('seam_nr = "no"', "seam_nr must be true or false")])
def test_machine_settings_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      setting: str, message: str) -> None:
    path = scenario_file(tmp_path, f"[machine]\n{setting}\n{LOAD_STEP}")
    assert message in one_error_line(*cli(capsys, "run", path))


def test_smallest_machine_still_runs() -> None:
    sc = load_text(f'[machine]\nmemory = "1M"\n{LOAD_STEP}', "small.toml")
    assert run_scenario(sc, "rfc-v2").results[0].outcome.cell == "ok"


# -- scenario files that are not files -----------------------------------------------------


def test_very_long_file_name_is_one_line(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    line = one_error_line(*cli(capsys, "run", str(tmp_path / ("a" * 5000 + ".toml"))))
    assert os.strerror(errno.ENAMETOOLONG) in line and len(line) < 300


def test_very_long_trace_name_is_one_short_line(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    trace = str(tmp_path / ("b" * 5000 + ".jsonl"))
    line = one_error_line(*cli(capsys, "run", "seed-1-integrity-failure", "--trace", trace))
    assert os.strerror(errno.ENAMETOOLONG) in line and len(line) < 300


def test_deeply_nested_toml_is_one_line(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "x = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n")
    assert "nested too deeply" in one_error_line(*cli(capsys, "run", path))


@pytest.mark.timeout(20, method="thread")
def test_dev_zero_is_refused_without_reading_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert "not a regular file" in one_error_line(*cli(capsys, "run", "/dev/zero"))


@pytest.mark.timeout(20, method="thread")
def test_fifo_is_refused_without_blocking(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    assert "not a regular file" in one_error_line(*cli(capsys, "run", str(fifo)))


def test_oversized_file_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "# " + "x" * SCENARIO_MAX_BYTES + "\n" + LOAD_STEP)
    assert f"larger than {SCENARIO_MAX_BYTES} bytes" in one_error_line(*cli(capsys, "run", path))


# -- designs = ... ---------------------------------------------------------------------------


def test_designs_may_be_one_string(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = scenario_file(tmp_path, f'[scenario]\ndesigns = "rfc-v2"\n{LOAD_STEP}')
    rc, out, _ = cli(capsys, "run", path, "--format", "json")
    assert rc == 0 and [r["design"] for r in json.loads(out)] == ["rfc-v2"]


@pytest.mark.parametrize(("designs", "message"), [
    ("[]", "designs is empty"), ("[1]", "a design name or a list"),
    ('["rfc-v2", "rfc-v9"]', "unknown design 'rfc-v9'")])
def test_bad_designs_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 designs: str, message: str) -> None:
    path = scenario_file(tmp_path, f"[scenario]\ndesigns = {designs}\n{LOAD_STEP}")
    assert message in one_error_line(*cli(capsys, "run", path))


# -- step arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(("actor", "op", "extra", "size"), [
    ("guest:vm0", "load", "gpa = 0", -8), ("guest:vm0", "load", "gpa = 0", 0),
    ("guest:vm0", "load", "gpa = 0", ACCESS_MAX + 1), ("vmm:vm0", "load", "gpa = 0", -8),
    ("vmm:vm0", "fork_child_load", "gpa = 0", -1), ("host", "kvm_read", 'vm = "vm0"\ngpa = 0', -8),
    ("host", "kernel_read", 'vm = "vm0"\ngpa = 0', -8),
    ("vmm:vm0", "pagecache_read", "gpa = 0", -8), ("vmm:vm0", "mprotect", "gpa = 0\nprot = 1", -8),
    ("vmm:vm0", "madvise", 'gpa = 0\nadvice = "dontneed"', -8),
    ("vmm:vm0", "ftruncate", "", 1 << 63), ("vmm:vm0", "punch_hole", "gpa = 0", -(1 << 63) - 1)])
def test_bad_sizes_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, actor: str,
                                op: str, extra: str, size: int) -> None:
    touch = '[[step]]\nactor = "guest:vm0"\nop = "store"\ngpa = 0\ndata = "abc"\n'
    path = scenario_file(tmp_path, f'{touch}[[step]]\nactor = "{actor}"\nop = "{op}"\n{extra}\n'
                         f"size = {size}\n")
    line = one_error_line(*cli(capsys, "run", path))
    assert "step 2" in line and f"size {size}" in line


@pytest.mark.parametrize(("op", "extra"), [("ftruncate", ""), ("punch_hole", "gpa = 0\n")])
def test_negative_file_lengths_reach_the_call(op: str, extra: str) -> None:
    """ftruncate and fallocate take a signed loff_t: the kernel answers -EINVAL, not the loader."""
    sc = load_text(f'[[step]]\nactor = "vmm:vm0"\nop = "{op}"\n{extra}size = -8\n', "x.toml")
    assert run_scenario(sc, "baseline").results[0].outcome.cell == "err:EINVAL"


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("design", ["rfc-v1", "rfc-v2"])
def test_share_of_2_to_the_40_pages_is_bounded_by_guest_memory(design: str) -> None:
    text = f'[scenario]\ndesigns = "{design}"\n[[step]]\nactor = "guest:vm0"\nop = "share"\n' \
           "gfn = 0\nnpages = 0x10000000000\n"
    sc = load_text(text, "share.toml")
    run = run_scenario(sc, design)
    assert run.results[0].outcome.cell == "ret:0"
    m = build_machine(sc, design)  # the same guest: how many gfns it has
    guest_pages = sum(s.npages for s in m.instances["vm0"].vm.memslots)
    assert guest_pages == 1024


@pytest.mark.timeout(60, method="thread")
def test_share_of_everything_returns_and_kvm_records_the_whole_range() -> None:
    sc = load_text('[scenario]\ndesigns = "rfc-v2"\n' + LOAD_STEP, "x.toml")
    inst = build_machine(sc, "rfc-v2").instances["vm0"]
    assert inst.guest.share(0x300, 1 << 40) == 0
    assert (0x300, 0x300 + (1 << 40)) in inst.vm.shared_ranges  # KVM keeps what it was told


@pytest.mark.parametrize("field", ["npages = -1", "gfn = -5"])
def test_negative_share_arguments_are_refused(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, field: str) -> None:
    gfn = "" if field.startswith("gfn") else "gfn = 0\n"
    path = scenario_file(tmp_path, f'[[step]]\nactor = "guest:vm0"\nop = "share"\n{gfn}{field}\n')
    assert "unsigned 64-bit" in one_error_line(*cli(capsys, "run", path))


# -- pte encode --------------------------------------------------------------------------------


def test_hwpoison_pfn_that_does_not_fit_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*cli(capsys, "pte", "encode", "--hwpoison", "0x1000000000000000"))
    assert "40 bits" in line and "0xffffffffff" in line
    rc, out, _ = cli(capsys, "pte", "encode", "--hwpoison", "0xffffffffff", "--format", "json")
    assert rc == 0 and json.loads(out)["fields"]["hwpoison_pfn"] == "0xffffffffff"


def test_swap_offset_that_does_not_fit_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*cli(capsys, "pte", "encode", "--swap", "3", "0x400000000000000"))
    assert "50 offset bits" in line


# -- matrix --------------------------------------------------------------------------------------


def test_matrix_on_5_12_leaves_out_backings_it_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "matrix", "--kernel", "5.12", "--paths", "load", "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    text = json.dumps(doc)
    assert "uffd_poison" not in text and "madv_guard" not in text and "anon" in text
    assert "uffd_poison cannot be set up on kernel 5.12" in err


def test_matrix_on_5_12_refuses_a_named_backing_it_lacks(
        capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*cli(capsys, "matrix", "--kernel", "5.12", "--backings", "uffd_poison"))
    assert "UFFDIO_POISON" in line


@pytest.mark.parametrize(("args", "named"), [
    (["--states", "private"], "--states"),
    (["--designs", "rfc-v2", "--kernel", "5.12"], "--kernel"),
    (["--designs", "rfc-v2", "--backings", "anon"], "--backings"),
    (["--designs", "rfc-v2", "--memory-failure"], "--memory-failure"),
    (["--designs", "rfc-v2", "--no-memory-failure"], "--memory-failure")])
def test_matrix_options_that_do_not_apply_are_errors(capsys: pytest.CaptureFixture[str],
                                                     args: list[str], named: str) -> None:
    assert named in one_error_line(*cli(capsys, "matrix", *args))


def test_matrix_help_points_inside_the_repo(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "matrix", "--help")
    assert rc == 0 and "docs/matrix.md" in " ".join(out.split())
    assert "shared/" not in out and "MATRIX.md" not in out


# -- the command line itself -----------------------------------------------------------------------


def test_no_arguments_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*cli(capsys))
    assert "no command given" in line and "run" in line and "matrix" in line


def test_pte_without_a_subcommand_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert "decode, encode" in one_error_line(*cli(capsys, "pte"))


class _ClosedPipe(io.StringIO):
    """A stdout whose reader has gone: every write fails with EPIPE, like ``| head -1``."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def fileno(self) -> int:
        return self._fd


def test_reader_closing_the_pipe_exits_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr("sys.stdout", _ClosedPipe(fd))
    monkeypatch.setattr("sys.argv", ["kvmpoison", "run", "--list"])
    with pytest.raises(SystemExit) as exit_:
        cli_main.entry()
    os.close(fd)
    assert exit_.value.code == 0


def test_run_all_runs_the_shipped_library(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    two = dict(list(library.shipped().items())[:2])
    monkeypatch.setattr("kvmpoison.cli.run.shipped", lambda: two)
    rc, out, _ = cli(capsys, "run", "--all", "--format", "json")
    assert rc == 0 and {r["scenario"] for r in json.loads(out)} == set(two)
    assert "not both" in one_error_line(*cli(capsys, "run", "--all", *two))


# -- oracle ----------------------------------------------------------------------------------


def test_kvm_denied_is_not_called_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr("kvmpoison.backends.kvm.host.os.open", denied)
    problem = host.kvm_status()
    assert problem is not None and problem.startswith("denied")
    monkeypatch.setattr("kvmpoison.backends.kvm.host.os.open", lambda p, f: (_ for _ in ()).throw(
        FileNotFoundError(errno.ENOENT, "No such file or directory", p)))
    assert (host.kvm_status() or "").startswith("missing")


def _fake_probes(monkeypatch: pytest.MonkeyPatch, problem: str | None) -> None:
    """Everything agrees, fast; /dev/kvm as ``problem`` says."""
    class Live:
        cell = "ok"
        detail = ""
        thp_check = ""

    monkeypatch.setattr(report_oracle, "kvm_status", lambda: problem)
    monkeypatch.setattr(report_oracle, "run_probe", lambda *a: Live())
    monkeypatch.setattr(report_oracle, "run_cell", lambda *a: Live())


def test_oracle_with_denied_kvm_says_so_and_does_not_exit_0(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probes(monkeypatch, "denied (Permission denied)")
    rc, out, err = cli(capsys, "oracle")
    skipped = len(protocol.PATHS) * len(LOCAL_KVM_BACKINGS)
    assert rc == 3 and "/dev/kvm denied" in " ".join(out.split())
    assert f"{skipped} cells were not compared" in err and "denied" in err
    rc, out, _ = cli(capsys, "oracle", "--format", "json")
    doc = json.loads(out)
    assert rc == 3 and doc["skipped"] == skipped and doc["kvm_problem"].startswith("denied")


def test_oracle_with_every_cell_compared_exits_0(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probes(monkeypatch, None)
    rc, out, _ = cli(capsys, "oracle", "--format", "json")
    assert rc == 0 and json.loads(out)["skipped"] == 0


def test_oracle_unavailable_goes_to_stderr(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(_tick: object = None) -> None:
        raise report_oracle.OracleUnavailableError("the probes need Linux on x86-64")

    monkeypatch.setattr("kvmpoison.report.oracle.compare", unavailable)  # imported at run time
    rc, out, err = cli(capsys, "oracle", "--format", "json")
    assert out == "" and "oracle unavailable" in one_error_line(rc, out, err)


def test_oracle_config_never_forks_a_probe(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    def no_fork() -> int:
        raise AssertionError("probing the config must not fork a child to poison a page")

    monkeypatch.setattr(os, "fork", no_fork)
    sysctl = tmp_path / "vm" / "memory_failure_recovery"
    sysctl.parent.mkdir()
    kernel = host_kernel_config("6.18.1", [str(tmp_path / "none.gz")], sysctl=str(sysctl))
    assert kernel.config.memory_failure is False and kernel.source == str(sysctl)
    sysctl.write_text("1\n")
    kernel = host_kernel_config("6.18.1", [str(tmp_path / "none.gz")], sysctl=str(sysctl))
    assert kernel.config.memory_failure is True
    assert not any(a.startswith("CONFIG_MEMORY_FAILURE") for a in kernel.assumed)


def test_oracle_says_what_it_assumed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assumed = host_kernel_config("6.18.1", [], sysctl=str(tmp_path / "nosys" / "vm" / "x"))
    assert "CONFIG_MEMORY_FAILURE=y" in assumed.assumed
    monkeypatch.setattr(report_oracle, "host_kernel_config", lambda: assumed)
    _fake_probes(monkeypatch, None)
    notes = " ".join(report_oracle.compare().notes)
    assert "assumed CONFIG_MEMORY_FAILURE=y" in notes and "may disagree" in notes


def test_a_bug_of_the_model_is_one_line_and_exit_70(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("get_page on free Page(pfn=0x22)")

    monkeypatch.setattr("kvmpoison.cli.run.run_scenario", broken)
    monkeypatch.delenv("KVMPOISON_TRACEBACK", raising=False)
    rc, out, err = cli(capsys, "run", "seed-4-sigbus")
    lines = err.strip().splitlines()
    assert rc == 70 and len(lines) == 1 and "Traceback" not in out + err
    assert "internal error" in lines[0] and "get_page on free" in lines[0]
    monkeypatch.setenv("KVMPOISON_TRACEBACK", "1")
    with pytest.raises(AssertionError, match="get_page on free"):
        main(["run", "seed-4-sigbus"])
