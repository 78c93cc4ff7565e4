"""Pipes.

Follows ``fs/pipe.c`` (v5.12 ``pipe_read``/``pipe_write``; 6.18 is the same in
what is modelled here). A pipe is a ring of at most 16 ``pipe_buffer``s. A
write first merges its sub-page remainder into the last buffer when that one
can take it (PIPE_BUF_FLAG_CAN_MERGE), then fills fresh page buffers; a copy
that faults part-way fails the whole chunk with -EFAULT unless earlier chunks
moved data (``if (!ret) ret = -EFAULT``), and the failed chunk stays out of
the pipe. A read copies buffer by buffer; a buffer whose copy faults stays in
the pipe. So a transfer straddling an inaccessible page returns -EFAULT, not a
short count, as measured on this machine.

vmsplice'd buffers hold a reference to the user's page, not a copy
(``user_page_pipe_buf_ops``): a reader sees the page as it is when read.

Simplified: the model never blocks (an empty pipe reads -EAGAIN and a full one
writes -EAGAIN, as with O_NONBLOCK) and does not count readers and writers, so
a read with every writer gone is -EAGAIN where the kernel returns 0, and a
write with no reader left does not raise SIGPIPE/-EPIPE.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import File, Inode, NoFileOperations
from kvmpoison.mm.page import put_page
from kvmpoison.mm.uaccess import IovIter
from kvmpoison.outcome import Halt, Kind

PIPE_DEF_BUFFERS = 16


@dataclass(eq=False)
class PipeBuffer:
    """``struct pipe_buffer``: bytes the pipe owns, or a referenced page (vmsplice)."""

    data: bytearray = field(default_factory=bytearray)  # anon_pipe_buf_ops: owned bytes
    pfn: int | None = None  # user_page_pipe_buf_ops: the gifted page
    offset: int = 0
    len: int = 0
    core: MmCore | None = None
    can_merge: bool = True

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes, read by the kernel (through its mapping for a page)."""
        if self.pfn is None:
            return bytes(self.data[self.offset : self.offset + n])
        assert self.core is not None
        got = self.core.hw.load((self.pfn << PAGE_SHIFT) + self.offset, n, 0, Ctx.HOST_KERNEL)
        if got.kind is not Kind.OK:
            raise Halt(got)  # copy_page_to_iter is not machine-check safe
        assert got.data is not None
        return got.data

    def release(self) -> None:
        if self.pfn is not None and self.core is not None:
            put_page(self.core.pages[self.pfn])


@dataclass(eq=False)
class Pipe:
    """``struct pipe_inode_info``: a ring of at most 16 buffers."""

    bufs: list[PipeBuffer] = field(default_factory=list)
    max_usage: int = PIPE_DEF_BUFFERS

    @property
    def full(self) -> bool:
        return len(self.bufs) >= self.max_usage

    @property
    def data(self) -> bytes:
        """Everything queued, as a reader would get it (a snapshot)."""
        return b"".join(buf.read(buf.len) for buf in self.bufs)

    @data.setter
    def data(self, value: bytes) -> None:
        """Replace the contents with owned bytes, laid out as ``pipe_write`` would."""
        for buf in self.bufs:
            buf.release()
        self.bufs = []
        for i in range(0, len(value), PAGE_SIZE):
            chunk = bytearray(value[i : i + PAGE_SIZE])
            self.bufs.append(PipeBuffer(data=chunk, len=len(chunk)))

    def consume(self, buf: PipeBuffer, n: int) -> None:
        buf.offset += n
        buf.len -= n
        if not buf.len:
            buf.release()
            self.bufs.remove(buf)


def free_pipe_info(pipe: Pipe) -> None:
    """``fs/pipe.c:free_pipe_info`` (v5.12, 6.18), on the last close of a pipe: release every
    buffer (a vmspliced page gets its reference back)."""
    for buf in pipe.bufs:
        buf.release()
    pipe.bufs = []


def pipe_read(pipe: Pipe, to: IovIter) -> int:
    """``fs/pipe.c:pipe_read`` (v5.12, 6.18) with O_NONBLOCK semantics: buffer by buffer;
    a buffer whose copy faults stays and ends the call (-EFAULT if nothing moved).
    """
    if not to.count:
        return 0
    if not pipe.bufs:
        return -errno.EAGAIN
    ret = 0
    while pipe.bufs and to.count:
        buf = pipe.bufs[0]
        chars = min(buf.len, to.count)
        written = to.copy_to_iter(buf.read(chars))
        if written < chars:
            return ret or -errno.EFAULT  # the buffer stays in the pipe
        ret += chars
        pipe.consume(buf, chars)
    return ret


def pipe_write(pipe: Pipe, src: IovIter) -> int:
    """``fs/pipe.c:pipe_write`` (v5.12, 6.18) with O_NONBLOCK semantics: merge the sub-page
    remainder into the last buffer, then fill page buffers; a faulting chunk is
    dropped and ends the call (-EFAULT if nothing moved); a full ring is -EAGAIN.
    """
    if not src.count:
        return 0
    ret = 0
    chars = src.count & (PAGE_SIZE - 1)
    if chars and pipe.bufs:
        last = pipe.bufs[-1]
        if last.can_merge and last.pfn is None and last.offset + last.len + chars <= PAGE_SIZE:
            chunk = src.copy_from_iter(chars)
            if len(chunk) < chars:
                return -errno.EFAULT
            end = last.offset + last.len
            last.data[end : end + chars] = chunk
            last.len += chars
            ret = chars
            if not src.count:
                return ret
    while src.count:
        if pipe.full:
            return ret or -errno.EAGAIN
        want = min(PAGE_SIZE, src.count)
        chunk = src.copy_from_iter(want)
        if len(chunk) < want:
            return ret or -errno.EFAULT  # the new buffer stays empty
        pipe.bufs.append(PipeBuffer(data=bytearray(chunk), len=len(chunk)))
        ret += len(chunk)
    return ret


class PipeEnd(NoFileOperations):
    def __init__(self, pipe: Pipe, readable: bool):
        self.pipe = pipe
        self.readable = readable

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        if not self.readable:
            return -errno.EBADF
        return pipe_read(self.pipe, to)

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        if self.readable:
            return -errno.EBADF
        return pipe_write(self.pipe, src)

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        return -errno.ESPIPE  # vfs_fallocate: S_ISFIFO


def do_pipe2(ino: int) -> tuple[File, File]:
    """``fs/pipe.c:do_pipe2``: the read and write ends of a new pipe (no FMODE_PREAD)."""
    pipe = Pipe()
    inode = Inode(ino=ino, kind="pipe")
    return (File(name="pipe:[r]", f_inode=inode, f_op=PipeEnd(pipe, True), fmode_pread=False,
                 private_data=pipe),
            File(name="pipe:[w]", f_inode=inode, f_op=PipeEnd(pipe, False), fmode_pread=False,
                 private_data=pipe))
