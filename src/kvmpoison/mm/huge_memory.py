"""Anonymous transparent huge pages: PMD-mapped order-9 compound pages.

Follows ``mm/huge_memory.c`` and ``include/linux/huge_mm.h`` of v5.12 (the
RFC's base), with the 6.1 and 6.18 differences gated by version and named:

* the sysfs modes (``/sys/kernel/mm/transparent_hugepage``) as
  :class:`ThpSettings`, read from the running kernel by
  :func:`host_thp_settings` (never written);
* VMA eligibility (``__transparent_hugepage_enabled`` /
  ``transhuge_vma_suitable``; 6.x ``thp_vma_allowable_order``);
* the fault (``do_huge_pmd_anonymous_page``, the huge zero page,
  ``do_huge_pmd_wp_page``, ``huge_pmd_set_accessed``);
* ``zap_huge_pmd`` and ``__split_huge_pmd_locked``.

A THP's head carries the anon rmap (mapping, index) as in the kernel; the
model also writes mapping and index into every tail, so the vectorised PTE
paths that read them per pfn stay right after a split (the kernel reads the
head through ``compound_head``). PMD mappings are counted in
``PageArray.compound_mapcount``; PG_double_map is not kept (its extra
subpage counts cancel out in ``page_mapcount`` anyway). Not modelled:
memcg charging, NUMA hinting on a PMD, the THP vmstat counters, the huge
zero page shrinker (the model allocates it once and keeps it), compaction
(``defrag`` is recorded but an order-9 allocation either finds a free block
or falls back), MMF_DISABLE_THP, DAX, and 6.8+'s smaller mTHP sizes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from errno import EBUSY
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

from kvmpoison.arch.x86.pgtable import (
    pfn_pmd,
    pfn_pte,
    pfn_pte_array,
    pmd_modify,
    pmd_modify_array,
    pmd_pfn,
    pmd_pfn_array,
)
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    PAGE_SHIFT,
    PHYSICAL_PMD_PAGE_MASK,
    PMD_SHIFT,
    PTE_FLAGS_MASK,
)
from kvmpoison.mm.mm_types import (
    FAULT_FLAG_WRITE_I,
    VM,
    VM_FAULT_0,
    Vma,
    VmFault,
    VmFaultInfo,
    vma_is_anonymous,
)
from kvmpoison.mm.page import (
    Page,
    PageArray,
    PageKsm,
    page_mapcount,
    page_mapped,
    put_page,
    total_mapcount,
)
from kvmpoison.mm.page_alloc import sorted_unique
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.rmap import anon_vma_prepare, mapping_encode
from kvmpoison.mm.userfaultfd_k import handle_userfault

if TYPE_CHECKING:
    from kvmpoison.mm.core import MmCore
    from kvmpoison.mm.mm_types import MmStruct
    from kvmpoison.mm.pagetable import _Table

HPAGE_PMD_ORDER = PMD_SHIFT - PAGE_SHIFT  # 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER  # 512
HPAGE_PMD_SIZE = 1 << PMD_SHIFT  # 2 MiB
HPAGE_PMD_MASK = ~(HPAGE_PMD_SIZE - 1)
_VM_WRITE = int(VM.WRITE)
_VM_WRITE_SHARED = int(VM.WRITE | VM.SHARED)

THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"

_ENABLED = ("always", "madvise", "never")
_DEFRAG = ("always", "defer", "defer+madvise", "madvise", "never")
_SHMEM = ("always", "within_size", "advise", "never", "deny", "force")
_PER_SIZE = ("always", "inherit", "madvise", "never")


@dataclass(frozen=True, slots=True)
class ThpSettings:
    """The ``/sys/kernel/mm/transparent_hugepage`` knobs the model honours.

    ``enabled`` is ``transparent_hugepage_flags``' TRANSPARENT_HUGEPAGE_FLAG
    (always) / REQ_MADV_FLAG (madvise); ``pmd_enabled`` is 6.8+'s
    ``hugepages-2048kB/enabled`` (``inherit`` takes ``enabled``; before 6.8
    it does not exist and is read as ``inherit``). ``defrag`` is recorded
    only. Defaults are this machine's (and Debian's): madvise, madvise,
    never, use_zero_page 1.
    """

    enabled: str = "madvise"
    defrag: str = "madvise"
    shmem_enabled: str = "never"
    use_zero_page: bool = True
    pmd_enabled: str = "inherit"

    def __post_init__(self) -> None:
        for name, value, allowed in (("enabled", self.enabled, _ENABLED),
                                     ("defrag", self.defrag, _DEFRAG),
                                     ("shmem_enabled", self.shmem_enabled, _SHMEM),
                                     ("hugepages-2048kB/enabled", self.pmd_enabled, _PER_SIZE)):
            if value not in allowed:
                raise ValueError(f"THP {name} {value!r} is not one of {', '.join(allowed)}")

    @property
    def pmd_mode(self) -> str:
        """The PMD-size mode in force: ``pmd_enabled`` unless it inherits ``enabled``."""
        return self.enabled if self.pmd_enabled == "inherit" else self.pmd_enabled


THP_OFF = ThpSettings(enabled="never", defrag="never", pmd_enabled="inherit")


def parse_thp_choice(text: str) -> str:
    """The bracketed choice of a sysfs THP file (``always [madvise] never`` -> madvise)."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    raise ValueError(f"no [selected] value in {text.strip()!r}")


_SYSFS_FIELDS = (("enabled", "enabled"), ("defrag", "defrag"),
                 ("shmem_enabled", "shmem_enabled"), ("use_zero_page", "use_zero_page"),
                 ("pmd_enabled", "hugepages-2048kB/enabled"))


def thp_settings_from_sysfs(texts: Mapping[str, str]) -> tuple[ThpSettings, tuple[str, ...]]:
    """ThpSettings from the text of the sysfs files (keyed by their name under
    ``transparent_hugepage/``); the second item lists the knobs missing or unreadable,
    which keep the default."""
    default = ThpSettings()
    values: dict[str, object] = {}
    assumed: list[str] = []
    for field, name in _SYSFS_FIELDS:
        try:
            text = texts[name]
            values[field] = (text.strip() == "1" if field == "use_zero_page"
                             else parse_thp_choice(text))
        except (KeyError, ValueError):
            if field != "pmd_enabled":  # absent before 6.8: inherit is what it means
                assumed.append(name)
    merged = {f: values.get(f, getattr(default, f)) for f, _ in _SYSFS_FIELDS}
    return ThpSettings(**merged), tuple(assumed)  # type: ignore[arg-type]


