"""The generic page cache paths and a regular (disk-backed) file.

Follows ``mm/filemap.c`` (v5.12 ``generic_file_buffered_read``, ``filemap_fault``,
``generic_perform_write``) and, for the regular file, the behaviour of an
ext4 file on these machines (O_DIRECT pins the user buffer). The kernel
copies page-cache data through its own mapping: consumed poison there is
not MC-safe and halts the machine.

Simplifications: no readahead, no partial-page uptodate tracking, writeback
happens at fsync.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import (
    O_DIRECT,
    AddressSpace,
    File,
    Inode,
    file_check_and_advance_wb_err,
)
from kvmpoison.mm.gup import FOLL, get_user_pages_fast, put_pages
from kvmpoison.mm.memory import ZapDetails, _put_pages_bulk, zap_page_range
from kvmpoison.mm.mm_types import Vma, VmFault, VmFaultInfo
from kvmpoison.mm.page import Page, get_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.uaccess import IovIter, copy_from_user, efault_or
from kvmpoison.outcome import Halt, Kind

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# Returns (pfn or None for a hole, 0 or -errno) for one page index.
PageGetter = Callable[[int], tuple[int | None, int]]


def kernel_read_page(core: MmCore, pfn: int, offset: int, size: int) -> bytes:
    """The kernel reading page-cache data through its direct map (KeyID 0).

    Consumed poison there is not machine-check safe in ``copy_page_to_iter``:
    the host halts.
    """
    got = core.hw.load((pfn << PAGE_SHIFT) + offset, size, 0, Ctx.HOST_KERNEL)
    if got.kind is not Kind.OK:
        raise Halt(got)
    assert got.data is not None
    return got.data


def filemap_read(core: MmCore, inode: Inode, pos: int, to: IovIter, get: PageGetter) -> int:
    """Copy [pos, i_size) into ``to``; short count on a fault, -errno if nothing moved."""
    total = 0
    while to.count and pos < inode.i_size:
        index, offset = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - offset, to.count, inode.i_size - pos)
        pfn, err = get(index)
        if err:
            return total or err
        data = bytes(n) if pfn is None else kernel_read_page(core, pfn, offset, n)
        copied = to.copy_to_iter(data)
        total += copied
        pos += copied
        if copied < n:
            return efault_or(total)
    return total


def generic_perform_write(core: MmCore, inode: Inode, pos: int, src: IovIter,
                          get: PageGetter) -> int:
    """``mm/filemap.c:generic_perform_write``: bytes written, or -errno if none.

    v5.12 first faults the chunk's user bytes in (``iov_iter_fault_in_readable``)
    and fails the chunk with -EFAULT before ``write_begin`` if any is unreadable;
    6.18 copies what it can and keeps a short copy (shmem and uptodate
    ext4 pages accept it in ``write_end``), failing only when nothing moves.
    """
    total = 0
    check_first = core.kcfg.version.tuple < (5, 16)  # 5.16: fault in only if nothing is readable
    while src.count:
        index, offset = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - offset, src.count)
        if check_first and copy_from_user(src.mm, src.cpu, src.addr, n)[1]:
            return efault_or(total)
        pfn, err = get(index)
        if err:
            return total or err
        assert pfn is not None
        data = src.copy_from_iter(n)
        if data:
            core.hw.write((pfn << PAGE_SHIFT) + offset, data, 0)
            core.pages.flags[pfn] |= np.uint32(core.pages.mask(PG.dirty))
        total += len(data)
        pos += len(data)
        inode.i_size = max(inode.i_size, pos)
        if len(data) < n:
            return efault_or(total)
    return total


def unmap_mapping_range(mapping: AddressSpace, first: int, last: int,
                        even_cows: bool = True) -> None:
    """Zap every user mapping of page offsets [first, last) with ``zap_details``.

    ``even_cows`` as in mm/memory.c ``unmap_mapping_pages``: 1 for truncate,
    0 for a hole-punch (private COW copies and, v5.18+, swap-type entries stay).
    """
    for vma in list(mapping.i_mmap):
        lo = max(first, vma.vm_pgoff)
        hi = min(last, vma.vm_pgoff + vma.npages)
        if lo < hi:
            start = vma.vm_start + ((lo - vma.vm_pgoff) << PAGE_SHIFT)
            end = vma.vm_start + ((hi - vma.vm_pgoff) << PAGE_SHIFT)
            zap_page_range(vma, start, end, ZapDetails(even_cows=even_cows))


def truncate_inode_pages_range(core: MmCore, mapping: AddressSpace, first: int, last: int,
                               even_cows: bool = True) -> None:
    """Unmap (``even_cows``: truncate 1, hole-punch 0) and drop the cached pages [first, last).

    The model does in bulk what ``truncate_inode_pages_range`` (mm/truncate.c,
    v5.12) does per pagevec: delete each page from the cache
    (``delete_from_page_cache``) and drop the cache's reference; pages whose last
    reference that was are freed together, as ``release_pages`` frees a batch.
    """
    unmap_mapping_range(mapping, first, last, even_cows)
    idx = mapping.cached_indices()
    idx = idx[(idx >= first) & (idx < last)]
    if not len(idx):
        return
    pfns = mapping.pages[idx].copy()
    mapping.pages[idx] = -1
    core.pages.mapping[pfns] = 0
    mapping.nrpages -= len(pfns)
    _put_pages_bulk(core, pfns)


def partial_page_ranges(lstart: int, lend: int) -> list[tuple[int, int, int]]:
    """(index, from, to) byte ranges to zero in the pages at the edges of [lstart, lend].

    The partial-page step of ``truncate_inode_pages_range`` and
    ``shmem_undo_range`` (v5.12; 6.18's ``truncate_inode_partial_folio`` does
    the same on order-0 folios). ``lend`` is inclusive; -1 means to EOF.
    """
    start = (lstart + PAGE_SIZE - 1) >> PAGE_SHIFT
    partial_start = lstart & (PAGE_SIZE - 1)
    partial_end = 0 if lend == -1 else (lend + 1) & (PAGE_SIZE - 1)
    end = -1 if lend == -1 else (lend + 1) >> PAGE_SHIFT
    out = []
    if partial_start:
        top = PAGE_SIZE
        if end != -1 and start > end:  # both edges fall in one page
            top, partial_end = partial_end, 0
        out.append((start - 1, partial_start, top))
    if partial_end:
        out.append((end, 0, partial_end))
    return out


@dataclass
class FileVmOps:
    """``vm_operations_struct`` whose ``->fault`` is a page getter of the inode."""

    inode: Inode
    fault_page: Callable[[VmFaultInfo], VmFault]

    def fault(self, vmf: VmFaultInfo) -> VmFault:
        return self.fault_page(vmf)


# -- a regular, disk-backed file ----------------------------------------------------------


class RegularFile:
    """``file_operations`` of a regular file on a block filesystem (ext4-like)."""

    def __init__(self, core: MmCore):
        self.core = core

    def _get(self, inode: Inode, create: bool) -> PageGetter:
        core = self.core
        mapping = inode.mapping
        assert mapping is not None

        def get(index: int) -> tuple[int | None, int]:
            pfn = mapping.lookup(index)
            if pfn is not None:
                return pfn, 0
            block = inode.disk.get(index)
            if block is None and not create:
                return None, 0
            page = core.buddy.alloc_pages(0)
            if page is None:
                return None, -errno.ENOMEM
            core.hw.write(page.pfn << PAGE_SHIFT, block or bytes(PAGE_SIZE), 0)
            core.pages.flags[page.pfn] |= np.uint32(core.pages.bits.mask(PG.uptodate, PG.lru))
            mapping.add_to_page_cache(page, index)
            return page.pfn, 0

        return get

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        """``ext4_file_read_iter``: O_DIRECT via iomap (pinned pages), else ``filemap_read``."""
        if file.f_flags & O_DIRECT:
            return self._direct_read(file, pos, to)
        return filemap_read(self.core, file.f_inode, pos, to, self._get(file.f_inode, False))

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        """``ext4_file_write_iter``: O_DIRECT, else ``generic_perform_write``."""
        if file.f_flags & O_DIRECT:
            return self._direct_write(file, pos, src)
        return generic_perform_write(self.core, file.f_inode, pos, src,
                                     self._get(file.f_inode, True))

    def _direct_pin(self, it: IovIter, write_to_user: bool) -> list[Page] | int:
        """``iov_iter_get_pages`` for direct I/O: 512-byte alignment (-EINVAL), then GUP
        (FOLL_WRITE when the device writes to user memory); any page GUP refuses
        fails the whole call.
        """
        if it.addr % 512 or it.count % 512:
            return -errno.EINVAL
        pages: list[Page] = []
        nr = ((it.addr + it.count - 1) >> PAGE_SHIFT) - (it.addr >> PAGE_SHIFT) + 1
        flags = FOLL.WRITE if write_to_user else FOLL(0)
        got = get_user_pages_fast(it.mm, it.addr & ~(PAGE_SIZE - 1), nr, flags, pages)
        if got != nr:
            put_pages(pages)
            return got if got < 0 else -errno.EFAULT
        return pages

    def _direct_read(self, file: File, pos: int, to: IovIter) -> int:
        """DMA from disk straight into the pinned user pages."""
        if pos % 512:
            return -errno.EINVAL
        pages = self._direct_pin(to, write_to_user=True)
        if isinstance(pages, int):
            return pages
        inode = file.f_inode
        n = max(0, min(to.count, inode.i_size - pos))
        data = b"".join(inode.disk.get(i, bytes(PAGE_SIZE))
                        for i in range(pos >> PAGE_SHIFT, ((pos + n - 1) >> PAGE_SHIFT) + 1))
        data = data[pos & (PAGE_SIZE - 1) :][:n]
        self._dma(pages, to.addr, data)
        put_pages(pages)
        return n

    def _direct_write(self, file: File, pos: int, src: IovIter) -> int:
        """iomap direct write: pin the user pages, read them by DMA, store to disk."""
        if pos % 512:
            return -errno.EINVAL
        pages = self._direct_pin(src, write_to_user=False)
        if isinstance(pages, int):
            return pages
        data = self._dma(pages, src.addr, src.count)
        put_pages(pages)
        self._store(file.f_inode, pos, data)
        return len(data)

    def _dma(self, pages: list[Page], addr: int, data: bytes | int) -> bytes:
        """Device access to pinned pages: bytes into memory, or an int count out of it."""
        hw = self.core.hw
        out: list[bytes] = []
        done = 0
        total = len(data) if isinstance(data, bytes) else data
        for page in pages:
            off = (addr + done) & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, total - done)
            if n <= 0:
                break
            pa = (page.pfn << PAGE_SHIFT) + off
            if isinstance(data, bytes):
                hw.write(pa, data[done : done + n], 0)
            else:
                out.append(hw.read(pa, n, 0).data)
            done += n
        return b"".join(out)

    def _store(self, inode: Inode, pos: int, data: bytes) -> None:
        mapping = inode.mapping
        assert mapping is not None
        for i in range(pos >> PAGE_SHIFT, ((pos + len(data) - 1) >> PAGE_SHIFT) + 1):
            block = bytearray(inode.disk.get(i, bytes(PAGE_SIZE)))
            lo = max(pos, i << PAGE_SHIFT)
            hi = min(pos + len(data), (i + 1) << PAGE_SHIFT)
            block[lo - (i << PAGE_SHIFT) : hi - (i << PAGE_SHIFT)] = data[lo - pos : hi - pos]
            inode.disk[i] = bytes(block)
            pfn = mapping.lookup(i)
            if pfn is not None:  # keep the cache coherent with the direct write
                self.core.hw.write(pfn << PAGE_SHIFT, inode.disk[i], 0)
        inode.i_size = max(inode.i_size, pos + len(data))

    def mmap(self, file: File, vma: Vma) -> int:
        # A partial, not a lambda: Machine.copy() deep-copies it with the inode.
        vma.vm_ops = FileVmOps(file.f_inode, functools.partial(self.filemap_fault, file.f_inode))
        return 0

    def filemap_fault(self, inode: Inode, vmf: VmFaultInfo) -> VmFault:
        """``mm/filemap.c:filemap_fault`` (v5.12, 6.18): SIGBUS at or past EOF; the page is
        read from disk into the cache when missing.
        """
        if vmf.pgoff >= inode.nr_pages:
            return VmFault.SIGBUS  # beyond EOF
        pfn, err = self._get(inode, True)(vmf.pgoff)
        if err or pfn is None:
            return VmFault.OOM if err == -errno.ENOMEM else VmFault.SIGBUS
        get_page(self.core.pages[pfn])
        vmf.page = pfn
        return VmFault(0)

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        """``ext4_fallocate`` (v5.12, 6.18) after ``vfs_fallocate``'s checks.

        Simplified: only allocation (KEEP_SIZE or not) and PUNCH_HOLE; COLLAPSE,
        ZERO and INSERT_RANGE are -EOPNOTSUPP here.
        """
        inode = file.f_inode
        if offset < 0 or length <= 0:
            return -errno.EINVAL
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                return -errno.EOPNOTSUPP
            first = (offset + PAGE_SIZE - 1) >> PAGE_SHIFT
            last = (offset + length) >> PAGE_SHIFT
            assert inode.mapping is not None
            self._zero_partial(inode, offset, offset + length - 1)  # ext4_zero_partial_blocks
            truncate_inode_pages_range(self.core, inode.mapping, first, last, even_cows=False)
            for i in range(first, last):
                inode.disk.pop(i, None)
            return 0
        if mode & ~FALLOC_FL_KEEP_SIZE:
            return -errno.EOPNOTSUPP
        if not mode & FALLOC_FL_KEEP_SIZE:
            inode.i_size = max(inode.i_size, offset + length)
        return 0

    def setattr_size(self, file: File, size: int) -> int:
        """``ext4_setattr`` for ATTR_SIZE: drop cached pages and blocks past the new size
        and zero the tail of the last block and page.
        """
        inode = file.f_inode
        if size < 0:
            return -errno.EINVAL
        if size < inode.i_size:
            assert inode.mapping is not None
            self._zero_partial(inode, size, -1)  # ext4_block_truncate_page + the cached page
            first = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
            truncate_inode_pages_range(self.core, inode.mapping, first, 1 << 40)
            for i in [i for i in inode.disk if i >= first]:
                del inode.disk[i]
        inode.i_size = size
        return 0

    def _zero_partial(self, inode: Inode, lstart: int, lend: int) -> None:
        """Zero the partial edge pages of a punched or truncated range, on disk and cached."""
        mapping = inode.mapping
        assert mapping is not None
        for index, lo, hi in partial_page_ranges(lstart, lend):
            block = inode.disk.get(index)
            if block is not None:
                inode.disk[index] = block[:lo] + bytes(hi - lo) + block[hi:]
            pfn = mapping.lookup(index)
            if pfn is not None:
                self.core.hw.write((pfn << PAGE_SHIFT) + lo, bytes(hi - lo), 0)

    def fsync(self, file: File) -> int:
        """Write dirty cached pages back to disk, then report a new writeback error once."""
        inode = file.f_inode
        mapping = inode.mapping
        assert mapping is not None
        mem = self.core.pages
        dirty = np.uint32(mem.mask(PG.dirty))
        for index in mapping.cached_indices():
            pfn = int(mapping.pages[index])
            if mem.flags[pfn] & dirty:
                inode.disk[int(index)] = kernel_read_page(self.core, pfn, 0, PAGE_SIZE)
                mem.flags[pfn] &= ~dirty
        return file_check_and_advance_wb_err(file)
