"""getrandom(2): bytes from the (seeded, deterministic) model RNG into user memory.

Follows ``drivers/char/random.c`` (v5.12 and 6.18, see :func:`getrandom`).
"""

from __future__ import annotations

import errno
import random

from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.uaccess import IovIter

GRND_NONBLOCK = 0x1
GRND_RANDOM = 0x2
GRND_INSECURE = 0x4


def getrandom(rng: random.Random, mm: MmStruct, cpu: Cpu | None, addr: int, count: int,
              flags: int) -> int:
    """``SYSCALL_DEFINE3(getrandom)`` (v5.12 and 6.18; the crng is always ready here).

    v5.12 copies 64-byte ChaCha blocks (``extract_crng_user``) and a failed
    ``copy_to_user`` makes the whole call -EFAULT; 6.18 (``get_random_bytes_user``)
    returns the bytes copied before the fault, -EFAULT only when none were.
    """
    if flags & ~(GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE):
        return -errno.EINVAL
    if flags & (GRND_INSECURE | GRND_RANDOM) == GRND_INSECURE | GRND_RANDOM:
        return -errno.EINVAL
    count = min(count, 0x7FFF_FFFF)
    it = IovIter(mm, cpu, addr, count)
    copied = it.copy_to_iter(rng.randbytes(count))
    if copied < count and mm.core.kcfg.version.tuple < (5, 18):  # 5.18: random.c rewrite
        return -errno.EFAULT
    return copied if copied or not count else -errno.EFAULT