def host_thp_settings(root: str = THP_SYSFS) -> tuple[ThpSettings, tuple[str, ...]]:
    """The running kernel's THP modes, read (never written) from ``root``; the second
    item lists the knobs that could not be read and kept the default."""
    texts = {}
    for _, name in _SYSFS_FIELDS:
        try:
            with open(os.path.join(root, name), encoding="ascii") as f:
                texts[name] = f.read()
        except OSError:
            continue
    return thp_settings_from_sysfs(texts)


# -- eligibility ----------------------------------------------------------------------


def transhuge_vma_suitable(vma: Vma, haddr: int) -> bool:
    """include/linux/huge_mm.h ``transhuge_vma_suitable`` (v5.12; 6.x
    ``thp_vma_suitable_order``): the 2 MiB at ``haddr`` lies inside the VMA, and a
    file VMA's offset is 2 MiB-aligned with its address."""
    if not vma_is_anonymous(vma) and ((vma.vm_start >> PAGE_SHIFT) - vma.vm_pgoff) \
            & (HPAGE_PMD_NR - 1):
        return False
    return haddr >= vma.vm_start and haddr + HPAGE_PMD_SIZE <= vma.vm_end


def __transparent_hugepage_enabled(vma: Vma) -> bool:
    """include/linux/huge_mm.h ``__transparent_hugepage_enabled`` (v5.12), which
    ``__handle_mm_fault`` asks before a huge fault on an anon VMA; 6.18's
    ``thp_vma_allowable_order(vma, vm_flags, TVA_PAGEFAULT, PMD_ORDER)`` decides
    the same for the PMD order (with the per-size knob, 6.8+).

    VM_NOHUGEPAGE refuses; ``always`` allows; ``madvise`` needs VM_HUGEPAGE.
    Not modelled: MMF_DISABLE_THP (prctl), the temporary stack, DAX.
    """
    flags = int(vma.vm_flags)
    if flags & _VM_NOHUGEPAGE:
        return False
    mode = vma.vm_mm.core.thp.pmd_mode
    if mode == "always":
        return True
    return mode == "madvise" and bool(flags & _VM_HUGEPAGE)


thp_vma_allowable_order = __transparent_hugepage_enabled  # the 6.x name


def hugepage_vma_check(vma: Vma) -> bool:
    """mm/huge_memory.c ``transparent_hugepage_enabled`` (v5.12; smaps' THPeligible):
    an anon VMA that holds at least one aligned 2 MiB and whose mode allows THP."""
    if not vma_is_anonymous(vma) or vma.vm_flags & VM.SHARED:
        return False
    addr = (vma.vm_end & HPAGE_PMD_MASK) - HPAGE_PMD_SIZE
    return transhuge_vma_suitable(vma, addr) and __transparent_hugepage_enabled(vma)


_VM_HUGEPAGE, _VM_NOHUGEPAGE = int(VM.HUGEPAGE), int(VM.NOHUGEPAGE)


# -- predicates and the huge zero page --------------------------------------------------


def pmd_trans_huge(pmd: int) -> bool:
    """arch/x86/include/asm/pgtable.h ``pmd_trans_huge`` (v5.12, 6.1): a huge leaf (PSE, not
    devmap)."""
    return bool(pmd & _PAGE_PSE)


def is_huge_zero_pmd(core: MmCore, pmd: int) -> bool:
    """include/linux/huge_mm.h ``is_huge_zero_pmd`` (v5.12: ``huge_zero_pfn == pmd_pfn(pmd)``
    for a present PMD; the model asks for a huge leaf)."""
    return core.huge_zero_pfn >= 0 and pmd_trans_huge(pmd) and pmd_pfn(pmd) == core.huge_zero_pfn


def get_huge_zero_page(core: MmCore) -> int:
    """mm/huge_memory.c ``get_huge_zero_page`` (v5.12; 6.x ``get_huge_zero_folio``):
    the huge zero page's pfn, allocated (zeroed, order 9) on first use; -1 when no
    order-9 block is free. Simplified: never freed (no shrinker)."""
    if core.huge_zero_pfn < 0:
        page = core.buddy.alloc_pages(HPAGE_PMD_ORDER, compound=True)
        if page is None:
            return -1
        core.clear_pages(np.arange(page.pfn, page.pfn + HPAGE_PMD_NR, dtype=np.int64))
        core.huge_zero_pfn = page.pfn
    return core.huge_zero_pfn


def is_huge_zero_pfn(core: MmCore, pfn: int) -> bool:
    """``is_huge_zero_page`` by pfn."""
    return core.huge_zero_pfn >= 0 and pfn == core.huge_zero_pfn


def pmd_page_pfn(pmd: int) -> int:
    """The head pfn a huge PMD maps (``pmd_page``)."""
    return pmd_pfn(pmd)


def mk_huge_pmd(pfn: int, prot: int) -> int:
    """``mk_huge_pmd`` (include/linux/huge_mm.h, v5.12 and 6.1:
    ``pmd_mkhuge(mk_pmd(page, prot))``)."""
    return pfn_pmd(pfn, prot | _PAGE_PSE)


def maybe_pmd_mkwrite(pmd: int, vma: Vma) -> int:
    """mm/huge_memory.c ``maybe_pmd_mkwrite`` (v5.12, 6.1): ``pmd_mkwrite`` if VM_WRITE."""
    return pmd | _PAGE_RW if vma.vm_flags & VM.WRITE else pmd


# -- the fault --------------------------------------------------------------------------


