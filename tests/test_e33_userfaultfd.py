"""E33: userfaultfd (missing faults, UFFDIO_COPY/ZEROPAGE) and post-copy over protected memory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmpoison.scenario.loader import ScenarioError, load, load_text
from kvmpoison.scenario.runner import ScenarioRun, run_scenario

LIBRARY = Path(__file__).resolve().parent.parent / "src" / "kvmpoison" / "scenario" / "library"
SCENARIO = LIBRARY / "e33-userfaultfd-postcopy.toml"

HEAD = """\
[machine]
integrity = "off"

[[vm]]
name = "vm0"
backing = "{backing}"

[[step]]
actor = "vmm:vm0"
op = "userfaultfd"
flags = {flags}
save = "uffd"
"""


def step(op: str, **kw: object) -> str:
    body = "".join(f"{k} = {v!r}\n".replace("'", '"') if isinstance(v, str) else
                   f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                   for k, v in kw.items())
    return f'\n[[step]]\nactor = "vmm:vm0"\nop = "{op}"\n{body}'


def run(text: str, design: str = "baseline") -> ScenarioRun:
    return run_scenario(load_text(text, "t.toml"), design)


def cells(r: ScenarioRun) -> list[str]:
    return [x.outcome.cell for x in r.results]


API = step("uffdio_api", fd="$uffd")
REG = step("uffdio_register", fd="$uffd", gpa=0x100000, size=0x100000, mode=["MISSING"])


@pytest.mark.parametrize("design", ["baseline", "rfc-v1", "rfc-v2", "hardened", "gmem"])
def test_the_shipped_scenario_meets_its_expectations(design: str) -> None:
    r = run_scenario(load(SCENARIO), design)
    assert r.passed, [(x.step.index, x.outcome.cell, x.expected) for x in r.results]


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_a_missing_fault_queues_a_message_and_a_copy_wakes_the_store(backing: str) -> None:
    text = HEAD.format(backing=backing, flags='["NONBLOCK"]') + API + REG + \
        step("store", gpa=0x123008, data="late") + step("read", fd="$uffd", size=64) + \
        step("read", fd="$uffd", size=32) + \
        step("uffdio_copy", fd="$uffd", gpa=0x123000, data="copied!!") + \
        step("load", gpa=0x123000, size=12)
    r = run(text)
    assert cells(r) == ["ok", "ret:0", "ret:0", "blocked", "ret:32", "err:EAGAIN", "ret:0", "ok"]
    event, _, _, _, flags, address, _ = struct.unpack("<BBHIQQI4x", r.results[4].outcome.data
                                                      or b"")
    assert (event, flags, address & 0xFFFFF) == (0x12, 1, 0x23000)  # UFFD_PAGEFAULT_FLAG_WRITE
    assert "woke: vmm:vm0 store -> ok" in r.results[6].outcome.detail
    assert r.results[7].outcome.data == b"copied!!late"  # the woken store ran after the copy


def test_zeropage_fills_zeros_and_dontwake_leaves_the_thread_asleep() -> None:
    text = HEAD.format(backing="anon", flags='["NONBLOCK"]') + API + REG + \
        step("load", gpa=0x140000) + \
        step("uffdio_copy", fd="$uffd", gpa=0x140000, mode=["DONTWAKE"]) + \
        step("uffdio_zeropage", fd="$uffd", gpa=0x141000) + step("load", gpa=0x141000)
    r = run(text)
    assert cells(r) == ["ok", "ret:0", "ret:0", "blocked", "ret:0", "ret:0", "ok"]
    assert "woke" not in r.results[4].outcome.detail
    assert r.results[6].outcome.data == bytes(8)


def test_uffd_feature_sigbus_turns_the_missing_fault_into_sigbus() -> None:
    text = HEAD.format(backing="anon", flags="[]") + \
        step("uffdio_api", fd="$uffd", features=["SIGBUS"]) + REG + step("load", gpa=0x150000)
    assert cells(run(text))[-1] == "sig:SIGBUS:BUS_ADRERR"


def test_the_ioctls_refuse_what_the_kernel_refuses() -> None:
    text = HEAD.format(backing="memfd", flags="[]") + \
        step("uffdio_register", fd="$uffd", gpa=0, size=0x1000, mode=["MISSING"]) + \
        step("read", fd="$uffd", size=32) + API + API + \
        step("read", fd="$uffd", size=16) + step("read", fd="$uffd", size=32) + \
        step("uffdio_copy", fd="$uffd", gpa=0x2000) + \
        step("uffdio_copy", fd="$uffd", hva="$uffd", size=0x1000) + \
        step("uffdio_api", fd=1000)
    r = run(text.replace('hva = "$uffd"', 'gpa = 0x3000\nnote = "x"'))
    assert cells(r) == ["ok", "err:EINVAL", "err:EINVAL", "ret:0", "err:EINVAL", "err:EINVAL",
                        "blocked", "err:ENOENT", "err:ENOENT", "err:EBADF"]


def test_the_hwpoison_entry_is_not_a_none_pte_for_uffdio_copy() -> None:
    r = run_scenario(load(SCENARIO), "rfc-v2")
    assert r.results[6].outcome.cell == "sig:SIGBUS:BUS_MCEERR_AR"  # no missing fault
    assert r.results[8].outcome.cell == "err:EEXIST"
    assert r.results[10].outcome.data == b"secret"  # the guest still reads the old page


def test_bad_userfaultfd_steps_are_one_clear_line() -> None:
    for bad, why in ((step("uffdio_register", fd="$uffd", gpa=0, mode=["LATER"]), "unknown flag"),
                     (step("uffdio_copy", fd="$uffd", gpa=0, size=1 << 21), "at most")):
        with pytest.raises(ScenarioError, match=why) as err:
            run(HEAD.format(backing="anon", flags="[]") + API + bad)
        assert "\n" not in str(err.value)


# -- refereed by the running kernel (6.18 here) -------------------------------------------------


@pytest.mark.kvm
def test_the_postcopy_scenario_agrees_live_on_every_step() -> None:
    from kvmpoison.report.scenario_live import referee

    live = referee(load(SCENARIO))
    assert live.disagreements == [] and live.refereed == 11, \
        [(s.step.index, s.model, s.live, s.reason) for s in live.steps]
    assert [s.live for s in live.steps][6:8] == ["blocked", "ret:32"]


@pytest.mark.kvm
def test_the_message_address_is_compared_as_a_ram_offset() -> None:
    from kvmpoison.report.scenario_live import referee

    text = HEAD.format(backing="anon", flags='["NONBLOCK"]') + API + REG + \
        step("store", gpa=0x123000, data="x") + step("read", fd="$uffd", size=32) + \
        step("uffdio_zeropage", fd="$uffd", gpa=0x123000) + step("load", gpa=0x123000, size=1)
    live = referee(load_text(text, "t.toml"))
    assert [s.verdict for s in live.steps] == ["agree"] * 7, \
        [(s.model, s.live, s.reason) for s in live.steps]


def test_uffd_msgs_relative_rewrites_only_page_fault_addresses_in_ram() -> None:
    from kvmpoison.matrix.protocol import uffd_msgs_relative

    msg = struct.pack("<BBHIQQI4x", 0x12, 0, 0, 0, 1, 0x7000_2000, 0)
    other = struct.pack("<BBHIQQI4x", 0x13, 0, 0, 0, 1, 0x7000_2000, 0)
    got = uffd_msgs_relative(msg + other, [(0x7000_0000, 0x10000)])
    assert struct.unpack("<BBHIQQI4x", got[:32])[5] == 0x2000
    assert got[32:] == other
    assert uffd_msgs_relative(msg, [(0x1000, 0x1000)]) == msg
