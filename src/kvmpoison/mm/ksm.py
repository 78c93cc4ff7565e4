"""Kernel samepage merging: ``mm/ksm.c`` (v5.12).

``ksm_madvise`` sets or clears VM_MERGEABLE (MADV_UNMERGEABLE breaks the
range's KSM pages with write faults, as ``unmerge_ksm_pages`` does).
``ksm_do_scan`` is one full pass of ksmd over every mergeable VMA: pages
whose bytes are equal are merged into one write-protected KSM page
(``write_protect_page`` + ``replace_page``), whose ``mapping`` is its stable
node with PAGE_MAPPING_KSM; ``rmap_walk`` then finds every mapping through
the node's rmap items (anon_vma, address).

Simplified: ksmd needs a page's checksum to hold across two scans before it
enters the unstable tree; here equal pages merge in the pass that sees them.
There is no zero-page merging (``use_zero_pages`` is off by default) and no
``max_page_sharing`` chaining. Page bytes are read as the host kernel reads
them: through the direct map, KeyID 0.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvmpoison.arch.x86.pgtable import pfn_pte, pte_pfn_array, pte_present, pte_present_array
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.memory import handle_mm_fault, vm_normal_page
from kvmpoison.mm.mm_types import VM, FaultFlag, Vma, VmFault
from kvmpoison.mm.page import (
    PAGE_MAPPING_ANON,
    PAGE_MAPPING_KSM,
    Page,
    PageKsm,
    SetPageDirty,
    get_page,
    put_page,
)
from kvmpoison.mm.rmap import AnonVma, anon_vma_prepare, page_add_rmap, page_remove_rmap

# VMAs KSM refuses silently (ksm_madvise): shared, special and huge mappings
_KSM_REFUSES = VM.SHARED | VM.MAYSHARE | VM.PFNMAP | VM.IO | VM.DONTEXPAND | VM.HUGETLB \
    | VM.MIXEDMAP


@dataclass(eq=False)
class StableNode:
    """``struct stable_node``: a KSM page and where it is mapped."""

    kpfn: int
    rmap_items: list[tuple[AnonVma, int]] = field(default_factory=list)  # (anon_vma, address)


def ksm_madvise(vma: Vma, start: int, end: int, merge: bool) -> int:
    """MADV_MERGEABLE / MADV_UNMERGEABLE on [start, end) of ``vma`` (v5.12, 6.1).

    A private file mapping is accepted: ksmd merges its anonymous (COWed)
    pages, never its page-cache pages.
    """
    if merge:
        if vma.vm_flags & _KSM_REFUSES:
            return 0  # not an error: KSM just leaves such VMAs alone
        vma.vm_flags |= VM.MERGEABLE
        return 0
    if not vma.vm_flags & VM.MERGEABLE:
        return 0
    for addr in range(start, end, PAGE_SIZE):
        if break_ksm(vma, addr) & VmFault.OOM:
            return -errno.ENOMEM
    vma.vm_flags &= ~VM.MERGEABLE
    return 0


def break_ksm(vma: Vma, addr: int) -> VmFault:
    """``mm/ksm.c:break_ksm`` (v5.12): write-fault a KSM page at ``addr`` so the mapping
    gets its own copy; nothing to do for a non-present entry (hwpoison included)."""
    pte = vma.vm_mm.pgd.get(addr)
    if not pte_present(pte):
        return VmFault(0)
    page = vm_normal_page(vma, pte)
    if page is None or not PageKsm(page):
        return VmFault(0)
    return handle_mm_fault(vma, addr, FaultFlag.WRITE | FaultFlag.USER)


def write_protect_page(vma: Vma, addr: int, page: Page) -> None:
    """``mm/ksm.c:write_protect_page`` (v5.12): make the PTE read-only and clean,
    moving its dirty bit to the page.
    """
    mm = vma.vm_mm
    pte = mm.pgd.get(addr)
    if pte & _PAGE_DIRTY:
        SetPageDirty(page)
    mm.pgd.set(addr, pte & ~(_PAGE_RW | _PAGE_DIRTY))
    mm.core.flush_tlb_range(mm, addr, addr + PAGE_SIZE)


def replace_page(vma: Vma, addr: int, page: Page, kpage: Page) -> None:
    """``mm/ksm.c:replace_page`` (v5.12): point the PTE at ``kpage`` read-only, drop ``page``."""
    mm = vma.vm_mm
    old = mm.pgd.get(addr)
    get_page(kpage)
    page_add_rmap(kpage)
    if old & _PAGE_DIRTY:
        SetPageDirty(page)
    mm.pgd.set(addr, pfn_pte(kpage.pfn, vma.vm_page_prot) & ~_PAGE_RW)  # mk_pte(kpage, prot)
    mm.core.flush_tlb_range(mm, addr, addr + PAGE_SIZE)
    page_remove_rmap(page)
    put_page(page)


def _stable_node(core: MmCore, kpage: Page, vma: Vma, addr: int) -> StableNode:
    """The page's ``stable_node`` (``stable_tree_insert`` for a new KSM page)."""
    mem = core.pages
    if PageKsm(kpage):
        node = mem.registry.decode(int(mem.mapping[kpage.pfn]))
        assert isinstance(node, StableNode)
        return node
    node = StableNode(kpage.pfn)
    node.rmap_items.append((anon_vma_prepare(vma), addr))
    mem.mapping[kpage.pfn] = mem.registry.encode(node, False) | PAGE_MAPPING_KSM
    return node