def _thp_anon_rmap(vma: Vma, head: int, haddr: int) -> None:
    """``page_add_new_anon_rmap(page, vma, haddr, true)`` (v5.12): compound mapcount 1,
    the anon_vma and index (written to the tails too, see the module docstring), and
    the anon page flags on the head."""
    core = vma.vm_mm.core
    mem = core.pages
    span = slice(head, head + HPAGE_PMD_NR)
    mem.mapping[span] = mapping_encode(mem, anon_vma_prepare(vma), True)
    mem.index[span] = vma.linear_page_index(haddr) + np.arange(HPAGE_PMD_NR, dtype=np.int64)
    mem.compound_mapcount[head] = 1
    mem.flags[head] |= np.uint32(mem.bits.mask(PG.swapbacked, PG.uptodate, PG.lru, PG.dirty))


def alloc_hugepage_vma(vma: Vma) -> Page | None:
    """``alloc_hugepage_vma(gfp, vma, haddr, HPAGE_PMD_ORDER)`` (include/linux/gfp.h) +
    ``prep_transhuge_page`` (mm/huge_memory.c), both v5.12 (6.x: mm/huge_memory.c
    ``vma_alloc_anon_folio_pmd``): a zeroed order-9 compound page, or None
    (``THP_FAULT_FALLBACK``)."""
    core = vma.vm_mm.core
    page = core.buddy.alloc_pages(HPAGE_PMD_ORDER, compound=True)
    if page is not None:
        core.clear_pages(np.arange(page.pfn, page.pfn + HPAGE_PMD_NR, dtype=np.int64))
    return page


def map_anon_folio_pmd(vma: Vma, head: int, haddr: int) -> None:
    """The mapping half of ``__do_huge_pmd_anonymous_page`` (mm/huge_memory.c, v5.12; 6.18
    ``map_anon_folio_pmd``): rmap, ``set_pmd_at`` of a dirty (writable if the VMA
    is) huge PMD, MM_ANONPAGES += 512. The caller deposited the PTE table."""
    mm = vma.vm_mm
    _thp_anon_rmap(vma, head, haddr)
    entry = maybe_pmd_mkwrite(mk_huge_pmd(head, vma.vm_page_prot) | _PAGE_DIRTY, vma)
    mm.pgd.set_pmd(haddr, entry)
    mm.rss_anon += HPAGE_PMD_NR


def set_huge_zero_page(vma: Vma, haddr: int, zero_pfn: int) -> None:
    """mm/huge_memory.c ``set_huge_zero_page`` (v5.12): deposit a PTE table and map the
    huge zero page read-only (no rmap, no counters). 6.12+ also sets
    ``pmd_mkspecial``; the model tells the zero page by pfn, so it does not."""
    mm = vma.vm_mm
    mm.pgd.pgtable_trans_huge_deposit(haddr)
    mm.pgd.set_pmd(haddr, mk_huge_pmd(zero_pfn, vma.vm_page_prot & ~_PAGE_RW))


def do_huge_pmd_anonymous_page(vmf: VmFaultInfo) -> VmFault:
    """mm/huge_memory.c ``do_huge_pmd_anonymous_page`` + ``__do_huge_pmd_anonymous_page``
    (v5.12; 6.18 the same steps).

    FALLBACK when the aligned 2 MiB is not inside the VMA or no order-9 block is
    free; a read fault maps the huge zero page when ``use_zero_page`` allows it; a
    write maps a new zeroed THP. A userfaultfd MISSING VMA is SIGBUS, as on the
    PTE path (no monitor thread). ``khugepaged_enter`` has nothing to do here:
    collapse runs only when a scenario asks for it.
    """
    vma = vmf.vma
    core = vma.vm_mm.core
    haddr = vmf.address & HPAGE_PMD_MASK
    if not transhuge_vma_suitable(vma, haddr):
        return VmFault.FALLBACK
    anon_vma_prepare(vma)
    missing = bool(vma.vm_flags & VM.UFFD_MISSING) and vma.uffd_ctx is not None
    if not int(vmf.flags) & FAULT_FLAG_WRITE_I and core.thp.use_zero_page:
        zero = get_huge_zero_page(core)
        if zero < 0:
            return VmFault.FALLBACK
        if missing:
            return handle_userfault(vmf, vma.uffd_ctx)  # type: ignore[arg-type]
        set_huge_zero_page(vma, haddr, zero)
        return VM_FAULT_0
    page = alloc_hugepage_vma(vma)
    if page is None:
        return VmFault.FALLBACK
    if missing:
        put_page(page)
        return handle_userfault(vmf, vma.uffd_ctx)  # type: ignore[arg-type]
    vma.vm_mm.pgd.pgtable_trans_huge_deposit(haddr)
    map_anon_folio_pmd(vma, page.pfn, haddr)
    return VM_FAULT_0


def huge_pmd_set_accessed(vmf: VmFaultInfo, orig_pmd: int) -> VmFault:
    """mm/huge_memory.c ``huge_pmd_set_accessed`` (v5.12): young, and dirty on a write."""
    entry = orig_pmd | _PAGE_ACCESSED
    if int(vmf.flags) & FAULT_FLAG_WRITE_I:
        entry |= _PAGE_DIRTY
    vmf.vma.vm_mm.pgd.set_pmd(vmf.address, entry)
    return VM_FAULT_0


def _thp_reusable(core: MmCore, head: int) -> bool:
    """May a write fault reuse the PMD-mapped THP in place?

    v5.12 ``reuse_swap_page``: no KSM and no subpage mapped more than once
    (``page_trans_huge_map_swapcount`` <= 1; GUP references do not count).
    6.1/6.18: ``PageAnonExclusive`` or ``folio_ref_count == 1``; the model keeps no
    AnonExclusive bit, so it asks for one mapping and one reference.
    """
    mem = core.pages
    page = mem[head]
    if core.kcfg.version.tuple >= (5, 19):  # 6.1: AnonExclusive / refcount rule
        return int(mem._refcount[head]) == 1 and page_mapcount(page) == 1
    if PageKsm(page):
        return False
    sub = mem._mapcount[head : head + HPAGE_PMD_NR]
    return int(sub.max()) + 1 + mem.compound_mapcount.get(head, 0) <= 1


