"""si_code values and the siginfo fields the model reports.

Follows ``include/uapi/asm-generic/siginfo.h``. Signal numbers come from the
stdlib ``signal`` module (x86-64 Linux numbering), errno values from ``errno``.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass


class BusCode(enum.IntEnum):
    BUS_ADRALN = 1
    BUS_ADRERR = 2
    BUS_OBJERR = 3
    BUS_MCEERR_AR = 4  # hardware memory error consumed on a machine check: action required
    BUS_MCEERR_AO = 5  # hardware memory error detected in process but not consumed


class SegvCode(enum.IntEnum):
    SEGV_MAPERR = 1
    SEGV_ACCERR = 2
    SEGV_BNDERR = 3
    SEGV_PKUERR = 4


SI_KERNEL = 0x80

_CODES: dict[int, type[enum.IntEnum]] = {
    signal.SIGBUS: BusCode,
    signal.SIGSEGV: SegvCode,
}


def si_code_name(signo: int, code: int) -> str:
    """Name of ``code`` for ``signo``, e.g. ``BUS_MCEERR_AR``; falls back to the number."""
    if code == SI_KERNEL:
        return "SI_KERNEL"
    table = _CODES.get(signo)
    if table is not None:
        try:
            return table(code).name
        except ValueError:
            pass
    return str(code)


@dataclass(frozen=True, slots=True)
class SigInfo:
    """The siginfo fields a fault reports: ``si_signo``, ``si_code``, ``si_addr``, ``si_addr_lsb``.

    ``addr_lsb`` is set only for the BUS_MCEERR_* codes, as ``force_sig_mceerr`` does.
    """

    signo: int
    code: int
    addr: int = 0
    addr_lsb: int | None = None

    @property
    def signame(self) -> str:
        return signal.Signals(self.signo).name

    @property
    def code_name(self) -> str:
        return si_code_name(self.signo, self.code)

    def __repr__(self) -> str:
        lsb = "" if self.addr_lsb is None else f", addr_lsb={self.addr_lsb}"
        return f"SigInfo(signal.{self.signame}, {self.code_name}, addr={self.addr:#x}{lsb})"
