"""The task work a user-mode machine check leaves: ``kill_me_maybe`` and ``kill_me_now``.

``arch/x86/kernel/cpu/mce/core.c``: ``do_machine_check`` grades an SRAR error
taken in user mode as AR and queues ``kill_me_maybe`` as task work on the
consuming task; it runs before the task returns to user mode. The task
re-executes the faulting instruction unless a signal ends it, so a page that
stays mapped and poisoned is consumed again: the model bounds the re-entries
(``MCE_REENTRY_LIMIT``) where the kernel loops forever.
"""

from __future__ import annotations

import errno
import signal

from kvmpoison.arch.x86.mce import MCG_STATUS_RIPV
from kvmpoison.kernel.task import Task, force_sig_info
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.memory_failure import MF_ACTION_REQUIRED, MF_MUST_KILL, memory_failure
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import SI_KERNEL, SigInfo

MCE_REENTRY_LIMIT = 3
"""Re-executions (a task's returns to user mode, a vCPU's VM entries) that took the same
#MC again before the model calls the consumer livelocked. The kernel has no such bound."""


def kill_me_now(core: MmCore, task: Task) -> None:
    """``kill_me_now``: ``force_sig(SIGBUS)``, whose si_code is SI_KERNEL."""
    core.dmesg.append("Memory error not recovered")
    force_sig_info(task, SigInfo(signal.SIGBUS, SI_KERNEL))


def kill_me_maybe(core: MmCore, task: Task, pfn: int, mcg_status: int) -> None:
    """``kill_me_maybe`` (arch/x86/kernel/cpu/mce/core.c), task work of ``task``.

    ``memory_failure(pfn, MF_ACTION_REQUIRED)``, with MF_MUST_KILL when
    MCG_STATUS.RIPV is clear. v5.12: 0 returns quietly (also for a page that is
    already poisoned: nothing is sent, and a task that still maps the page takes
    the same #MC again); any other value is ``kill_me_now``. From v5.13 (6.1:
    the same code) -EHWPOISON, which ``kill_accessing_process`` returns after it
    sent BUS_MCEERR_AR to a task that maps the pfn, and -EOPNOTSUPP (hwpoison
    filter) return quietly too. Not modelled: ``set_mce_nospec`` (a direct-map
    change) and v5.12's ``mce_vaddr`` (set only by a kernel copy-in recovery).
    """
    flags = MF_ACTION_REQUIRED | (0 if mcg_status & MCG_STATUS_RIPV else MF_MUST_KILL)
    ret = memory_failure(core, pfn, flags, current_pid=task.pid)
    if ret == 0:
        return
    if core.kcfg.version.tuple >= (5, 13) and ret in (-EHWPOISON, -errno.EOPNOTSUPP):
        return
    kill_me_now(core, task)