def do_huge_zero_wp_pmd(vmf: VmFaultInfo) -> VmFault:
    """mm/huge_memory.c ``do_huge_zero_wp_pmd`` (v6.12+, "mm: Allocate THP on
    hugezeropage wp-fault"): replace the huge zero PMD with a new zeroed THP;
    FALLBACK (split) when none can be allocated. The deposited table stays."""
    vma = vmf.vma
    haddr = vmf.address & HPAGE_PMD_MASK
    page = alloc_hugepage_vma(vma)
    if page is None:
        return VmFault.FALLBACK
    mm = vma.vm_mm
    mm.pgd.pmdp_huge_get_and_clear(haddr)
    mm.core.flush_tlb_range(mm, haddr, haddr + HPAGE_PMD_SIZE)
    map_anon_folio_pmd(vma, page.pfn, haddr)
    return VM_FAULT_0


def do_huge_pmd_wp_page(vmf: VmFaultInfo, orig_pmd: int) -> VmFault:
    """mm/huge_memory.c ``do_huge_pmd_wp_page`` (v5.12; 6.1; 6.18).

    A write to a read-only huge PMD: reuse the THP when :func:`_thp_reusable`
    (young, dirty, writable if the VMA is), else split the PMD and return
    FALLBACK so the fault is handled on the PTE level (``do_wp_page`` copies one
    4 KiB page). The huge zero page: v5.12 and 6.1 split it into 512 small
    zero-page PTEs; from v6.12 a new THP replaces it (:func:`do_huge_zero_wp_pmd`).
    """
    vma = vmf.vma
    mm = vma.vm_mm
    core = mm.core
    haddr = vmf.address & HPAGE_PMD_MASK
    if is_huge_zero_pmd(core, orig_pmd):
        if core.kcfg.version.tuple >= (6, 12):
            ret = do_huge_zero_wp_pmd(vmf)
            if not ret & VmFault.FALLBACK:
                return ret
        __split_huge_pmd(vma, haddr)
        return VmFault.FALLBACK
    head = pmd_page_pfn(orig_pmd)
    if _thp_reusable(core, head):
        entry = maybe_pmd_mkwrite(orig_pmd | _PAGE_ACCESSED | _PAGE_DIRTY, vma)
        mm.pgd.set_pmd(haddr, entry)
        return VmFault.WRITE
    __split_huge_pmd(vma, haddr)
    return VmFault.FALLBACK


# -- zap and split ----------------------------------------------------------------------


def zap_huge_pmd(vma: Vma, haddr: int) -> int:
    """mm/huge_memory.c ``zap_huge_pmd`` (v5.12; 6.18 the same for anon THP): clear
    the PMD, free the deposited table; the huge zero page keeps its (mm-wide)
    reference, an anon THP loses its PMD mapping (``page_remove_rmap(page,
    true)``), 512 MM_ANONPAGES and the mapping's reference. Returns the pages
    unmapped (512, or 0 for the zero page)."""
    if not vma_is_anonymous(vma):  # a page-cache THP: the file branch
        from kvmpoison.mm.shmem_huge import zap_huge_pmd_file
        return zap_huge_pmd_file(vma, haddr)
    mm = vma.vm_mm
    core = mm.core
    orig = mm.pgd.pmdp_huge_get_and_clear(haddr)
    if not orig:
        return 0
    mm.pgd.zap_deposited_table(haddr)
    if is_huge_zero_pmd(core, orig):
        return 0
    head = pmd_page_pfn(orig)
    mem = core.pages
    if orig & _PAGE_DIRTY:
        mem.flags[head] |= np.uint32(mem.mask(PG.dirty))
    page_remove_anon_compound_rmap(core, head)
    mm.rss_anon -= HPAGE_PMD_NR
    put_page(mem[head])
    if core.deferred_split_queue:
        prune_deferred_split_queue(core)
    return HPAGE_PMD_NR


def page_remove_anon_compound_rmap(core: MmCore, head: int) -> None:
    """mm/rmap.c ``page_remove_anon_compound_rmap`` (v5.12): one PMD mapping fewer.
    When the last PMD mapping goes while some subpages stay PTE-mapped, the THP is
    queued for deferred split (``deferred_split_huge_page``)."""
    mem = core.pages
    count = mem.compound_mapcount.get(head, 0)
    if count <= 0:
        raise AssertionError(f"page_remove_rmap: THP {head:#x} is not PMD-mapped")
    if count == 1:
        del mem.compound_mapcount[head]
        if (mem._mapcount[head : head + HPAGE_PMD_NR] >= 0).any():
            deferred_split_huge_page(core, head)
    else:
        mem.compound_mapcount[head] = count - 1


def deferred_split_huge_page(core: MmCore, head: int) -> None:
    """mm/huge_memory.c ``deferred_split_huge_page`` (v5.12; 6.x ``deferred_split_folio``):
    queue a partially mapped anon THP for the shrinker to split later."""
    if head not in core.deferred_split_queue:
        core.deferred_split_queue.append(head)


def deferred_split_ptes_unmapped(core: MmCore, pfns: np.ndarray) -> None:
    """The THP branch of mm/rmap.c ``page_remove_rmap`` for PTE-mapped subpages
    (v5.12): an anon THP subpage that lost its last mapping queues its THP for
    deferred split (called after the mapcounts were dropped)."""
    mem = core.pages
    sub = pfns[(mem.order[pfns] != 0) & ((mem.mapping[pfns] & 1) != 0)]
    sub = sub[mem._mapcount[sub] < 0]
    if not len(sub):
        return
    heads = sub & ~((np.int64(1) << mem.order[sub].astype(np.int64)) - 1)
    for head in sorted_unique(heads).tolist():
        deferred_split_huge_page(core, int(head))


def prune_deferred_split_queue(core: MmCore) -> None:
    """``free_transhuge_page`` (v5.12; 6.x ``folio_undo_large_rmappable``): a THP that
    was freed leaves the deferred split queue."""
    mem = core.pages
    core.deferred_split_queue[:] = [h for h in core.deferred_split_queue
                                    if mem._refcount[h] > 0 and mem.order[h]]


