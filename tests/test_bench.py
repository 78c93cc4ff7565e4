"""``kvmpoison bench --quick --format json``: every row is there and measured (no timing checks)."""

import dataclasses
import json
import math

import pytest

from kvmpoison.cli.main import main

EXPECTED = ("fault-in", "mprotect", "munmap", "memfd punch-hole", "per-page protect",
            "scenario library, in process", "scenario library, `kvmpoison run`",
            "copy of a booted", "host RAM per touched", "host RAM per untouched",
            "MAC per line", "full-page write", "one-line write", "mprotect toggle, anon THP",
            "munmap, anon THP", "explorer, baseline", "explorer, hardened")


def test_bench_quick_json_has_every_row_with_positive_ratios(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmpoison.report import bench

    quick = bench.Sizes.for_run(True)
    assert quick.scenarios is None  # the throughput rows take the whole library
    # Here only that every row is there: two scenarios and fewer pages keep the suite fast.
    small = dataclasses.replace(quick, scenarios=2, touched_pages=512, explore_steps=60)
    monkeypatch.setattr(bench.Sizes, "for_run", classmethod(lambda cls, q: small))
    rc = main(["bench", "--quick", "--format", "json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert doc["quick"] is True
    rows = doc["rows"]
    for what in EXPECTED:
        assert any(r["name"].startswith(what) for r in rows), what
    for r in rows:
        assert set(r) >= {"name", "model", "reference", "unit", "ratio", "target", "met",
                          "reference_is"}
        for key in ("model", "reference", "ratio", "target"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert r["met"] == (r["ratio"] <= r["target"])
        assert math.isclose(r["ratio"], r["model"] / r["reference"], rel_tol=1e-9) or \
            math.isclose(r["ratio"], r["reference"] / r["model"], rel_tol=1e-9)


def test_bench_rejects_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--format", "xml"]) == 2
    assert "xml" in capsys.readouterr().err


def test_bench_failure_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmpoison.backends.kvm import timing

    def refused(size: int) -> dict[str, float]:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(timing, "anon_bulk", refused)
    assert main(["bench", "--quick", "--format", "json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Operation not permitted" in err[0]
