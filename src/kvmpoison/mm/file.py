"""``struct file``, ``struct inode`` and ``struct address_space`` (the page cache).

Follows ``include/linux/fs.h`` and ``include/linux/pagemap.h`` (v5.12). The
page cache of an inode is a numpy array of pfns indexed by page offset
(-1 for a hole), so bulk lookups and inserts are vectorised. ``wb_err`` is
an errseq-style counter: each recorded error bumps it, and a file reports
-EIO once per error it has not seen yet (``file_check_and_advance_wb_err``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.mm.page import Page, PageArray, get_page

if TYPE_CHECKING:
    from kvmpoison.mm.mm_types import Vma
    from kvmpoison.mm.uaccess import IovIter

O_ACCMODE = 0o3
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_NONBLOCK = 0o4000
O_DIRECT = 0o40000
O_CLOEXEC = 0o2000000

AS_EIO = 1 << 0
AS_ENOSPC = 1 << 1
AS_UNEVICTABLE = 1 << 3

IntArray = npt.NDArray[np.int64]


class AddressSpace:
    """The page cache of one inode, plus its ``i_mmap`` VMAs."""

    def __init__(self, host: Inode, mem: PageArray):
        self.host = host
        self.mem = mem
        self.pages: IntArray = np.full(0, -1, dtype=np.int64)
        self.i_mmap: list[Vma] = []
        self.flags = 0
        self.wb_err = 0
        self.wb_err_seen = True  # errseq's SEEN bit
        self.nrpages = 0
        self.thp_cached = False  # a THP was ever cached here (mm/shmem_huge.py): a fast "no"
        # a_ops->error_remove_folio(index): 0 when the page may be truncated (guest_memfd
        # answers MF_DELAYED and keeps it)
        self.error_remove_folio: Callable[[int], int] | None = None

    def _grow(self, nr: int) -> None:
        if nr > len(self.pages):
            grown = np.full(max(nr, 2 * len(self.pages)), -1, dtype=np.int64)
            grown[: len(self.pages)] = self.pages
            self.pages = grown

    def lookup(self, index: int) -> int | None:
        """The pfn cached at ``index``, without taking a reference."""
        if index < 0 or index >= len(self.pages):
            return None
        pfn = int(self.pages[index])
        return None if pfn < 0 else pfn

    def lookup_range(self, first: int, nr: int) -> IntArray:
        self._grow(first + nr)
        return self.pages[first : first + nr]

    def find_get_page(self, index: int) -> Page | None:
        """``find_get_page``: the cached page at ``index`` with a reference, or None."""
        pfn = self.lookup(index)
        if pfn is None:
            return None
        page = self.mem[pfn]
        get_page(page)
        return page

    def add_to_page_cache(self, page: Page, index: int) -> None:
        """Insert a fresh page; the cache keeps the caller's reference as its own."""
        self._grow(index + 1)
        if self.pages[index] >= 0:
            raise AssertionError(f"index {index} is already cached")
        self.pages[index] = page.pfn
        self.mem.mapping[page.pfn] = self.mem.registry.encode(self, False)
        self.mem.index[page.pfn] = index
        self.nrpages += 1

    def add_bulk(self, pfns: IntArray, indices: IntArray) -> None:
        if not len(pfns):
            return
        self._grow(int(indices.max()) + 1)
        self.pages[indices] = pfns
        self.mem.mapping[pfns] = self.mem.registry.encode(self, False)
        self.mem.index[pfns] = indices
        self.nrpages += len(pfns)

    def delete_from_page_cache(self, index: int) -> int | None:
        """Remove and return the pfn at ``index``; the caller drops the cache's reference."""
        pfn = self.lookup(index)
        if pfn is None:
            return None
        self.pages[index] = -1
        self.mem.mapping[pfn] = 0
        self.nrpages -= 1
        return pfn

    def cached_indices(self) -> IntArray:
        return np.flatnonzero(self.pages >= 0)


def mapping_set_error(mapping: AddressSpace, err: int) -> None:
    """Record a writeback error (AS_EIO / AS_ENOSPC and the errseq counter)."""
    mapping.flags |= AS_ENOSPC if err == -errno.ENOSPC else AS_EIO
    mapping.wb_err += 1
    mapping.wb_err_seen = False


