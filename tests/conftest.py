"""Shared test set-up: the ``kvm`` marker gate and its CI report line."""

from __future__ import annotations

import os

import pytest

_KVM_STATS = {"passed": 0, "failed": 0, "skipped": 0}


def kvm_unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None if it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm unusable: {exc.strerror}"
    os.close(fd)
    return None


@pytest.fixture(autouse=True)
def _gate_kvm(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") is not None:
        reason = kvm_unavailable_reason()
        if reason is not None:
            if os.environ.get("KVMPOISON_REQUIRE_KVM") == "1":
                pytest.fail(f"KVMPOISON_REQUIRE_KVM=1 but {reason}")
            pytest.skip(reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kvm" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _KVM_STATS[report.outcome] = _KVM_STATS.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    total = sum(_KVM_STATS.values())
    if total == 0:
        line = "kvm-marked tests: none collected"
    else:
        line = "kvm-marked tests: {passed} passed, {failed} failed, {skipped} skipped".format(
            **_KVM_STATS
        )
    terminalreporter.write_line(line)
