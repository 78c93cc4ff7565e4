"""shmem/tmpfs and memfd: swap-backed page-cache files.

Follows ``mm/shmem.c`` at v5.12 and at 6.18 (read against 6.1's exact tree
and a >= 6.13 copy of the file), per ``KernelConfig.version``:

- neither version's page getter checks PG_hwpoison: a fault on a poisoned
  cached page ends in ``__do_fault``'s VM_FAULT_HWPOISON, and fallocate
  succeeds on it. The RFC's patch 09 (v2) adds the check to
  ``shmem_getpage_gfp`` for every caller (a hook, ``MmHooks``);
- from v5.16 a poisoned page stays in the cache (memory_failure no longer
  truncates it), and ``shmem_file_read_iter``/``shmem_write_begin`` fail it
  with -EIO (the model's 6.18).

Pages are PG_swapbacked, so the RFC may protect them; they are never
swapped out by the model. Huge pages (shmem_enabled, the internal mount's
huge=) are in :mod:`kvmpoison.mm.shmem_huge` and :mod:`kvmpoison.mm.shmem_huge_split`.
Not modelled: swap, seals, splice_read, the i_size/rlimit checks of
``inode_newsize_ok``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from itertools import count

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pfn_pte_array, pte_none_array
from kvmpoison.arch.x86.pgtable_types import _PAGE_ACCESSED, _PAGE_DIRTY, PAGE_SHIFT, PAGE_SIZE
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import AddressSpace, File, Inode
from kvmpoison.mm.filemap import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    filemap_read,
    generic_perform_write,
    partial_page_ranges,
    truncate_inode_pages_range,
)
from kvmpoison.mm.memory import maybe_mkwrite
from kvmpoison.mm.mm_types import VM, VM_FAULT_0, Vma, VmFault, VmFaultInfo
from kvmpoison.mm.page import PageFlag, PageHWPoison, get_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.shmem_huge import (
    mapping_has_thp,
    shmem_getpage_huge,
    shmem_huge_possible,
    thp_head,
)
from kvmpoison.mm.shmem_huge_split import shmem_truncate_range_huge
from kvmpoison.mm.uaccess import IovIter
from kvmpoison.mm.userfaultfd_k import UffdCtx, handle_userfault

MFD_CLOEXEC = 0x1
MFD_ALLOW_SEALING = 0x2
MFD_HUGETLB = 0x4
MFD_NOEXEC_SEAL = 0x8  # v6.3+
MFD_EXEC = 0x10  # v6.3+
MFD_NAME_MAX_LEN = 255 - len("memfd:")

SGP_READ, SGP_CACHE, SGP_WRITE = 0, 1, 2

_inodes = count(1000)
IntArray = npt.NDArray[np.int64]


def new_inode(core: MmCore, kind: str, size: int = 0) -> Inode:
    inode = Inode(ino=next(_inodes), kind=kind, i_size=size)
    inode.mapping = AddressSpace(inode, core.pages)
    return inode


@dataclass
class ShmemVmOps:
    shmem: Shmem
    inode: Inode

    def fault(self, vmf: VmFaultInfo) -> VmFault:
        return self.shmem.shmem_fault(self.inode, vmf)

    def populate_bulk(self, vma: Vma, start: int, end: int, write: bool) -> int:
        return self.shmem.populate_bulk(self.inode, vma, start, end, write)


class Shmem:
    """``shmem_file_operations`` plus the page getter the RFC patches."""

    kind = "shmem"

    def __init__(self, core: MmCore):
        self.core = core

    def _page_flags(self) -> np.uint32:
        return np.uint32(self.core.pages.bits.mask(PG.swapbacked, PG.uptodate, PG.lru))

    def io_checks_poison(self) -> bool:
        """v5.16+ (so 6.1 and 6.18): read_iter and write_begin fail a PageHWPoison page with -EIO.

        (``mm: shmem: don't truncate page if memory failure happens``: the page
        stays in the cache, so its readers and writers must check.)
        """
        return self.core.kcfg.version.tuple >= (5, 16)

    def shmem_getpage_gfp(self, inode: Inode, index: int, sgp: int,
                          vma: Vma | None = None) -> tuple[int | None, int]:
        """(pfn or None for a hole on read, 0 or -errno).

        ``mm/shmem.c:shmem_getpage_gfp`` (v5.12) / ``shmem_get_folio_gfp`` (6.18).
        Neither checks PG_hwpoison: a poisoned cached page is returned, so a
        fault ends in ``__do_fault``'s VM_FAULT_HWPOISON and fallocate succeeds.
        Only the RFC's patch 09 (v2 09/13; folded into v1 7/7) fails it with -EIO
        for every caller.
        A miss may allocate a huge page (:func:`shmem_getpage_huge`, with the faulting
        ``vma``); the pfn returned is then the subpage at ``index``. The RFC's check
        reads PG_hwpoison on the page ``find_lock_entry`` returns, the head of a THP
        (v5.12): a poisoned tail passes it.
        Simplified: no swap-in, no SGP_FALLOC (fallocate uses SGP_WRITE, which
        behaves the same on an order-0 page).
        """
        core = self.core
        mapping = inode.mapping
        assert mapping is not None
        if sgp != SGP_READ and index >= inode.nr_pages and sgp != SGP_WRITE:
            return None, -errno.EINVAL
        pfn = mapping.lookup(index)
        if pfn is not None:
            if core.hooks.shmem_getpage_fails_poisoned \
                    and PageHWPoison(core.pages[thp_head(core, pfn)]):
                return None, -errno.EIO  # RFC v2 09: "Forbid access to poisoned pages"
            return pfn, 0
        if sgp == SGP_READ:
            return None, 0
        sub = shmem_getpage_huge(core, inode, index, sgp, vma)
        if sub >= 0:
            return sub, 0
        page = core.buddy.alloc_pages(0)
        if page is None:
            return None, -errno.ENOMEM
        core.clear_pages(np.array([page.pfn], dtype=np.int64))
        core.pages.flags[page.pfn] |= self._page_flags()
        mapping.add_to_page_cache(page, index)
        return page.pfn, 0

    def _guest_private(self, pfn: int | None) -> bool:
        """The hardened design: is the cached page a guest's private page?"""
        return pfn is not None and self.core.hooks.guest_private and \
            PageFlag(self.core.pages[pfn], PG.guest_private)

    def _get_checked(self, inode: Inode, index: int, sgp: int) -> tuple[int | None, int]:
        pfn, err = self.shmem_getpage_gfp(inode, index, sgp)
        if self._guest_private(pfn):
            return None, -errno.EPERM  # hardened: page-cache I/O refused, not -EIO
        if pfn is not None and self.io_checks_poison() and PageHWPoison(self.core.pages[pfn]):
            return None, -errno.EIO
        return pfn, err

    def read_iter(self, file: File, pos: int, to: IovIter) -> int:
        """``shmem_file_read_iter`` (v5.12; 6.18 adds the PageHWPoison -> -EIO check)."""
        inode = file.f_inode
        return filemap_read(self.core, inode, pos, to,
                            lambda i: self._get_checked(inode, i, SGP_READ))

    def write_iter(self, file: File, pos: int, src: IovIter) -> int:
        """``generic_perform_write`` through ``shmem_write_begin`` (6.18: -EIO on poison)."""
        inode = file.f_inode
        return generic_perform_write(self.core, inode, pos, src,
                                     lambda i: self._get_checked(inode, i, SGP_WRITE))

    def mmap(self, file: File, vma: Vma) -> int:
        vma.vm_ops = ShmemVmOps(self, file.f_inode)
        return 0

    def shmem_fault(self, inode: Inode, vmf: VmFaultInfo) -> VmFault:
        """``mm/shmem.c:shmem_fault`` (v5.12, 6.18): SIGBUS beyond EOF, a missing page of a
        userfaultfd MISSING range to ``handle_userfault``, ``vmf_error`` of the
        getter's errno, else the page with a reference for ``__do_fault`` to check and map.
        """
        if vmf.pgoff >= inode.nr_pages:
            return VmFault.SIGBUS
        ctx = vmf.vma.uffd_ctx
        if vmf.vma.vm_flags & VM.UFFD_MISSING and isinstance(ctx, UffdCtx) and \
                inode.mapping is not None and inode.mapping.lookup(vmf.pgoff) is None:
            return handle_userfault(vmf, ctx)  # shmem_getpage_gfp: no page, userfaultfd_missing
        pfn, err = self.shmem_getpage_gfp(inode, vmf.pgoff, SGP_CACHE, vmf.vma)
        if self._guest_private(pfn):
            return VmFault.SIGBUS  # hardened: a new mapping of a guest-private page
        if err:
            return VmFault.OOM if err == -errno.ENOMEM else VmFault.SIGBUS  # vmf_error
        assert pfn is not None
        get_page(self.core.pages[pfn])
        vmf.page = pfn
        return VM_FAULT_0

    def populate_bulk(self, inode: Inode, vma: Vma, start: int, end: int, write: bool) -> int:
        """Vectorised ``shmem_fault`` + ``finish_fault`` over the none PTEs of [start, end).

        Stops at a PG_hwpoison (or hardened PG_guest_private) page, so the per-page
        fault (``__do_fault``) decides. Where a huge page may be involved
        (:func:`shmem_huge_possible`) nothing is done here: the per-page faults
        allocate and map 2 MiB at a time.
        """
        core = self.core
        mm = vma.vm_mm
        mapping = inode.mapping
        assert mapping is not None
        if mm.pgd.nr_pmd_leaves or shmem_huge_possible(core, inode, vma):
            return start
        limit = vma.vm_start + ((inode.nr_pages - vma.vm_pgoff) << PAGE_SHIFT)
        end = min(end, max(start, limit))
        mem = core.pages
        for chunk in mm.pgd.chunks(start, end, alloc=True):
            store = core.ptes.rows
            ptes = store[chunk.rows, chunk.cols]
            none = pte_none_array(ptes)
            stop = len(ptes) if none.all() else int(np.argmin(none))
            idx = ((chunk.addr[:stop] - vma.vm_start) >> PAGE_SHIFT) + vma.vm_pgoff
            cached = mapping.lookup_range(int(idx[0]), len(idx)).copy() if stop else idx
            if stop:
                stop_bits = mem.mask(PG.hwpoison) | (mem.mask(PG.guest_private)
                                                     if core.hooks.guest_private else 0)
                poisoned = (cached >= 0) & ((mem.flags[np.maximum(cached, 0)]
                                             & np.uint32(stop_bits)) != 0)
                if poisoned.any():
                    stop = int(np.argmax(poisoned))
                    idx, cached = idx[:stop], cached[:stop]
                holes = np.flatnonzero(cached < 0)
                if len(holes):
                    pfns = core.buddy.alloc_pages_bulk(len(holes))
                    if len(pfns) < len(holes):
                        mem._refcount[pfns] = 0
                        core.buddy.free_pages_bulk(pfns)
                        return int(chunk.addr[0])
                    core.clear_pages(pfns)
                    mem.flags[pfns] |= self._page_flags()
                    mapping.add_bulk(pfns, idx[holes])
                    cached[holes] = pfns
                prot = vma.vm_page_prot | _PAGE_ACCESSED
                if write:
                    prot = maybe_mkwrite(prot | _PAGE_DIRTY, vma)
                    mem.flags[cached] |= np.uint32(mem.mask(PG.dirty))
                store[chunk.rows[:stop], chunk.cols[:stop]] = pfn_pte_array(cached, prot)
                mem._mapcount[cached] += 1
                mem._refcount[cached] += 1
                mm.rss_shmem += stop
            if stop < len(ptes):
                return int(chunk.addr[stop])
        return end

    def fallocate(self, file: File, mode: int, offset: int, length: int) -> int:
        """``mm/shmem.c:shmem_fallocate`` (v5.12, 6.18) after ``vfs_fallocate``'s checks.

        Punch-hole unmaps and drops the whole pages and zeroes the partial ones;
        allocation gets each page with the getter (no poison check but the RFC's).
        Simplified: a failed allocation keeps the pages it added (the kernel undoes
        the !uptodate ones), no seals, no ``inode_newsize_ok``.
        """
        inode = file.f_inode
        if offset < 0 or length <= 0:
            return -errno.EINVAL
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            return -errno.EOPNOTSUPP
        mapping = inode.mapping
        assert mapping is not None
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                return -errno.EOPNOTSUPP
            first = (offset + PAGE_SIZE - 1) >> PAGE_SHIFT
            if mapping_has_thp(self.core, mapping):
                shmem_truncate_range_huge(self.core, inode, offset, offset + length - 1,
                                          even_cows=False)
            else:
                truncate_inode_pages_range(self.core, mapping, first,
                                           (offset + length) >> PAGE_SHIFT, even_cows=False)
            self._zero_partial(inode, offset, offset + length - 1)
            return 0
        end = offset + length
        for index in range(offset >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT):
            _, err = self.shmem_getpage_gfp(inode, index, SGP_WRITE)
            if err:
                return err
        if not mode & FALLOC_FL_KEEP_SIZE:
            inode.i_size = max(inode.i_size, end)
        return 0

    def setattr_size(self, file: File, size: int) -> int:
        """``mm/shmem.c:shmem_setattr`` for ATTR_SIZE (v5.12, 6.18): i_size first, then
        unmap and drop the pages past it and zero the tail of the last one.
        """
        inode = file.f_inode
        if size < 0:
            return -errno.EINVAL
        shrink = size < inode.i_size and inode.mapping is not None
        inode.i_size = size  # shmem_setattr: i_size_write before shmem_truncate_range
        if shrink:
            assert inode.mapping is not None
            if mapping_has_thp(self.core, inode.mapping):
                shmem_truncate_range_huge(self.core, inode, size, -1, even_cows=True)
            else:
                truncate_inode_pages_range(self.core, inode.mapping,
                                           (size + PAGE_SIZE - 1) >> PAGE_SHIFT, 1 << 40)
            self._zero_partial(inode, size, -1)
        return 0

    def _zero_partial(self, inode: Inode, lstart: int, lend: int) -> None:
        """``shmem_undo_range``'s partial pages: looked up with SGP_READ, so holes stay holes."""
        for index, lo, hi in partial_page_ranges(lstart, lend):
            pfn, err = self.shmem_getpage_gfp(inode, index, SGP_READ)
            if pfn is None or err or self._guest_private(pfn):
                continue  # hardened: the host never writes into a guest's private page
            self.core.hw.write((pfn << PAGE_SHIFT) + lo, bytes(hi - lo), 0)
            self.core.pages.flags[pfn] |= np.uint32(self.core.pages.mask(PG.dirty))

    def fsync(self, file: File) -> int:
        """``noop_fsync``: shmem has no backing store."""
        return 0


