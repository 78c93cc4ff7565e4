"""/proc/PID/mem.

Follows ``fs/proc/base.c:mem_rw`` (v5.12, unchanged in 6.18 apart from
CONFIG_PROC_MEM_ALWAYS_FORCE, set on this machine): transfers go PAGE_SIZE at
a time through ``access_remote_vm`` with FOLL_FORCE; a chunk that moves
nothing ends the call with -EIO if nothing was copied yet, else with the count
so far; a fault on the caller's buffer is -EFAULT whatever moved before.
Simplified: ``*ppos`` is not advanced on an error return; no ptrace-mode
access check at open; a target without an mm is -ESRCH at open (the kernel
opens it and reads 0).
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.mm.file import File, NoFileOperations
from kvmpoison.mm.gup import FOLL, access_remote_vm
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.uaccess import IovIter


class ProcMem(NoFileOperations):
    """``proc_mem_operations`` for one target mm."""

    def __init__(self, target: MmStruct):
        self.target = target

    def _rw(self, pos: int, it: IovIter, write: bool) -> int:
        """``fs/proc/base.c:mem_rw`` (v5.12, 6.18); see the module docstring."""
        copied = 0
        addr = pos
        while it.count:
            this_len = min(PAGE_SIZE, it.count)
            if write:
                buf = it.copy_from_iter(this_len)
                if len(buf) < this_len:
                    return -errno.EFAULT  # "copied = -EFAULT": earlier chunks are not reported
                done = access_remote_vm(self.target, addr, buf, FOLL.FORCE)
                assert isinstance(done, int)
                if not done:
                    return copied or -errno.EIO
                n = done
            else:
                got = access_remote_vm(self.target, addr, this_len, FOLL.FORCE)
                assert isinstance(got, bytes)
                if not got:
                    return copied or -errno.EIO
                n = it.copy_to_iter(got)
                if n < len(got):
                    return -errno.EFAULT
            copied += n
            addr += n
            if n < this_len:
                break
        return copied

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        return self._rw(pos, to, write=False)

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        return self._rw(pos, src, write=True)
