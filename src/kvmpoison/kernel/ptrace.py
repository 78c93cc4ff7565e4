"""PTRACE_PEEKDATA/POKEDATA through ``ptrace_access_vm``.

Follows ``kernel/ptrace.c`` (v5.12): both go through ``access_remote_vm``
with FOLL_FORCE; a transfer of less than a word is -EIO.
"""

from __future__ import annotations

import errno

from kvmpoison.mm.gup import FOLL, access_remote_vm
from kvmpoison.mm.mm_types import MmStruct

WORD = 8


def generic_ptrace_peekdata(mm: MmStruct, addr: int) -> int | bytes:
    """``kernel/ptrace.c:generic_ptrace_peekdata`` (v5.12, 6.18): one word through
    ``ptrace_access_vm`` with FOLL_FORCE; -EIO unless all of it moved. Simplified:
    the caller need not be attached as the tracer (``ptrace_access_vm`` returns 0
    for a non-tracer, which is -EIO).
    """
    got = access_remote_vm(mm, addr, WORD, FOLL.FORCE)
    assert isinstance(got, bytes)
    return got if len(got) == WORD else -errno.EIO


def generic_ptrace_pokedata(mm: MmStruct, addr: int, data: bytes) -> int:
    """``kernel/ptrace.c:generic_ptrace_pokedata`` (v5.12, 6.18): FOLL_FORCE|FOLL_WRITE;
    0, or -EIO unless the whole word was written.
    """
    done = access_remote_vm(mm, addr, data[:WORD].ljust(WORD, b"\0"), FOLL.FORCE)
    return 0 if done == WORD else -errno.EIO
