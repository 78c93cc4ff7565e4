"""What a host or guest action ends with: the :class:`Outcome` at the model's boundary.

Modelled failures (an errno, a signal, a machine check, a shutdown) are data;
only bugs in the model raise. ``Outcome.cell`` renders the canonical matrix
cell (the notation of docs/matrix.md, plus ``livelock:mce`` for a vCPU or task that takes the
same machine check on every re-entry) so that a model cell and a real-kernel
cell compare by string equality.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmpoison.uapi.errno import errno_name, errno_value
from kvmpoison.uapi.mce import MceRecord
from kvmpoison.uapi.siginfo import SigInfo


class Kind(enum.Enum):
    OK = "ok"  # a load, store or PEEKDATA that succeeded
    RET = "ret"  # a call that returned a value (bytes moved, or 0)
    ERR = "err"  # a call that failed with an errno
    SIG = "sig"  # the access raised a signal
    VEC = "vec"  # mincore's vector byte
    MCE = "mce"  # a machine check was consumed
    SHUTDOWN = "shutdown"  # unbreakable shutdown of the whole machine
    PANIC = "panic"  # host kernel panic
    LIVELOCK = "livelock"  # the consumer re-runs the same failing step forever
    BLOCKED = "blocked"  # the thread sleeps (handle_userfault) until something wakes it


class LivelockOn(enum.Enum):
    """What a livelocked consumer keeps taking (the part after ``livelock:``)."""

    MCE = "mce"  # a vCPU re-enters the guest (a task returns to user mode) and takes it again


class McKind(enum.Enum):
    """What a consumed machine check did, beyond the record itself."""

    RECOVERABLE = "recoverable"  # handled; the consumer goes on (or is recovered)
    TD_FATAL = "td-fatal"  # the TD is marked FATAL; the host carries on


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    value: int | None = None
    data: bytes | None = None
    siginfo: SigInfo | None = None
    mce: MceRecord | None = None
    mc_kind: McKind | None = None
    livelock: LivelockOn | None = None
    detail: str = ""

    # Constructors: one per cell kind.
    @classmethod
    def ok(cls, data: bytes | None = None, detail: str = "") -> Outcome:
        return cls(Kind.OK, data=data, detail=detail)

    @classmethod
    def ret(cls, value: int, data: bytes | None = None, detail: str = "") -> Outcome:
        return cls(Kind.RET, value=value, data=data, detail=detail)

    @classmethod
    def error(cls, err: int, detail: str = "") -> Outcome:
        if err <= 0:
            raise ValueError(f"errno must be positive, got {err}")
        return cls(Kind.ERR, value=err, detail=detail)

    @classmethod
    def signal(cls, info: SigInfo, mce: MceRecord | None = None, detail: str = "") -> Outcome:
        return cls(Kind.SIG, siginfo=info, mce=mce, detail=detail)

    @classmethod
    def vec(cls, byte: int) -> Outcome:
        return cls(Kind.VEC, value=byte)

    @classmethod
    def machine_check(cls, rec: MceRecord | None, mc_kind: McKind, detail: str = "") -> Outcome:
        return cls(Kind.MCE, mce=rec, mc_kind=mc_kind, detail=detail)

    @classmethod
    def livelocked(cls, on: LivelockOn, rec: MceRecord | None = None,
                   detail: str = "") -> Outcome:
        """The consumer never makes progress; the model saw it repeat a bounded number of times."""
        return cls(Kind.LIVELOCK, mce=rec, livelock=on, detail=detail)

    @classmethod
    def blocked(cls, detail: str = "") -> Outcome:
        """The thread sleeps: in ``handle_userfault`` until UFFDIO_COPY/ZEROPAGE/WAKE."""
        return cls(Kind.BLOCKED, detail=detail)

    @classmethod
    def shutdown(cls, rec: MceRecord | None = None, detail: str = "") -> Outcome:
        return cls(Kind.SHUTDOWN, mce=rec, detail=detail)

    @classmethod
    def panic(cls, detail: str, rec: MceRecord | None = None) -> Outcome:
        return cls(Kind.PANIC, mce=rec, detail=detail)

    @property
    def errno(self) -> int | None:
        return self.value if self.kind is Kind.ERR else None

    @property
    def succeeded(self) -> bool:
        return self.kind in (Kind.OK, Kind.RET, Kind.VEC)

    @property
    def cell(self) -> str:
        """The canonical cell string, e.g. ``err:EFAULT`` or ``sig:SIGBUS:BUS_MCEERR_AR``."""
        match self.kind:
            case Kind.OK | Kind.SHUTDOWN | Kind.PANIC | Kind.BLOCKED:
                return str(self.kind.value)
            case Kind.RET | Kind.VEC:
                return f"{self.kind.value}:{self.value}"
            case Kind.ERR:
                assert self.value is not None
                return f"err:{errno_name(self.value)}"
            case Kind.SIG:
                assert self.siginfo is not None
                return f"sig:{self.siginfo.signame}:{self.siginfo.code_name}"
            case Kind.MCE:
                assert self.mc_kind is not None
                return f"mce:{self.mc_kind.value}"
            case Kind.LIVELOCK:
                assert self.livelock is not None
                return f"livelock:{self.livelock.value}"
        raise AssertionError(self.kind)

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return self.cell + extra


CELL_KINDS = tuple(k.value for k in Kind)


def is_cell(text: str) -> bool:
    """Whether ``text`` is written in the canonical cell notation."""
    head, _, rest = text.partition(":")
    if head in ("ok", "shutdown", "panic", "blocked"):
        return rest == ""
    if head in ("ret", "vec"):
        return rest.lstrip("-").isdigit()
    if head == "err":
        return errno_value(rest) is not None
    if head == "sig":
        name, _, code = rest.partition(":")
        return name.startswith("SIG") and code != ""
    if head == "mce":
        return rest in {k.value for k in McKind}
    if head == "livelock":
        return rest in {k.value for k in LivelockOn}
    return False


class Halt(Exception):  # noqa: N818 - a machine halt is not an error of the model
    """The machine stopped: a host panic or an unbreakable shutdown.

    Raised where the modelled kernel would not return (``panic()``) and turned
    back into its :class:`Outcome` at the boundary of the action that caused it.
    """

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.cell + (f": {outcome.detail}" if outcome.detail else ""))
        self.outcome = outcome
