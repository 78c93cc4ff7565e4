"""Bulk ``truncate_inode_pages_range`` leaves the state the per-page loop of the kernel
(delete from the page cache, drop the cache's reference) leaves."""

import numpy as np

from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.mm import filemap
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import AddressSpace
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from kvmpoison.mm.mmap import MAP_FIXED, MAP_POPULATE, MAP_SHARED
from kvmpoison.mm.page import get_page, put_page

PAGE = 4096


CALLS: list[int] = []


def per_page(core: MmCore, mapping: AddressSpace, first: int, last: int,
             even_cows: bool = True) -> None:
    """The reference: one page at a time, as the kernel walks its pagevecs."""
    CALLS.append(last - first)
    filemap.unmap_mapping_range(mapping, first, last, even_cows)
    for index in mapping.cached_indices():
        if first <= index < last:
            pfn = mapping.delete_from_page_cache(int(index))
            assert pfn is not None
            put_page(core.pages[pfn])


def punched(bulk: bool, monkeypatch) -> Machine:  # type: ignore[no-untyped-def]
    m = Machine(Config(design="rfc-v2", vm_mem=1 << 20))
    vmm = m.vmm
    assert vmm.ram_fd is not None
    vmm.proc.mmap(vmm.ram_hva, 1 << 20, 3, MAP_SHARED | MAP_FIXED | MAP_POPULATE, vmm.ram_fd)
    mapping = vmm.proc.task.fds[vmm.ram_fd].f_inode.mapping
    assert mapping is not None
    pinned = m.kernel.core.pages[int(mapping.pages[70])]
    get_page(pinned)  # an extra reference (a GUP pin): this page must survive the punch
    if not bulk:
        monkeypatch.setattr(filemap, "truncate_inode_pages_range", per_page)
        import kvmpoison.mm.shmem as shmem
        monkeypatch.setattr(shmem, "truncate_inode_pages_range", per_page)
    ret = vmm.proc.fallocate(vmm.ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             64 * PAGE, 128 * PAGE)
    assert ret.cell == "ret:0"
    monkeypatch.undo()
    return m


def test_bulk_truncate_matches_the_per_page_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bulk, ref = punched(True, monkeypatch), punched(False, monkeypatch)
    assert CALLS  # the reference really ran
    cb, cr = bulk.kernel.core, ref.kernel.core
    for name in ("flags", "_refcount", "_mapcount", "mapping", "index", "order"):
        assert np.array_equal(getattr(cb.pages, name), getattr(cr.pages, name)), name
    assert cb.buddy.nr_free == cr.buddy.nr_free
    mb = bulk.vmm.proc.task.fds[bulk.vmm.ram_fd].f_inode.mapping  # type: ignore[index]
    mr = ref.vmm.proc.task.fds[ref.vmm.ram_fd].f_inode.mapping  # type: ignore[index]
    assert mb is not None and mr is not None
    assert np.array_equal(mb.pages, mr.pages) and mb.nrpages == mr.nrpages
    assert (mb.pages[64:192] == -1).all() and mb.nrpages == 256 - 128
    assert np.array_equal(cb.ptes.rows, cr.ptes.rows)
