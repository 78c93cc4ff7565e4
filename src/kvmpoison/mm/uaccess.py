"""Kernel access to user memory: ``copy_to_user``, ``copy_from_user``, ``get_user``, iov_iter.

Follows ``include/linux/uaccess.h`` and ``lib/iov_iter.c`` (v5.12): a fault
the kernel cannot resolve ends in the exception-table fixup and the copy
returns the number of bytes *not* copied; callers turn that into -EFAULT
or a short count. Reading user memory that holds consumed poison is the
v5.10+ "copyin" recovery (an MC-safe path), so it also just fails the copy.
"""

from __future__ import annotations

import errno

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.arch.x86.tlb import Cpu
from kvmpoison.mm.fault import translate
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.outcome import Kind


def _pieces(addr: int, size: int) -> list[tuple[int, int]]:
    out = []
    end = addr + size
    while addr < end:
        n = min(PAGE_SIZE - (addr & (PAGE_SIZE - 1)), end - addr)
        out.append((addr, n))
        addr += n
    return out


def copy_to_user(mm: MmStruct, cpu: Cpu | None, addr: int, data: bytes) -> int:
    """``copy_to_user`` (include/linux/uaccess.h, v5.12): returns the bytes not copied."""
    done = 0
    for vaddr, n in _pieces(addr, len(data)):
        pfn, failed = translate(mm, cpu, vaddr, write=True, user_mode=False)
        if failed is not None:
            return len(data) - done
        pa = (pfn << PAGE_SHIFT) | (vaddr & (PAGE_SIZE - 1))
        mm.core.hw.write(pa, data[done : done + n], 0)
        done += n
    return 0


def copy_from_user(mm: MmStruct, cpu: Cpu | None, addr: int, size: int) -> tuple[bytes, int]:
    """``copy_from_user`` (v5.12): (bytes copied, bytes not copied); consumed poison
    in user memory is an MC-safe copyin and just fails the copy.
    """
    parts: list[bytes] = []
    done = 0
    for vaddr, n in _pieces(addr, size):
        pfn, failed = translate(mm, cpu, vaddr, write=False, user_mode=False)
        if failed is not None:
            break
        pa = (pfn << PAGE_SHIFT) | (vaddr & (PAGE_SIZE - 1))
        got = mm.core.hw.load(pa, n, 0, Ctx.HOST_KERNEL_MC_SAFE)
        if got.kind is not Kind.OK:
            break
        assert got.data is not None
        parts.append(got.data)
        done += n
    return b"".join(parts), size - done


def get_user(mm: MmStruct, cpu: Cpu | None, addr: int, size: int = 4) -> int | None:
    """``get_user`` (v5.12): the value at ``addr`` (little-endian), or None for -EFAULT."""
    data, left = copy_from_user(mm, cpu, addr, size)
    return None if left else int.from_bytes(data, "little")


class IovIter:
    """One user segment of an iov_iter (ITER_UBUF)."""

    def __init__(self, mm: MmStruct, cpu: Cpu | None, addr: int, count: int):
        self.mm = mm
        self.cpu = cpu
        self.addr = addr
        self.count = count

    def copy_to_iter(self, data: bytes) -> int:
        """Copy into user memory; returns bytes copied (short on a fault)."""
        data = data[: self.count]
        left = copy_to_user(self.mm, self.cpu, self.addr, data)
        copied = len(data) - left
        self.addr += copied
        self.count -= copied
        return copied

    def copy_from_iter(self, size: int) -> bytes:
        data, _ = copy_from_user(self.mm, self.cpu, self.addr, min(size, self.count))
        self.addr += len(data)
        self.count -= len(data)
        return data


def efault_or(copied: int) -> int:
    """A syscall's return after a partial copy: the count, or -EFAULT if nothing moved."""
    return copied if copied else -errno.EFAULT