def _candidates(core: MmCore, vma: Vma) -> Iterator[tuple[int, Page]]:
    """(address, page) of the anon pages of ``vma`` ksmd may merge: KSM pages already, or
    pages mapped once with no extra reference (vectorised over the page tables)."""
    mem = core.pages
    for chunk in vma.vm_mm.pgd.chunks(vma.vm_start, vma.vm_end):
        ptes = core.ptes.rows[chunk.rows, chunk.cols]
        keep = pte_present_array(ptes) & ((ptes & np.uint64(_PAGE_SPECIAL)) == 0)
        pfns = pte_pfn_array(ptes)[keep]
        addrs = chunk.addr[keep]
        tag = mem.mapping[pfns] & PAGE_MAPPING_KSM
        ksm = tag == PAGE_MAPPING_KSM
        exclusive = (tag == PAGE_MAPPING_ANON) & (mem._mapcount[pfns] == 0) \
            & (mem._refcount[pfns] == 1)
        pick = ksm | exclusive
        for addr, pfn in zip(addrs[pick].tolist(), pfns[pick].tolist(), strict=True):
            yield addr, mem[pfn]


def ksm_do_scan(core: MmCore) -> int:
    """One full ``ksm_do_scan`` pass of ksmd (v5.12, simplified as the module says);
    returns how many mappings now share a KSM page they did not."""
    groups: dict[bytes, list[tuple[Vma, int, Page]]] = {}
    for mm in list(core.mms.values()):
        for vma in list(mm.vmas):
            if not vma.vm_flags & VM.MERGEABLE:
                continue
            for addr, page in _candidates(core, vma):
                data = core.hw.read(page.pfn << PAGE_SHIFT, PAGE_SIZE, 0).data
                groups.setdefault(data, []).append((vma, addr, page))
    merged = 0
    for members in groups.values():
        ksm = [m for m in members if PageKsm(m[2])]
        vma0, addr0, kpage = ksm[0] if ksm else members[0]
        if not ksm and len(members) < 2:
            continue
        if not ksm:
            write_protect_page(vma0, addr0, kpage)
        node = _stable_node(core, kpage, vma0, addr0)
        for vma, addr, page in members:
            if page.pfn == kpage.pfn:
                continue
            replace_page(vma, addr, page, kpage)
            node.rmap_items.append((anon_vma_prepare(vma), addr))
            merged += 1
    return merged
