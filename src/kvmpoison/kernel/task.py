"""``struct task_struct`` (one thread per process in the model) and signals.

Signal delivery follows ``kernel/signal.c``: ``force_sig_fault`` and
``force_sig_mceerr`` unblock the signal and reset an ignored handler, so
with no user handler installed the default action (terminate, dump core
for SIGBUS/SIGSEGV) runs. The model installs no user handlers: a fatal
signal ends the process and is kept as its ``exit_signal``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.file import File
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.uapi.siginfo import SigInfo

FATAL_BY_DEFAULT = {signal.SIGBUS, signal.SIGSEGV, signal.SIGKILL, signal.SIGTERM}


@dataclass(eq=False)
class Task:
    pid: int
    comm: str
    mm: MmStruct | None
    cpu: Cpu
    fds: dict[int, File] = field(default_factory=dict)
    parent: Task | None = None
    alive: bool = True
    stopped: bool = False
    exit_signal: SigInfo | None = None
    pending: list[SigInfo] = field(default_factory=list)
    ptracer: Task | None = None
    handled: frozenset[int] = frozenset()  # signals with a user handler installed

    def alloc_fd(self, file: File) -> int:
        fd = 0
        while fd in self.fds:
            fd += 1
        self.fds[fd] = file
        return fd

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"dead({self.exit_signal})"
        return f"Task(pid={self.pid}, comm={self.comm!r}, {state})"


def force_sig_info(task: Task, info: SigInfo) -> None:
    """Deliver ``info``; with no handler, a fatal signal ends the task.

    ``force_sig_*`` unblocks the signal, so an installed handler always runs
    (SIGKILL cannot be handled).
    """
    task.pending.append(info)
    handled = info.signo in task.handled and info.signo != signal.SIGKILL
    if info.signo in FATAL_BY_DEFAULT and task.alive and not handled:
        task.alive = False
        task.exit_signal = info
