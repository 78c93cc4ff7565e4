"""A userfaultfd context and ``handle_userfault``: what a fault in a registered range does.

Follows ``fs/userfaultfd.c`` and ``include/linux/userfaultfd_k.h`` (v5.12; 6.18
the same here). A missing fault in a VM_UFFD_MISSING range queues a
``struct uffd_msg`` (UFFD_EVENT_PAGEFAULT) and puts the faulting thread to
sleep until UFFDIO_COPY, UFFDIO_ZEROPAGE or UFFDIO_WAKE wakes it; with
UFFD_FEATURE_SIGBUS it is VM_FAULT_SIGBUS instead. The model cannot hold a
thread asleep inside a Python call: ``handle_userfault`` raises
:class:`UserfaultBlocked`, which unwinds the access before it changed anything
(as the kernel's VM_FAULT_RETRY does), and the caller (a scenario step) records
the waiter and re-runs the access when it is woken.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmpoison.mm.mm_types import FAULT_FLAG_WRITE_I, MmStruct, VmFault, VmFaultInfo

UFFD_API = 0xAA
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_MSG_SIZE = 32  # sizeof(struct uffd_msg), __packed


def uffd_msg_pagefault(address: int, flags: int, ptid: int = 0) -> bytes:
    """``struct uffd_msg`` (include/uapi/linux/userfaultfd.h) of a page fault: event,
    three reserved fields, then ``arg.pagefault`` {flags, address, feat.ptid}, 32 bytes."""
    return struct.pack("<BBHIQQI4x", UFFD_EVENT_PAGEFAULT, 0, 0, 0, flags, address, ptid)


@dataclass(eq=False)
class UffdWaiter:
    """A thread asleep in ``handle_userfault`` (``struct userfaultfd_wait_queue``)."""

    address: int
    flags: int
    reported: bool = False  # read(2) returned its message (it moved to fault_wqh)
    token: object = None  # the caller's handle to re-run the access once woken

    @property
    def msg(self) -> bytes:
        return uffd_msg_pagefault(self.address, self.flags)


@dataclass(eq=False)
class UffdCtx:
    """``struct userfaultfd_ctx``: ``initialized`` is UFFDIO_API done (v5.12's
    UFFD_STATE_RUNNING); the waiters are fault_pending_wqh and fault_wqh in order."""

    mm: MmStruct
    features: int = 0
    initialized: bool = True
    waiters: list[UffdWaiter] = field(default_factory=list)
    woken: list[UffdWaiter] = field(default_factory=list)  # for the caller to re-run


class UserfaultBlocked(Exception):  # noqa: N818 - a sleeping thread, not an error
    """The faulting thread sleeps in ``handle_userfault`` (``waiter``), or a blocking
    read(2) of a userfaultfd with no message sleeps (``waiter`` None)."""

    def __init__(self, waiter: UffdWaiter | None):
        super().__init__("blocked in handle_userfault" if waiter else "blocked in read(2)")
        self.waiter = waiter


def handle_userfault(vmf: VmFaultInfo, ctx: UffdCtx) -> VmFault:
    """``handle_userfault(vmf, VM_UFFD_MISSING)`` (fs/userfaultfd.c, v5.12).

    UFFD_FEATURE_SIGBUS: VM_FAULT_SIGBUS. Otherwise a message with the
    page-aligned fault address (``vmf->address``; 6.18's UFFD_FEATURE_EXACT_ADDRESS
    is not modelled) and UFFD_PAGEFAULT_FLAG_WRITE for a write fault is queued and
    the thread sleeps (:class:`UserfaultBlocked`). Not modelled: the
    FAULT_FLAG_ALLOW_RETRY/RETRY_NOWAIT cases (every model caller may retry) and
    a released context.
    """
    if ctx.features & UFFD_FEATURE_SIGBUS:
        return VmFault.SIGBUS
    flags = UFFD_PAGEFAULT_FLAG_WRITE if int(vmf.flags) & FAULT_FLAG_WRITE_I else 0
    waiter = UffdWaiter(vmf.address & ~0xFFF, flags)
    ctx.waiters.append(waiter)
    raise UserfaultBlocked(waiter)


def wake_userfault(ctx: UffdCtx, start: int, length: int) -> int:
    """``wake_userfault`` (fs/userfaultfd.c, v5.12, 6.1): wake every waiter whose address is in
    [start, start + length), read or not; their messages leave the queue. The
    woken go to ``ctx.woken`` for the caller to re-run. Returns how many."""
    woken = [w for w in ctx.waiters if start <= w.address < start + length]
    ctx.waiters = [w for w in ctx.waiters if w not in woken]
    ctx.woken += woken
    return len(woken)