def __split_huge_zero_page_pmd(vma: Vma, haddr: int) -> None:
    """mm/huge_memory.c ``__split_huge_zero_page_pmd`` (v5.12): 512 read-only PTEs of
    the small zero page in the withdrawn table."""
    mm = vma.vm_mm
    core = mm.core
    zero = pfn_pte(core.zero_pfn, vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
    mm.pgd.pmdp_huge_get_and_clear(haddr)
    mm.pgd.pmd_populate_withdrawn(haddr, np.full(HPAGE_PMD_NR, zero, dtype=np.uint64))


def __split_huge_pmd_locked(vma: Vma, haddr: int) -> None:
    """mm/huge_memory.c ``__split_huge_pmd_locked`` (v5.12; 6.18 the same result for a
    present anon THP), vectorised over the 512 PTEs.

    The huge PMD becomes a PTE table (the deposited one) mapping each subpage
    with the PMD's protection: writable only if the PMD was, young if it was;
    dirty moves to the page (v5.12) or also to every PTE (v6.2+, "mm/thp: carry
    over dirty bit when thp splits on pmd"). Each subpage gains a PTE mapping,
    the head 511 references (one per PTE), and the PMD mapping goes
    (``page_remove_rmap`` of the compound mapping, without deferred split: every
    subpage is still mapped).
    """
    if not vma_is_anonymous(vma):  # a page-cache THP: zapped, not split into PTEs
        from kvmpoison.mm.shmem_huge import __split_huge_pmd_locked_file
        __split_huge_pmd_locked_file(vma, haddr)
        return
    mm = vma.vm_mm
    core = mm.core
    orig = mm.pgd.pmd_leaf(haddr)
    if is_huge_zero_pmd(core, orig):
        __split_huge_zero_page_pmd(vma, haddr)
        return
    head = pmd_page_pfn(orig)
    mem = core.pages
    prot = vma.vm_page_prot
    prot = prot | _PAGE_RW if orig & _PAGE_RW and vma.vm_flags & VM.WRITE else prot & ~_PAGE_RW
    if orig & _PAGE_ACCESSED:
        prot |= _PAGE_ACCESSED
    else:
        prot &= ~_PAGE_ACCESSED
    if orig & _PAGE_DIRTY:
        mem.flags[head] |= np.uint32(mem.mask(PG.dirty))
        if core.kcfg.version.tuple >= (6, 2):
            prot |= _PAGE_DIRTY
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
    mm.pgd.pmdp_huge_get_and_clear(haddr)
    mem._refcount[head] += HPAGE_PMD_NR - 1  # page_ref_add(page, HPAGE_PMD_NR - 1)
    mem._mapcount[pfns] += 1
    count = mem.compound_mapcount.get(head, 0)
    if count <= 1:
        mem.compound_mapcount.pop(head, None)
    else:
        mem.compound_mapcount[head] = count - 1
    mm.pgd.pmd_populate_withdrawn(haddr, pfn_pte_array(pfns, prot))


def __split_huge_pmd(vma: Vma, address: int) -> bool:
    """mm/huge_memory.c ``__split_huge_pmd`` (v5.12, freeze=false): split the huge PMD
    mapping ``address`` (TLB flush and mmu notifier over its 2 MiB). False when no
    huge PMD maps it (nothing to do)."""
    mm = vma.vm_mm
    haddr = address & HPAGE_PMD_MASK
    if not pmd_trans_huge(mm.pgd.pmd_leaf(haddr)):
        return False
    __split_huge_pmd_locked(vma, haddr)
    mm.core.flush_tlb_range(mm, haddr, haddr + HPAGE_PMD_SIZE)
    return True


split_huge_pmd = __split_huge_pmd


def split_huge_pmd_address(vma: Vma, address: int) -> bool:
    """mm/huge_memory.c ``split_huge_pmd_address`` (v5.12)."""
    return __split_huge_pmd(vma, address)


def vma_adjust_trans_huge(vma: Vma, addr: int) -> None:
    """mm/huge_memory.c ``vma_adjust_trans_huge`` (v5.12) for one new VMA boundary at
    ``addr``: a huge PMD that would straddle it is split first."""
    if not vma.vm_mm.pgd.nr_pmd_leaves or not addr & ~HPAGE_PMD_MASK:
        return
    haddr = addr & HPAGE_PMD_MASK
    if haddr >= vma.vm_start and haddr + HPAGE_PMD_SIZE <= vma.vm_end:
        split_huge_pmd_address(vma, addr)


def zap_huge_pmd_range(vma: Vma, start: int, end: int) -> int:
    """The PMD half of mm/memory.c ``zap_pmd_range`` (v5.12): a huge PMD wholly inside
    [start, end) is zapped (:func:`zap_huge_pmd`), one the range covers in part is
    split so the PTE zap that follows removes only that part. Returns the pages
    unmapped. The caller flushes the TLB.

    Only the first and the last PMD can be covered in part: they are split one by
    one, and every other huge PMD of the range is zapped in one batch
    (:func:`_zap_huge_pmds`), with the same result as PMD by PMD (a test compares)."""
    mm = vma.vm_mm
    for haddr in dict.fromkeys((start & HPAGE_PMD_MASK, (end - 1) & HPAGE_PMD_MASK)):
        if haddr < start or haddr + HPAGE_PMD_SIZE > end:
            __split_huge_pmd(vma, haddr)  # a huge PMD covered in part (else nothing)
    groups = []
    for table, idx, addrs in mm.pgd.pmd_leaf_slots((start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK,
                                                   end & HPAGE_PMD_MASK):
        vals = table.entries[idx]
        huge = (vals & np.uint64(_PAGE_PSE)) != 0  # non-present PMD entries stay
        if huge.any():
            groups.append((table, idx[huge], addrs[huge], vals[huge]))
    if groups and not vma_is_anonymous(vma):  # page-cache THPs: zap_huge_pmd's file branch
        return sum(zap_huge_pmd(vma, a) for _, _, addrs, _ in groups for a in addrs.tolist())
    return _zap_huge_pmds(vma, groups) if groups else 0


def _zap_huge_pmds(vma: Vma, groups: list[tuple[_Table, np.ndarray, np.ndarray, np.ndarray]]
                   ) -> int:
    """:func:`zap_huge_pmd` for many huge PMDs, given per PMD table as (table, slots,
    addresses, entries), vectorised: clear them, free their deposited tables, drop
    each THP's PMD mapping (deferred split when subpages stay PTE-mapped), 512
    MM_ANONPAGES and the mapping's reference each, freeing the THPs that reach zero
    in one batch."""
    mm = vma.vm_mm
    core = mm.core
    mem = core.pages
    mm.pgd.clear_pmd_leaves([(table, idx, addrs) for table, idx, addrs, _ in groups])
    vals = groups[0][3] if len(groups) == 1 else np.concatenate([g[3] for g in groups])
    heads = pmd_pfn_array(vals)
    real = heads != core.huge_zero_pfn
    heads, vals = heads[real], vals[real]
    if not len(heads):
        return 0
    dirty = heads[(vals & np.uint64(_PAGE_DIRTY)) != 0]
    mem.flags[dirty] |= np.uint32(mem.mask(PG.dirty))
    # page_remove_anon_compound_rmap for every THP at once: the dict is read and
    # updated by C-level map()s over the heads, no bytecode per PMD
    counts = mem.compound_mapcount
    keys = heads.tolist()
    count = np.fromiter(map(counts.get, keys, repeat(0)), dtype=np.int64, count=len(keys))
    if (count <= 0).any():
        bad = int(heads[np.argmax(count <= 0)])
        raise AssertionError(f"page_remove_rmap: THP {bad:#x} is not PMD-mapped")
    gone = count == 1
    lh = heads[gone]
    deque(map(counts.__delitem__, lh.tolist()), maxlen=0)
    if not gone.all():
        counts.update(zip(heads[~gone].tolist(), (count[~gone] - 1).tolist(), strict=True))
    mm.rss_anon -= HPAGE_PMD_NR * len(heads)
    mem._refcount[heads] -= 1  # tlb_remove_page_size: distinct THPs, one reference each
    lh = lh[mem._refcount[lh] > 0]
    if len(lh):  # a THP still referenced may have PTE-mapped subpages: deferred split
        sub = _order9_rows(mem._mapcount)[lh >> HPAGE_PMD_ORDER]
        for head in lh[(sub >= 0).any(axis=1)].tolist():
            deferred_split_huge_page(core, head)
    dead = heads[mem._refcount[heads] == 0]
    if len(dead):
        core.buddy.free_compound_bulk(dead)
    if core.deferred_split_queue:
        prune_deferred_split_queue(core)
    return HPAGE_PMD_NR * len(heads)


# -- split_huge_page ---------------------------------------------------------------------


def can_split_huge_page(core: MmCore, head: int) -> bool:
    """mm/huge_memory.c ``can_split_huge_page`` (v5.12; 6.x ``can_split_folio``): every
    reference is a mapping, plus the one the caller holds (no swap cache here)."""
    mem = core.pages
    return total_mapcount(mem[head]) == int(mem._refcount[head]) - 1


def split_huge_page(core: MmCore, page: Page) -> int:
    """mm/huge_memory.c ``split_huge_page`` -> ``split_huge_page_to_list`` (v5.12; 6.1
    and 6.18 ``split_folio``/``__folio_split`` for an anon PMD-size folio): 0 or -EBUSY.

    The caller holds one reference on the THP (it passes the subpage it wants
    to keep). -EBUSY for a non-anon page (the huge zero page), an anon THP no
    longer mapped (``page_get_anon_vma`` finds no anon_vma), or one with
    references beyond its mappings and the caller's (a GUP pin:
    ``can_split_huge_page``). Otherwise every PMD mapping in every mm is split
    (``unmap_page`` + ``remap_page``), and the 512 subpages become order-0
    pages: each keeps one reference per PTE mapping, ``page`` also the
    caller's; the anon/dirty/uptodate/swapbacked flags are copied from the
    head, PG_hwpoison stays on the subpage that has it; subpages nobody maps
    are freed. The THP leaves the deferred split queue. Not modelled: the
    page lock (the model is single-threaded), PageWriteback, swap cache, and
    6.12+'s remapping of zero-filled subpages to the shared zero page (only the
    deferred-split shrinker asks for it).
    """
    mem = page.mem
    head = page.pfn & ~(HPAGE_PMD_NR - 1) if mem.order[page.pfn] else page.pfn
    if not mem.order[head]:
        return 0
    if mem.mapping[head] and not mem.mapping[head] & 1:  # a page-cache (shmem) THP
        from kvmpoison.mm.shmem_huge_split import split_huge_page_file
        return split_huge_page_file(core, page.pfn, caller_holds_ref=True)
    if not mem.mapping[head] & 1 or is_huge_zero_pfn(core, head):
        return -EBUSY  # file branch: no mapping (the huge zero page)
    av = mem.registry.decode(int(mem.mapping[head]))
    if av is None or not page_mapped(mem[head]):
        return -EBUSY  # page_get_anon_vma
    if not can_split_huge_page(core, head):
        return -EBUSY
    index = int(mem.index[head])
    for vma in list(av.vmas):  # unmap_page: TTU_SPLIT_HUGE_PMD on every mapping
        addr = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
        if vma.vm_start <= addr < vma.vm_end:
            pmd = vma.vm_mm.pgd.pmd_leaf(addr)
            if pmd_trans_huge(pmd) and pmd_pfn(pmd) == head:
                __split_huge_pmd(vma, addr)
    __split_huge_page(core, head, page.pfn)
    return 0


def __split_huge_page(core: MmCore, head: int, keep: int) -> None:
    """mm/huge_memory.c ``__split_huge_page`` + ``__split_huge_page_tail`` (v5.12),
    vectorised: the 512 subpages become order-0 pages (see :func:`split_huge_page`)."""
    mem = core.pages
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
    refs = mem._mapcount[pfns].astype(np.int32) + 1
    refs[keep - head] += 1
    mem._refcount[pfns] = refs
    mem.order[pfns] = 0
    copied = np.uint32(int(mem.flags[head]) & mem.bits.mask(
        PG.swapbacked, PG.uptodate, PG.lru, PG.dirty, PG.referenced, PG.active,
        PG.mlocked, PG.unevictable))
    mem.flags[pfns] = (mem.flags[pfns] & np.uint32(mem.m_hwpoison)) | copied
    mem.compound_mapcount.pop(head, None)
    mem.compound_pincount.pop(head, None)
    if head in core.deferred_split_queue:
        core.deferred_split_queue.remove(head)
    dead = pfns[refs == 0]
    if len(dead):
        core.buddy.free_pages_bulk(dead)


def deferred_split_scan(core: MmCore) -> int:
    """mm/huge_memory.c ``deferred_split_scan`` (v5.12; 6.x the same without the 6.12+
    "underused" zero-page remap): try to split each queued THP, taking a
    reference for the attempt (``get_page``/``put_page``); a THP that cannot be
    split (a GUP pin) stays queued. Returns the number split. The model runs it
    only when asked (a ``deferred_split_scan`` step), never in the background.
    """
    mem = core.pages
    split = 0
    for head in list(core.deferred_split_queue):
        if not mem._refcount[head] or not mem.order[head]:
            core.deferred_split_queue.remove(head)
            continue
        mem._refcount[head] += 1  # get_page
        if split_huge_page(core, mem[head]) == 0:
            split += 1
        put_page(mem[head])
    return split


# -- mprotect, mremap, fork -------------------------------------------------------------


def change_huge_pmd(vma: Vma, haddr: int, newprot: int) -> int:
    """mm/huge_memory.c ``change_huge_pmd`` (v5.12; 6.1 the same; 6.18 adds the
    write upgrade): ``pmd_modify`` the huge PMD to ``newprot``. From v6.2 ("try
    avoiding write faults when changing PMD protection") a private writable VMA's
    exclusive anon THP is made writable at once (``can_change_pmd_writable``;
    the model takes "mapped once" for PageAnonExclusive); the huge zero page never
    is. Returns HPAGE_PMD_NR."""
    mm = vma.vm_mm
    core = mm.core
    old = mm.pgd.pmd_leaf(haddr)
    entry = pmd_modify(old, newprot)
    if (core.kcfg.version.tuple >= (6, 2) and vma.vm_flags & VM.WRITE
            and not vma.vm_flags & VM.SHARED and not entry & _PAGE_RW
            and entry & _PAGE_PRESENT and not is_huge_zero_pmd(core, entry)):
        head = pmd_page_pfn(entry)
        mem = core.pages
        if mem.mapping[head] & 1 and total_mapcount(mem[head]) == 1:
            entry |= _PAGE_RW
    mm.pgd.set_pmd(haddr, entry)
    return HPAGE_PMD_NR


def _thp_mapped_once(mem: PageArray, heads: np.ndarray) -> np.ndarray:
    """``total_mapcount(head) == 1`` for many PMD-mapped THP heads (each one mapped by
    a PMD the caller holds), vectorised. Every mapping holds a reference on the
    head, so a head with a single reference is mapped exactly once, with no look at
    its 512 subpages; only heads with more references (pinned, shared, PTE-mapped
    elsewhere) are counted in full: their compound mapcount plus the subpage
    mapcounts, read 512 at a time as rows of the (order-9 aligned) arrays."""
    once = mem._refcount[heads] == 1
    rest = np.flatnonzero(~once)
    if len(rest):
        hr = heads[rest]
        rows = _order9_rows(mem._mapcount)[hr >> HPAGE_PMD_ORDER]
        counts = np.fromiter(map(mem.compound_mapcount.get, hr.tolist(), repeat(0)),
                             dtype=np.int64, count=len(hr))
        once[rest] = (rows < 0).all(axis=1) & (counts == 1)
    return np.asarray(once, dtype=bool)


def _order9_rows(arr: np.ndarray) -> np.ndarray:
    """A per-pfn array seen as rows of 512 pfns (a view): row ``head >> 9`` is the THP
    at ``head``, so many THPs are gathered or scattered a row at a time."""
    n = len(arr) >> HPAGE_PMD_ORDER
    return arr[: n << HPAGE_PMD_ORDER].reshape(n, HPAGE_PMD_NR)


def change_huge_pmd_range(vma: Vma, start: int, end: int, newprot: int) -> int:
    """The PMD half of mm/mprotect.c ``change_pmd_range`` (v5.12): a huge PMD wholly
    inside [start, end) is changed in place (:func:`change_huge_pmd`), one covered in
    part is split for the PTE pass. Returns the pages changed.

    Vectorised over every huge PMD of the range at once: only the first and the
    last can be covered in part, so they are split one by one; the others are
    gathered from their PMD tables into one array, ``pmd_modify``'d, given the
    6.2+ write upgrade where :func:`change_huge_pmd` would give it, and scattered
    back. The same entries as :func:`change_huge_pmd` PMD by PMD (a test compares).
    """
    mm = vma.vm_mm
    for haddr in dict.fromkeys((start & HPAGE_PMD_MASK, (end - 1) & HPAGE_PMD_MASK)):
        if haddr < start or haddr + HPAGE_PMD_SIZE > end:
            __split_huge_pmd(vma, haddr)  # a huge PMD covered in part (else nothing)
    spans = mm.pgd.pmd_table_spans((start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK,
                                   end & HPAGE_PMD_MASK)
    if not spans:
        return 0
    parts = [table.entries[a : b + 1] for table, a, b in spans]
    vals = parts[0] if len(parts) == 1 else np.concatenate(parts)
    # huge PMDs only: none slots, PTE tables and non-present PMD entries stay as they are
    huge = (vals & np.uint64(_PAGE_PSE)) != 0
    nr = int(np.count_nonzero(huge))
    if not nr:
        return 0
    new = pmd_modify_array(vals, newprot)  # also on the others, whose results are dropped
    core = mm.core
    if (core.kcfg.version.tuple >= (6, 2)
            and int(vma.vm_flags) & _VM_WRITE_SHARED == _VM_WRITE):
        # can_change_pmd_writable: a present, read-only PMD of an exclusive anon THP
        # (not the huge zero page) is made writable at once
        pos = np.flatnonzero(huge & ((new & np.uint64(_PAGE_RW | _PAGE_PRESENT))
                                     == np.uint64(_PAGE_PRESENT)))
        if len(pos):
            heads = ((new[pos] & np.uint64(PHYSICAL_PMD_PAGE_MASK)) >> np.uint64(PAGE_SHIFT)
                     ).astype(np.int64)  # pmd_pfn of present PMDs: never inverted
            mem = core.pages
            anon = (heads != core.huge_zero_pfn) & ((mem.mapping[heads] & 1) != 0)
            pos, heads = pos[anon], heads[anon]
            new[pos[_thp_mapped_once(mem, heads)]] |= np.uint64(_PAGE_RW)
    new = np.where(huge, new, vals)
    at = 0
    for (table, a, b), part in zip(spans, parts, strict=True):
        table.entries[a : b + 1] = new[at : at + len(part)]
        at += len(part)
    return HPAGE_PMD_NR * nr


def move_huge_pmd(vma: Vma, old_addr: int, new_addr: int) -> bool:
    """mm/huge_memory.c ``move_huge_pmd`` (v5.12): move a huge PMD and its deposited
    table to a none PMD slot; soft-dirty set with CONFIG_MEM_SOFT_DIRTY
    (``move_soft_dirty_pmd``). False when the target slot is not none (the
    kernel WARNs and the caller splits)."""
    pgd = vma.vm_mm.pgd
    if not pgd.pmd_none(new_addr):
        return False
    pmd = pgd.pmdp_huge_get_and_clear(old_addr)
    if vma.vm_mm.core.kcfg.mem_soft_dirty:
        pmd |= _PAGE_SOFT_DIRTY
    table = pgd.deposited.pop(old_addr >> PMD_SHIFT, None)
    if table is not None:  # pmd_move_must_withdraw: a file THP has none deposited
        pgd.deposited[new_addr >> PMD_SHIFT] = table
    pgd.set_pmd(new_addr, pmd)
    return True


def move_huge_pmd_range(vma: Vma, old_addr: int, new_addr: int, length: int) -> None:
    """The PMD part of mm/mremap.c ``move_page_tables`` (v5.12): a huge PMD whose whole
    2 MiB moves to a 2 MiB-aligned address moves as one entry, any other is split
    (its PTEs then move one by one)."""
    delta = new_addr - old_addr
    for haddr, pmd in vma.vm_mm.pgd.pmd_leaves(old_addr, old_addr + length):
        if not pmd_trans_huge(pmd):
            continue
        whole = old_addr <= haddr and haddr + HPAGE_PMD_SIZE <= old_addr + length
        if whole and not (haddr + delta) & ~HPAGE_PMD_MASK \
                and move_huge_pmd(vma, haddr, haddr + delta):
            continue
        __split_huge_pmd(vma, haddr)
    vma.vm_mm.core.flush_tlb_range(vma.vm_mm, old_addr, old_addr + length)


def copy_huge_pmd(dst: Vma, src: Vma, haddr: int, pmd: int) -> bool:
    """mm/huge_memory.c ``copy_huge_pmd`` (v5.12; 6.x the same outcome): fork shares a
    huge PMD. The child gets an old, write-protected copy and a deposited table;
    the parent's PMD is write-protected; an anon THP gains a reference, a PMD
    mapping and 512 MM_ANONPAGES in the child; the huge zero page only its mm
    reference. A THP that may be pinned for DMA (``page_maybe_dma_pinned``) in a
    COW mapping is split instead and False returned (-EAGAIN: the PTE copy that
    follows gives the child its own copy of each pinned page).
    """
    if not vma_is_anonymous(dst):  # a file THP: "Skip if can be re-fill on fault"
        return True
    src_mm, dst_mm = src.vm_mm, dst.vm_mm
    core = src_mm.core
    mem = core.pages
    zero = is_huge_zero_pmd(core, pmd)
    if not zero:
        head = pmd_page_pfn(pmd)
        cow = not src.vm_flags & VM.SHARED and src.vm_flags & VM.MAYWRITE
        if cow and mem.compound_pincount.get(head, 0) > 0:  # page_maybe_dma_pinned
            __split_huge_pmd(src, haddr)
            return False
        mem._refcount[head] += 1
        mem.compound_mapcount[head] = mem.compound_mapcount.get(head, 0) + 1
        dst_mm.rss_anon += HPAGE_PMD_NR
    dst_mm.pgd.pgtable_trans_huge_deposit(haddr)
    src_mm.pgd.set_pmd(haddr, pmd & ~_PAGE_RW)
    dst_mm.pgd.set_pmd(haddr, pmd & ~_PAGE_RW & ~_PAGE_ACCESSED)
    return True


def copy_huge_pmd_range(dst: Vma, src: Vma) -> None:
    """The PMD half of mm/memory.c ``copy_pmd_range`` (v5.12): every huge PMD of the
    source VMA goes through :func:`copy_huge_pmd`."""
    for haddr, pmd in src.vm_mm.pgd.pmd_leaves(src.vm_start, src.vm_end):
        if pmd_trans_huge(pmd):
            copy_huge_pmd(dst, src, haddr, pmd)
    src.vm_mm.core.flush_tlb_range(src.vm_mm, src.vm_start, src.vm_end)


# -- queries -----------------------------------------------------------------------------


def huge_pmd_subpage_pte(pmd: int, address: int) -> int:
    """The 4 KiB PTE-shaped view of the huge PMD ``pmd`` at ``address`` (what a TLB
    caches for one 4 KiB of a 2 MiB translation): PSE dropped, pfn of the subpage."""
    sub = (address >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
    prot = pmd & PTE_FLAGS_MASK & ~_PAGE_PSE
    return pfn_pte(pmd_pfn(pmd) + sub, prot)


def thp_pmd_mapping(mm: MmStruct, address: int) -> tuple[int, int] | None:
    """(head pfn, order) of the huge page a present huge PMD maps at ``address`` in
    ``mm``, or None (no PMD leaf: a PTE table or nothing). For KVM's level
    calculation (``transparent_hugepage_adjust`` / ``host_pfn_mapping_level``)."""
    pmd = mm.pgd.pmd_leaf(address)
    if not pmd_trans_huge(pmd):
        return None
    return pmd_pfn(pmd), HPAGE_PMD_ORDER
