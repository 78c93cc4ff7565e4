"""getrandom(2): bytes from the (seeded, deterministic) model RNG into user memory.

Follows ``drivers/char/random.c``: the bytes are copied with ``copy_to_user``;
a fault before any byte moved is -EFAULT, otherwise the count so far.
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
    if flags & ~(GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE):
        return -errno.EINVAL
    it = IovIter(mm, cpu, addr, count)
    copied = it.copy_to_iter(rng.randbytes(count))
    return copied if copied or not count else -errno.EFAULT
