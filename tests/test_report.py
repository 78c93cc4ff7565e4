"""``kvmpoison report``: the HTML page, its pictures, and (with a browser) how it renders."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kvmpoison.cli.main import main
from kvmpoison.designs import DESIGNS
from kvmpoison.report.gpa_map import POISONED, PRIVATE, SHARED, UNMAPPED, trace_scenario
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import load

MAP = "seed-3-poison-and-unmap"
CASES = ("e01-v1-gup-reads-private", "e30-kvm-emulated-access", MAP)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    rc = main(["report", "--out", str(out), "--paths", "load,process_vm_readv,ptrace_peek",
               "--states", "shared,private,hwpoisoned",
               "--maps", MAP, "--cases", ",".join(CASES), "--no-oracle"])
    assert rc == 0
    return out


def test_gpa_map_follows_the_private_page_through_protection() -> None:
    sc = load(shipped()[MAP])
    gfn = 0x30
    states = {d: trace_scenario(sc, d).grid[:, gfn].tolist() for d in ("baseline", "rfc-v2")}
    # boot, VMM store, guest store (the RFC protects the page), mincore, VMM load
    assert states["rfc-v2"] == [UNMAPPED, PRIVATE, POISONED, POISONED, POISONED]
    assert states["baseline"] == [UNMAPPED, PRIVATE, PRIVATE, PRIVATE, PRIVATE]
    rfc = trace_scenario(sc, "rfc-v2").grid
    assert (rfc[:, 0xF] == SHARED).all()  # kvmclock, shared at boot
    assert np.count_nonzero(rfc[0] == POISONED) == 0


def test_report_page_is_self_contained_and_complete(report_dir: Path) -> None:
    from kvmpoison.report import build

    page = (report_dir / "index.html").read_text()
    assert not re.search(r"(href|src)=\"(https?:)?//", page) and "<link" not in page
    assert "<script" not in page and "<style>" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == [f"gpa-{MAP}.png"]
    for src in images:
        assert (report_dir / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in CASES:  # the E-case table: each scenario asked for...
        assert f"<th>{name}</th>" in page
    assert page.count("(met)") == len(CASES) * len(DESIGNS)
    for d in DESIGNS:  # ... on every design
        assert f"<th>{d}</th>" in page
    assert "(FAILED)" not in page
    assert build.ReportOptions().case_names() == tuple(shipped())  # by default, all of them
    assert "Not refereed" in page and "--no-oracle" in page
    # The heat map colours a cell by its kind (err: yellow, sig: red).
    assert 'style="background:#fff59d">err:<wbr>EFAULT</td>' in page
    assert 'style="background:#ffcdd2">sig:<wbr>SIGBUS:<wbr>BUS_MCEERR_AR</td>' in page


def test_report_without_kvm_says_why_it_was_not_refereed(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from kvmpoison.report import build

    monkeypatch.setattr(build, "kvm_unusable_reason", lambda: "/dev/kvm: Permission denied")
    section = build._oracle_section(build.ReportOptions(), lambda: None)
    assert "Not refereed" in section and "Permission denied" in section


def test_report_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for args, message in ((["--out", str(afile)], "not a directory"),
                          (["--out", str(tmp_path), "--maps", "nope"], "unknown scenario")):
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")

# After load, a strip at the top turns rgb(1, 2, 3) if every image decoded, magenta if not.
PROBE = ("<script>window.addEventListener('load', () => { const ok = [...document.images]"
         ".every(i => i.complete && i.naturalWidth > 100); const d = document.createElement('div');"
         " d.style.cssText = 'height:40px;background:' + (ok ? 'rgb(1,2,3)' : 'rgb(255,0,255)');"
         " document.body.prepend(d); });</script></body>")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report_dir: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    probe = report_dir / "probe.html"
    probe.write_text((report_dir / "index.html").read_text().replace("</body>", PROBE))
    shot = report_dir / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_ARGS, f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1280,2400", probe.as_uri()],
                       capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in pixels[::3, ::3].reshape(-1, 3)}
    assert (1, 2, 3) in colours and (255, 0, 255) not in colours  # every <img> decoded
    # The GPA map's shared green and poisoned red (its PNG is drawn on the page), and the
    # heat map's err: yellow (the table rendered with its inline CSS).
    for rgb in ((0x4E, 0x9A, 0x06), (0xCC, 0x00, 0x00), (0xFF, 0xF5, 0x9D)):
        assert rgb in colours, rgb
