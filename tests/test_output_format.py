"""Output fits 80 columns without cutting a cell; --format md is Markdown; bars only on a tty."""

import io
import re

import pytest
from rich.console import Console

from kvmpoison.cli.main import main
from kvmpoison.report.progress import progress
from kvmpoison.report.table import break_at, legend, render_md, render_rich

BOX = re.compile("[┃━┏┓┗┛┡┩│─]")
LONG = "sig:SIGBUS:BUS_MCEERR_AR"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def width(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


def test_break_at_splits_after_colons_only() -> None:
    assert break_at(LONG, 13) == "sig:SIGBUS:\nBUS_MCEERR_AR"
    assert break_at(LONG, 80) == LONG
    assert break_at("mce:td-fatal", 4) == "mce:\ntd-fatal"  # a token longer than width stays whole
    assert break_at("panic", 3) == "panic"


def _wide_grid() -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    rows = ["load", "pwrite_buf_to_file_straddle", "ptrace_peek"]
    cols = [f"{d}/{s}" for d in ("baseline", "rfc-v1", "rfc-v2")
            for s in ("shared", "private-untouched")]
    cells = [LONG, "err:EHWPOISON", "mce:td-fatal", "panic", "ok", "ret:4096"]
    grid = {(r, c): cells[(i + j) % len(cells)] for i, r in enumerate(rows)
            for j, c in enumerate(cols)}
    return rows, cols, grid


def test_wide_grid_fits_80_columns_and_keeps_every_cell_whole() -> None:
    rows, cols, grid = _wide_grid()
    buf = io.StringIO()
    render_rich("t", rows, cols, grid, Console(file=buf, width=80))
    out = buf.getvalue()
    assert width(out) <= 80 and "…" not in out
    # Each cell is whole once the ':'-breaks are joined back: SIGBUS: then BUS_MCEERR_AR below.
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "sig:SIGBUS:" in line and LONG not in line:
            col = line.index("sig:SIGBUS:")
            assert lines[i + 1][col:].startswith("BUS_MCEERR_AR")
    assert out.count("BUS_MCEERR_AR") == sum(v == LONG for v in grid.values())
    for c in cols:  # every column shows up, in some continuation table
        design, state = c.split("/")
        assert design in out and state in out
    assert "panic = the host kernel panicked" in out.replace("\n", " ")


def test_a_narrow_grid_is_one_table_with_cells_unbroken() -> None:
    buf = io.StringIO()
    render_rich("t", ["load"], ["memfd"], {("load", "memfd"): LONG}, Console(file=buf, width=80))
    assert LONG in buf.getvalue() and "(1/" not in buf.getvalue()


def test_legend_names_the_kinds_present() -> None:
    text = legend(["panic", "ok", "mce:td-fatal"])
    assert "panic = the host kernel panicked" in text and "td-fatal" in text
    assert "sig:" not in text and legend([]) == ""


def test_render_md_is_a_pipe_table() -> None:
    rows, cols, grid = _wide_grid()
    md = render_md("t", rows, cols, grid)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[1] == "|" + "---|" * (len(cols) + 1)
    assert all(line.count(" | ") == len(cols) for line in table if line != table[1])
    assert f"`{LONG}`" in md and not BOX.search(md) and "Cells:" in md


@pytest.mark.parametrize("args", [
    ["matrix", "--format", "md", "--paths", "load,mlock"],
    ["matrix", "--designs", "rfc-v2", "--paths", "load", "--format", "md"],
    ["run", "e30-kvm-emulated-access", "--format", "md"],
    ["pte", "decode", "0x8000000000017027", "--format", "md"],
    ["demo", "--design", "rfc-v2", "--format", "md"],
])
def test_format_md_is_markdown_everywhere(capsys: pytest.CaptureFixture[str],
                                          args: list[str]) -> None:
    rc, out, _ = cli(capsys, *args)
    assert rc == 0 and not BOX.search(out)
    tables = [line for line in out.splitlines() if line.startswith("|")]
    assert any(re.fullmatch(r"\|(---\|)+", line) for line in tables)
    for line in tables:  # every row of a table has as many cells as its header
        assert line.endswith("|")


@pytest.mark.parametrize("args", [
    ["matrix", "--paths", "load,populate_read,ptrace_peek"],
    ["matrix", "--designs", "baseline,rfc-v1,rfc-v2", "--paths", "load,ptrace_peek"],
    ["run", "e09-33rd-shared-range", "e30-kvm-emulated-access"],
])
def test_tables_fit_80_columns_and_cut_nothing(capsys: pytest.CaptureFixture[str],
                                                args: list[str]) -> None:
    rc, out, _ = cli(capsys, *args)
    assert rc == 0 and width(out) <= 80 and "…" not in out


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    pipe = io.StringIO()
    with progress(3, "cells", pipe) as tick:
        for _ in range(3):
            tick()
    assert pipe.getvalue() == ""
    tty = Tty()
    with progress(3, "cells", tty) as tick:
        for _ in range(3):
            tick()
    assert "cells" in tty.getvalue() and "3/3" in tty.getvalue()


def test_json_and_stderr_stay_clean_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "matrix", "--designs", "rfc-v2", "--paths", "load",
                       "--format", "json")
    assert rc == 0 and out.lstrip().startswith("{") and err == ""


def _fake_comparison() -> object:
    from kvmpoison.kconfig import KernelConfig, KernelVersion
    from kvmpoison.report.oracle import Comparison

    result = Comparison("6.18.0-test", KernelConfig(version=KernelVersion.V6_18), True,
                        ("memfd",))
    result.cells = [("load", "memfd", "sig:SIGBUS:BUS_ADRERR", LONG),
                    ("store", "memfd", "ok", "ok")]
    return result


def test_oracle_md_and_table_show_a_disagreement_whole(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmpoison.report.oracle as report_oracle  # the command imports compare at run time

    monkeypatch.setattr(report_oracle, "compare", lambda progress=None: _fake_comparison())
    rc, out, _ = cli(capsys, "oracle", "--format", "md")
    assert rc == 1 and not BOX.search(out)
    assert f"| load | memfd | `sig:SIGBUS:BUS_ADRERR` | `{LONG}` |" in out
    assert "Agreement: 1/2 cells" in out
    rc, out, _ = cli(capsys, "oracle")
    assert rc == 1 and width(out) <= 80 and "…" not in out
    assert "BUS_ADRERR" in out and "BUS_MCEERR_AR" in out
    assert "sig:SIG:CODE = the access raised signal SIG" in " ".join(out.split())


def test_oracle_notes_keep_square_brackets(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """sysfs shows the active THP mode as ``[never]``: rich must not take it for markup."""
    import kvmpoison.report.oracle as report_oracle

    def with_note(progress: object = None) -> object:
        result = _fake_comparison()
        result.notes.append("not refereed: shmem_thp: shmem_enabled=[never]")  # type: ignore[attr-defined]
        return result

    monkeypatch.setattr(report_oracle, "compare", with_note)
    _, out, _ = cli(capsys, "oracle")
    assert "shmem_enabled=[never]" in " ".join(out.split())
