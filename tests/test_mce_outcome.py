import errno
import signal

import pytest

from kvmpoison.arch.x86.mce import (
    MCG_STATUS_EIPV,
    MCG_STATUS_RIPV,
    MCI_STATUS_AR,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MceRecord,
    Severity,
    mce_severity,
    srar_record,
)
from kvmpoison.arch.x86.vmx import EptEntry, EptFlag, MemType, ept_leaf
from kvmpoison.outcome import LivelockOn, McKind, Outcome, is_cell
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import BusCode, SegvCode, SigInfo


def test_srar_record_bits() -> None:
    rec = srar_record(0x1234_5678, seam_nr=True)
    assert rec.mci_status == 0xBD80_0000_0000_0134  # VAL|UC|EN|MISCV|ADDRV|S|AR|0x134
    assert rec.mcg_status == 0x100F  # RIPV|EIPV|MCIP|LMCES|SEAM_NR
    assert rec.addr == 0x1234_5640  # line-aligned
    assert srar_record(0, instruction_fetch=True, lmce=False).mcacod == 0x150


@pytest.mark.parametrize(
    ("rec", "kernel", "safe", "sev"),
    [
        (srar_record(0), False, False, Severity.AR),
        (srar_record(0), True, False, Severity.PANIC),
        (srar_record(0), True, True, Severity.AR),
        (srar_record(0, seam_nr=True), True, False, Severity.AR),
        (
            MceRecord(srar_record(0).mci_status | MCI_STATUS_PCC, MCG_STATUS_RIPV, 0),
            False,
            False,
            Severity.PANIC,
        ),
        (MceRecord(srar_record(0).mci_status, 0, 0), False, False, Severity.PANIC),
        (
            MceRecord(srar_record(0).mci_status & ~MCI_STATUS_AR, MCG_STATUS_RIPV, 0),
            False,
            False,
            Severity.AO,
        ),
        (
            MceRecord(
                srar_record(0).mci_status & ~(MCI_STATUS_AR | MCI_STATUS_S), MCG_STATUS_EIPV, 0
            ),
            False,
            False,
            Severity.UCNA,
        ),
        (MceRecord(srar_record(0).mci_status, MCG_STATUS_RIPV, 0), False, False, Severity.KEEP),
    ],
)
def test_intel_severity_grading(rec: MceRecord, kernel: bool, safe: bool, sev: Severity) -> None:
    assert mce_severity(rec, kernel_mode=kernel, mc_safe=safe) is sev


def test_ept_entry_round_trip_and_layout() -> None:
    raw = ept_leaf(0x12345)
    assert raw == (0x12345 << 12) | (6 << 3) | 0b111
    e = EptEntry.decode(raw | (1 << 8) | (1 << 9) | (1 << 6))
    assert e.pfn == 0x12345 and e.memtype is MemType.WB and e.present
    assert e.flags & EptFlag.ACCESSED and e.flags & EptFlag.DIRTY and e.flags & EptFlag.IPAT
    assert EptEntry.decode(e.encode()) == e
    assert not EptEntry.decode(6 << 3).present
    assert EptEntry.decode(ept_leaf(0x200, large=True)).flags & EptFlag.LARGE
    with pytest.raises(ValueError, match="reserved"):
        EptEntry.decode(2 << 3)


@pytest.mark.parametrize(
    ("outcome", "cell"),
    [
        (Outcome.ok(b"x"), "ok"),
        (Outcome.ret(16), "ret:16"),
        (Outcome.error(EHWPOISON), "err:EHWPOISON"),
        (Outcome.error(errno.EFAULT), "err:EFAULT"),
        (
            Outcome.signal(SigInfo(signal.SIGBUS, BusCode.BUS_MCEERR_AR, 0x1000, 12)),
            "sig:SIGBUS:BUS_MCEERR_AR",
        ),
        (
            Outcome.signal(SigInfo(signal.SIGSEGV, SegvCode.SEGV_ACCERR, 0x1000)),
            "sig:SIGSEGV:SEGV_ACCERR",
        ),
        (Outcome.vec(0), "vec:0"),
        (Outcome.machine_check(srar_record(0), McKind.TD_FATAL), "mce:td-fatal"),
        (Outcome.shutdown(), "shutdown"),
        (Outcome.panic("x"), "panic"),
        (Outcome.livelocked(LivelockOn.MCE, srar_record(0)), "livelock:mce"),
    ],
)
def test_cell_notation(outcome: Outcome, cell: str) -> None:
    assert outcome.cell == cell
    assert is_cell(cell)


def test_errno_values_are_the_kernels() -> None:
    assert (errno.EIO, errno.EFAULT, EHWPOISON, errno.EBUSY) == (5, 14, 133, 16)
    assert (signal.SIGBUS, signal.SIGSEGV, signal.SIGKILL) == (7, 11, 9)
    assert [c.value for c in BusCode] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("text", ["oops", "err:ENOTANERRNO", "ret:x", "mce:weird", "ok:1", "sig:",
                                  "livelock", "livelock:", "livelock:fault"])
def test_non_cells_are_rejected(text: str) -> None:
    assert not is_cell(text)


def test_error_requires_positive_errno() -> None:
    with pytest.raises(ValueError, match="positive"):
        Outcome.error(0)


@pytest.mark.parametrize(
    ("value", "name"),
    [(95, "EOPNOTSUPP"), (11, "EAGAIN"), (133, "EHWPOISON"), (5, "EIO"), (14, "EFAULT")],
)
def test_errno_names_follow_the_kernel_headers(value: int, name: str) -> None:
    assert Outcome.error(value).cell == f"err:{name}"


def test_severity_rows_in_table_order() -> None:
    """Rows of arch/x86/kernel/cpu/mce/severity.c the grading used to skip or reorder."""
    srar = srar_record(0)
    ripv_only = MceRecord(srar.mci_status, MCG_STATUS_RIPV, 0)
    assert mce_severity(ripv_only, kernel_mode=True) is Severity.KEEP  # before "in kernel"
    over = MceRecord(srar.mci_status | MCI_STATUS_OVER, srar.mcg_status, 0)
    assert mce_severity(over, kernel_mode=False) is Severity.PANIC  # lost events
    assert mce_severity(srar, kernel_mode=False, memory_failure=False) is Severity.PANIC
    ucna_ar = MceRecord(srar.mci_status & ~MCI_STATUS_S, srar.mcg_status, 0)
    assert mce_severity(ucna_ar, kernel_mode=False) is Severity.PANIC  # illegal combination
    instr = srar_record(0, instruction_fetch=True)
    assert mce_severity(instr, kernel_mode=True, mc_safe=True) is Severity.PANIC
    assert mce_severity(instr, kernel_mode=False) is Severity.AR
