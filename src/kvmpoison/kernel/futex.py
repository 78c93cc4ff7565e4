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
    err = get_futex_key(mm, addr, private, write=False)
    return err if err else 0