def memfd_create(core: MmCore, name: str, flags: int) -> File | int:
    """``mm/memfd.c:memfd_create`` (v5.12, 6.18): a shmem file.

    6.18 also takes MFD_NOEXEC_SEAL and MFD_EXEC (not both); a name longer than
    MFD_NAME_MAX_LEN is -EINVAL. Simplified: MFD_HUGETLB is -EINVAL (hugetlbfs is
    not modelled; the kernel creates the file), seals are not modelled.
    """
    valid = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB
    if core.kcfg.version.tuple >= (6, 3):
        valid |= MFD_NOEXEC_SEAL | MFD_EXEC
    if flags & ~valid:
        return -errno.EINVAL
    if flags & MFD_EXEC and flags & MFD_NOEXEC_SEAL:
        return -errno.EINVAL
    if len(name.encode()) > MFD_NAME_MAX_LEN:
        return -errno.EINVAL
    if flags & MFD_HUGETLB:
        return -errno.EINVAL  # hugetlbfs is not modelled (the pool here is empty anyway)
    return File(name=f"memfd:{name}", f_inode=new_inode(core, "shmem"), f_op=Shmem(core))


def shmem_zero_setup(core: MmCore, vma: Vma) -> int:
    """MAP_SHARED|MAP_ANONYMOUS: back the VMA with an unnamed shmem file."""
    file = File(name="/dev/zero (deleted)",
                f_inode=new_inode(core, "shmem", vma.vm_end - vma.vm_start), f_op=Shmem(core))
    vma.vm_file = file
    vma.vm_pgoff = 0
    return file.f_op.mmap(file, vma)


__all__ = ["VM", "Shmem", "memfd_create", "new_inode", "shmem_zero_setup"]
