"""futex(2) WAIT and WAKE, far enough to see how they touch the futex word.

Follows ``kernel/futex`` (v5.12 ``get_futex_key``/``futex_wait_setup``): a
private futex is keyed by address only; a shared one pins the page with
``get_user_pages_fast`` (trying read-only for WAIT when a write pin fails),
which is where secretmem and unmapped pages fail with -EFAULT. WAIT then
reads the word with ``get_user``: -EFAULT on a fault, -EAGAIN when it does
not hold the expected value. Blocking is not modelled.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.gup import FOLL, get_user_pages_fast, put_pages
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import Page
from kvmpoison.mm.uaccess import get_user

FUTEX_WAIT = 0
FUTEX_WAKE = 1
FUTEX_PRIVATE_FLAG = 128


def get_futex_key(mm: MmStruct, addr: int, private: bool, write: bool) -> int:
    """``kernel/futex.c:get_futex_key`` (v5.12; kernel/futex/core.c in 6.18): -EINVAL
    unless 4-byte aligned; a private key needs no page; a shared one pins the
    page with GUP (FOLL_WRITE, then read-only for FUTEX_READ callers).
    """
    if addr % 4:
        return -errno.EINVAL
    if private:
        return 0
    pages: list[Page] = []
    err = get_user_pages_fast(mm, addr, 1, FOLL.WRITE, pages)
    if err == -errno.EFAULT and not write:
        err = get_user_pages_fast(mm, addr, 1, FOLL(0), pages)
    put_pages(pages)
    return 0 if err == 1 else err


def futex_wait(mm: MmStruct, cpu: Cpu | None, addr: int, val: int, private: bool) -> int:
    """``futex_wait`` (v5.12, 6.18): key, then ``get_user`` of the word (-EFAULT), -EAGAIN
    (EWOULDBLOCK) on a mismatch. The model never sleeps: a matching word returns
    -ETIMEDOUT, as a wait with an expired timeout does.
    """
    err = get_futex_key(mm, addr, private, write=False)
    if err:
        return err
    uval = get_user(mm, cpu, addr, 4)
    if uval is None:
        return -errno.EFAULT
    if uval != val & 0xFFFF_FFFF:
        return -errno.EAGAIN
    return -errno.ETIMEDOUT  # would block; the model never sleeps


def futex_wake(mm: MmStruct, addr: int, nr: int, private: bool) -> int:
    """``futex_wake`` (v5.12, 6.18): the key's errors, else the number woken (always 0)."""
    err = get_futex_key(mm, addr, private, write=False)
    return err if err else 0