def filemap_check_errors(mapping: AddressSpace) -> int:
    """``mm/filemap.c:filemap_check_errors`` (v5.12, 6.1): test and clear AS_ENOSPC and
    AS_EIO; -EIO wins. The errseq counter is left alone, so fsync still reports it."""
    ret = 0
    if mapping.flags & AS_ENOSPC:
        mapping.flags &= ~AS_ENOSPC
        ret = -errno.ENOSPC
    if mapping.flags & AS_EIO:
        mapping.flags &= ~AS_EIO
        ret = -errno.EIO
    return ret


@dataclass(eq=False)
class Inode:
    ino: int
    kind: str  # "shmem", "file", "secretmem", "gmem", "pipe", "proc-mem"
    i_size: int = 0
    mapping: AddressSpace | None = None
    disk: dict[int, bytes] = field(default_factory=dict)  # a regular file's blocks
    noexec: bool = False  # on a noexec mount: mmap(PROT_EXEC) is -EPERM
    private: object = None

    @property
    def nr_pages(self) -> int:
        return (self.i_size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT


class FileOperations(Protocol):
    """The ``struct file_operations`` slots the model dispatches through.

    Each returns bytes moved or ``-errno``; a missing capability is the
    kernel's default answer (e.g. -EINVAL for read on an fd without read_iter).
    """

    def read_iter(self, file: File, pos: int, to: IovIter) -> int: ...
    def write_iter(self, file: File, pos: int, src: IovIter) -> int: ...
    def mmap(self, file: File, vma: Vma) -> int: ...
    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int: ...
    def setattr_size(self, file: File, size: int) -> int: ...
    def fsync(self, file: File) -> int: ...


class NoFileOperations:
    """The kernel's answers for a ``struct file_operations`` whose slots are NULL.

    A file type subclasses this and overrides the operations it has. With the
    slot NULL (fs/read_write.c, fs/open.c, fs/sync.c, mm/mmap.c; v5.12 and
    6.1): ``vfs_read``/``vfs_write`` are -EINVAL (no FMODE_CAN_READ/WRITE,
    which ``do_dentry_open`` sets only for a file with read/read_iter or
    write/write_iter), ``do_mmap`` is -ENODEV (``!file->f_op->mmap``),
    ``vfs_fallocate`` is -EOPNOTSUPP (``!file->f_op->fallocate``; the model does
    not apply its earlier -ENODEV for an inode that is neither regular nor a
    block device), ``do_sys_ftruncate`` is -EINVAL (not S_ISREG) and
    ``vfs_fsync_range`` -EINVAL (``!file->f_op->fsync``).
    """

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        return -errno.EINVAL

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        return -errno.EINVAL

    def mmap(self, file: File, vma: Vma) -> int:
        return -errno.ENODEV

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        return -errno.EOPNOTSUPP

    def setattr_size(self, file: File, size: int) -> int:
        return -errno.EINVAL

    def fsync(self, file: File) -> int:
        return -errno.EINVAL


@dataclass(eq=False)
class File:
    """``struct file``: an open description (shared by dup'ed and inherited fds)."""

    name: str
    f_inode: Inode
    f_op: FileOperations
    f_flags: int = O_RDWR
    f_pos: int = 0
    f_wb_err: int = 0
    fmode_pread: bool = True  # FMODE_PREAD/PWRITE: pread/pwrite allowed (else -ESPIPE)
    private_data: object = None

    @property
    def f_mapping(self) -> AddressSpace | None:
        return self.f_inode.mapping

    def __repr__(self) -> str:
        return f"File({self.name!r})"


def file_check_and_advance_wb_err(file: File) -> int:
    """``mm/filemap.c:file_check_and_advance_wb_err`` (v5.12, 6.18): -EIO once per
    file for each writeback error it has not seen (errseq).
    """
    mapping = file.f_mapping
    if mapping is None or mapping.wb_err == file.f_wb_err:
        return 0
    file.f_wb_err = mapping.wb_err
    mapping.wb_err_seen = True
    return -errno.EIO


def filemap_sample_wb_err(mapping: AddressSpace | None) -> int:
    """errseq_sample at open: an error nobody has seen yet is reported to the new file."""
    if mapping is None:
        return 0
    return mapping.wb_err if mapping.wb_err_seen else 0
