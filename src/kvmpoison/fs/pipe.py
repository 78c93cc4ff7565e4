"""Pipes.

Follows ``fs/pipe.c`` (v5.12 ``pipe_read``/``pipe_write``): a copy that faults
part-way fails the whole chunk with -EFAULT unless earlier chunks moved data
(``if (!ret) ret = -EFAULT``), and the failed chunk stays in (or out of) the
pipe. So a transfer straddling an inaccessible page returns -EFAULT, not a
short count, as measured on this machine.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.mm.file import File, Inode
from kvmpoison.mm.uaccess import IovIter

PIPE_DEF_BUFFERS = 16


@dataclass(eq=False)
class Pipe:
    """``struct pipe_inode_info``: a byte queue of at most 16 pages."""

    data: bytearray = field(default_factory=bytearray)
    capacity: int = PIPE_DEF_BUFFERS * PAGE_SIZE


class PipeEnd:
    def __init__(self, pipe: Pipe, readable: bool):
        self.pipe = pipe
        self.readable = readable

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        if not self.readable:
            return -errno.EBADF
        pipe = self.pipe
        if not pipe.data:
            return -errno.EAGAIN
        total = 0
        while pipe.data and to.count:
            chunk = bytes(pipe.data[: min(PAGE_SIZE, to.count)])
            written = to.copy_to_iter(chunk)
            if written < len(chunk):
                return total or -errno.EFAULT  # the chunk stays in the pipe
            del pipe.data[: len(chunk)]
            total += len(chunk)
        return total

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        if self.readable:
            return -errno.EBADF
        pipe = self.pipe
        total = 0
        while src.count:
            room = pipe.capacity - len(pipe.data)
            if room <= 0:
                return total or -errno.EAGAIN
            want = min(PAGE_SIZE, src.count, room)
            chunk = src.copy_from_iter(want)
            if len(chunk) < want:
                return total or -errno.EFAULT
            pipe.data += chunk
            total += len(chunk)
        return total

    def mmap(self, file: File, vma: object) -> int:
        return -errno.ENODEV

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        return -errno.ESPIPE

    def setattr_size(self, file: File, size: int) -> int:
        return -errno.EINVAL

    def fsync(self, file: File) -> int:
        return -errno.EINVAL


def do_pipe2(ino: int) -> tuple[File, File]:
    pipe = Pipe()
    inode = Inode(ino=ino, kind="pipe")
    return (File(name="pipe:[r]", f_inode=inode, f_op=PipeEnd(pipe, True), fmode_pread=False,
                 private_data=pipe),
            File(name="pipe:[w]", f_inode=inode, f_op=PipeEnd(pipe, False), fmode_pread=False,
                 private_data=pipe))
