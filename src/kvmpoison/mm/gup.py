"""get_user_pages and friends, and ``access_remote_vm``.

Follows ``mm/gup.c`` and ``mm/memory.c`` (v5.12, with the v6.18 additions
noted): ``__get_user_pages`` walks with ``follow_page_pte`` and faults with
``faultin_page``, stopping at the first failure and returning the count so
far or the error (``i ? i : ret``). ``vm_fault_to_errno`` gives -EHWPOISON
only to callers passing FOLL_HWPOISON. References follow ``try_grab_page``
(v5.12) / ``try_grab_folio`` (v6.18): FOLL_GET one, FOLL_PIN
GUP_PIN_COUNTING_BIAS. The RFC adds FOLL_ALLOW_POISONED, whose hwpoison
branch takes a bare ``get_page`` whatever the caller asked for.

``get_user_pages_fast`` is modelled by the slow path: GUP-fast only
succeeds where the slow path would, and bails out on the same PTEs.
FOLL_* values are v5.12's (v6.2 renumbered the internal ones).
"""

from __future__ import annotations

import enum
import errno

from kvmpoison.arch.x86.pgtable import pte_none, pte_pfn, pte_present, pte_protnone
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_RW,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.mm.core import FollowPoisoned
from kvmpoison.mm.fault import find_vma, vma_lookup
from kvmpoison.mm.guest_private import guest_private_markers
from kvmpoison.mm.huge_memory import (
    HPAGE_PMD_MASK,
    HPAGE_PMD_NR,
    __transparent_hugepage_enabled,
    is_huge_zero_pmd,
    pmd_page_pfn,
    pmd_trans_huge,
)
from kvmpoison.mm.memory import faultin_anon_bulk, handle_mm_fault, vm_normal_page
from kvmpoison.mm.mm_types import (
    VM,
    FaultFlag,
    MmStruct,
    Vma,
    VmFault,
    vma_is_accessible,
    vma_is_anonymous,
)
from kvmpoison.mm.page import (
    Page,
    PageHWPoison,
    SetPageDirty,
    compound_head,
    compound_order,
    put_page,
)
from kvmpoison.mm.swapops import (
    hwpoison_entry_to_pfn,
    is_hwpoison_entry,
    pte_to_swp_entry,
    swp_entry_t,
)
from kvmpoison.outcome import Halt, Kind
from kvmpoison.uapi.errno import EHWPOISON

GUP_PIN_COUNTING_BIAS = 1 << 10


class FOLL(enum.IntFlag):
    WRITE = 0x01
    TOUCH = 0x02
    GET = 0x04
    DUMP = 0x08
    FORCE = 0x10
    NOWAIT = 0x20
    POPULATE = 0x40
    SPLIT = 0x80
    HWPOISON = 0x100
    NUMA = 0x200
    MIGRATION = 0x400
    TRIED = 0x800
    MLOCK = 0x1000
    REMOTE = 0x2000
    COW = 0x4000
    ANON = 0x8000
    LONGTERM = 0x10000
    SPLIT_PMD = 0x20000
    PIN = 0x40000
    FAST_ONLY = 0x80000
    ALLOW_POISONED = 0x100000  # the RFC's patch 08
    MADV_POPULATE = 0x200000  # v6.9+; model value


def vma_is_secretmem(vma: Vma) -> bool:
    return vma.vm_file is not None and vma.vm_file.f_inode.kind == "secretmem"


def is_cow_mapping(flags: VM) -> bool:
    """include/linux/mm.h ``is_cow_mapping`` (v5.12)."""
    return (flags & (VM.SHARED | VM.MAYWRITE)) == VM.MAYWRITE


# Plain-int masks for the hot checks below (IntFlag arithmetic builds enum objects).
_VM_IO_PFNMAP = int(VM.IO | VM.PFNMAP)
_VM_WRITE, _VM_READ, _VM_MAYREAD = int(VM.WRITE), int(VM.READ), int(VM.MAYREAD)
_FOLL_ANON, _FOLL_WRITE, _FOLL_FORCE = int(FOLL.ANON), int(FOLL.WRITE), int(FOLL.FORCE)
_FOLL_HWPOISON = int(FOLL.HWPOISON)
_FOLL_PIN, _FOLL_GET, _FOLL_TOUCH = int(FOLL.PIN), int(FOLL.GET), int(FOLL.TOUCH)
_FOLL_ALLOW_POISONED, _FOLL_NUMA, _FOLL_DUMP = (int(FOLL.ALLOW_POISONED), int(FOLL.NUMA),
                                                 int(FOLL.DUMP))
_FAULT_OOM = int(VmFault.OOM)
_FAULT_HWPOISON = int(VmFault.HWPOISON | VmFault.HWPOISON_LARGE)
_FAULT_SIGBUS_SEGV = int(VmFault.SIGBUS | VmFault.SIGSEGV)
_FAULT_WRITE = int(VmFault.WRITE)
_FOLL_COW, _FOLL_REMOTE = int(FOLL.COW), int(FOLL.REMOTE)
_FOLL_GET_PIN = _FOLL_GET | _FOLL_PIN
_FOLL_GET_TOUCH = _FOLL_GET | _FOLL_TOUCH
_FOLL_POPULATE_ANY = int(FOLL.POPULATE | FOLL.MADV_POPULATE)
_FOLL_MADV_POPULATE = int(FOLL.MADV_POPULATE)
# faultin_page's fault flags, by (FOLL_WRITE, FOLL_REMOTE): built once, not per fault.
_FAULTIN_FLAGS = {(w, r): (FaultFlag.WRITE if w else FaultFlag(0)) | (FaultFlag.REMOTE if r
                                                                      else FaultFlag(0))
                  for w in (False, True) for r in (False, True)}


def check_vma_flags(vma: Vma, gup_flags: FOLL) -> int:
    """mm/gup.c ``check_vma_flags`` (v5.12, plus v5.14's secretmem refusal).

    Not modelled: FOLL_LONGTERM on fsdax, protection keys.
    """
    flags = int(vma.vm_flags)
    foll = int(gup_flags)
    if flags & _VM_IO_PFNMAP:
        return -errno.EFAULT
    if foll & _FOLL_ANON and not vma_is_anonymous(vma):
        return -errno.EFAULT
    if vma_is_secretmem(vma):
        return -errno.EFAULT  # v5.14+: secret memory is never pinned
    if foll & _FOLL_WRITE:
        if not flags & _VM_WRITE:
            if not foll & _FOLL_FORCE:
                return -errno.EFAULT
            if not is_cow_mapping(vma.vm_flags):
                return -errno.EFAULT
    elif not flags & _VM_READ:
        if not foll & _FOLL_FORCE:
            return -errno.EFAULT
        if not flags & _VM_MAYREAD:
            return -errno.EFAULT
    return 0


def vm_fault_to_errno(fault: VmFault, gup_flags: FOLL) -> int:
    """include/linux/mm.h ``vm_fault_to_errno`` (v5.12): -EHWPOISON only for FOLL_HWPOISON."""
    f = int(fault)
    if f & _FAULT_OOM:
        return -errno.ENOMEM
    if f & _FAULT_HWPOISON:
        return -EHWPOISON if int(gup_flags) & _FOLL_HWPOISON else -errno.EFAULT
    if f & _FAULT_SIGBUS_SEGV:
        return -errno.EFAULT
    return 0


def can_follow_write_pte(pte: int, gup_flags: FOLL) -> bool:
    """mm/gup.c ``can_follow_write_pte`` (v5.12): writable, or FOLL_FORCE after the COW
    cycle left a dirty private copy (FOLL_COW). v6.2+'s PageAnonExclusive rule
    is not modelled.
    """
    if pte & _PAGE_RW:
        return True
    foll = int(gup_flags)
    return bool(foll & _FOLL_FORCE and foll & _FOLL_COW and pte & _PAGE_DIRTY)


def _v6_zero_page(head: Page) -> bool:
    """``is_zero_folio`` under FOLL_PIN (6.5; 6.1.y by backport): the zero page is not pinned."""
    return head.pfn == 0 and head.mem.bits.version.tuple >= (6, 1)  # 6.1.y backport


def folio_has_pincount(page: Page) -> bool:
    """Whether a pin counts in the compound pincount instead of GUP_PIN_COUNTING_BIAS.

    v5.12 ``hpage_pincount_available``: compound order > 1; v6.18
    ``folio_has_pincount`` (64-bit): any large folio.
    """
    order = compound_order(compound_head(page))
    if page.mem.bits.version.tuple >= (6, 1):  # 6.1: folio_test_large
        return order >= 1
    return order > 1


def try_grab_page(page: Page, gup_flags: FOLL) -> bool:
    """mm/gup.c ``try_grab_page`` (v5.12) / ``try_grab_folio`` (v6.18).

    FOLL_GET takes one reference; FOLL_PIN takes GUP_PIN_COUNTING_BIAS
    references, or one plus a pincount on a compound page with a pincount
    field (kept in ``PageArray.compound_pincount``). A page with no reference is
    a WARN and a failure (-ENOMEM). v6.18 never pins the shared zero page.
    """
    head = compound_head(page)
    mem = head.mem
    foll = int(gup_flags)
    if not foll & _FOLL_GET_PIN:
        return True
    if mem._refcount[head.pfn] <= 0:
        return False  # WARN_ON_ONCE(page_ref_count(page) <= 0)
    if foll & _FOLL_GET:
        mem._refcount[head.pfn] += 1
    elif not _v6_zero_page(head):
        if folio_has_pincount(head):
            mem._refcount[head.pfn] += 1
            mem.compound_pincount[head.pfn] = mem.compound_pincount.get(head.pfn, 0) + 1
        else:
            mem._refcount[head.pfn] += GUP_PIN_COUNTING_BIAS
    return True


def put_compound_head(page: Page, refs: int, gup_flags: FOLL) -> None:
    """v5.12 ``put_compound_head`` / v6.18 ``gup_put_folio``: drop what a grab took.

    The kernel subtracts ``refs - 1`` and then ``put_page``s, so a page freed
    by the last reference goes back to the allocator. A count that goes
    negative (a pin released on a bare ``get_page`` reference) is what the
    kernel does without CONFIG_DEBUG_VM: the page is never freed.
    """
    head = compound_head(page)
    mem = head.mem
    if int(gup_flags) & _FOLL_PIN:
        if _v6_zero_page(head):
            return
        if not folio_has_pincount(head):
            refs *= GUP_PIN_COUNTING_BIAS
        else:
            left = mem.compound_pincount.get(head.pfn, 0) - refs
            if left > 0:
                mem.compound_pincount[head.pfn] = left
            else:
                mem.compound_pincount.pop(head.pfn, None)
    mem._refcount[head.pfn] -= refs - 1
    put_page(head)


def _follow_hwpoison_entry(vma: Vma, entry: swp_entry_t, gup_flags: FOLL) -> Page | None:
    """The RFC's ``follow_page_pte`` branch for a hwpoison entry (v1 7/7, v2 08/13).

    v2 follows only with FOLL_ALLOW_POISONED; v1's flag test is commented out
    but it still requires ``PageHWPoison(page)`` (an unpoisoned page's entry
    faults, and ``do_swap_page`` restores the PTE). Either way it is a bare
    ``get_page`` and ``goto out``: one reference whatever FOLL_GET/FOLL_PIN
    say, and no FOLL_TOUCH.
    """
    core = vma.vm_mm.core
    mode = core.hooks.follow_poisoned
    if mode is FollowPoisoned.NEVER or not is_hwpoison_entry(entry, core.swap_types):
        return None
    page = core.pages[hwpoison_entry_to_pfn(entry)]
    if mode is FollowPoisoned.WITH_FLAG and not int(gup_flags) & _FOLL_ALLOW_POISONED:
        return None
    if mode is FollowPoisoned.ALWAYS and not PageHWPoison(page):
        return None
    head = compound_head(page)
    head.mem._refcount[head.pfn] += 1  # get_page (VM_BUG_ON only with CONFIG_DEBUG_VM)
    return page


def follow_page_pte(vma: Vma, address: int, gup_flags: FOLL) -> Page | int | None:
    """mm/gup.c ``follow_page_pte`` (v5.12 with the RFC's patch 08).

    The page mapped at ``address`` (referenced per FOLL_GET/PIN through
    :func:`try_grab_page`), None to fault, or -errno. FOLL_TOUCH marks the
    page dirty for a write through a clean PTE (``set_page_dirty``) and
    leaves the PTE alone (``mark_page_accessed`` is not modelled). Only the
    shared zero page is special here; v6.18's ``can_follow_write_pte``
    (PageAnonExclusive instead of FOLL_COW) is not modelled.
    """
    mm = vma.vm_mm
    core = mm.core
    foll = int(gup_flags)
    pte = mm.pgd.get(address)
    if pte_none(pte):
        # no_page_table: a core dump does not fault in holes of anonymous memory
        if foll & _FOLL_DUMP and (vma_is_anonymous(vma) or vma.vm_ops is None):
            return -errno.EFAULT
        return None
    if not pte_present(pte):
        return _follow_hwpoison_entry(vma, pte_to_swp_entry(pte, core.kcfg), gup_flags)
    if pte_protnone(pte) and foll & _FOLL_NUMA:
        return None
    if foll & _FOLL_WRITE and not can_follow_write_pte(pte, gup_flags):
        return None
    normal = vm_normal_page(vma, pte)
    if normal is None and foll & _FOLL_DUMP:
        return -errno.EFAULT  # the zero page is a hole in a core dump
    page = normal if normal is not None else core.pages[pte_pfn(pte)]
    if not try_grab_page(page, gup_flags):
        return -errno.ENOMEM
    if foll & _FOLL_TOUCH and foll & _FOLL_WRITE and not pte & _PAGE_DIRTY:
        SetPageDirty(page)
    return page


def follow_trans_huge_pmd(vma: Vma, address: int, pmd: int, gup_flags: FOLL) -> Page | int | None:
    """mm/huge_memory.c ``follow_trans_huge_pmd`` (v5.12; 6.18 ``follow_huge_pmd``):
    the subpage of the THP a huge PMD maps at ``address``, grabbed on its head
    (:func:`try_grab_page`), None to fault (a write through a read-only PMD that
    ``can_follow_write_pmd`` refuses, a NUMA-hinting PMD), or -errno: -EFAULT for
    the huge zero page under FOLL_DUMP, -ENOMEM when the grab fails. FOLL_TOUCH
    makes the PMD young (dirty too on a write; ``touch_pmd``). FOLL_MLOCK is not
    modelled.
    """
    foll = int(gup_flags)
    core = vma.vm_mm.core
    if foll & _FOLL_WRITE and not can_follow_write_pte(pmd, gup_flags):
        return None
    if foll & _FOLL_DUMP and is_huge_zero_pmd(core, pmd):
        return -errno.EFAULT
    if foll & _FOLL_NUMA and pte_protnone(pmd):
        return None
    head = core.pages[pmd_page_pfn(pmd)]
    if not try_grab_page(head, gup_flags):
        return -errno.ENOMEM
    if foll & _FOLL_TOUCH:
        touched = pmd | _PAGE_ACCESSED | (_PAGE_DIRTY if foll & _FOLL_WRITE else 0)
        if touched != pmd:
            vma.vm_mm.pgd.set_pmd(address, touched)
    return core.pages[head.pfn + ((address & ~HPAGE_PMD_MASK) >> PAGE_SHIFT)]


def follow_pmd_mask(vma: Vma, address: int, gup_flags: FOLL) -> tuple[Page | int | None, int]:
    """mm/gup.c ``follow_pmd_mask`` (v5.12): a huge PMD goes to
    :func:`follow_trans_huge_pmd` (``page_mask`` HPAGE_PMD_NR - 1, so a walk without
    a pages array skips the rest of the 2 MiB), anything else to
    :func:`follow_page_pte` (``page_mask`` 0)."""
    pgd = vma.vm_mm.pgd
    if pgd.nr_pmd_leaves:
        pmd = pgd.pmd_leaf(address)
        if pmd_trans_huge(pmd):
            return follow_trans_huge_pmd(vma, address, pmd, gup_flags), HPAGE_PMD_NR - 1
    return follow_page_pte(vma, address, gup_flags), 0


def faultin_page(vma: Vma, address: int, gup_flags: FOLL) -> tuple[int, FOLL]:
    """mm/gup.c ``faultin_page`` (v5.12): fault the page in; returns (0 or -errno, flags)."""
    foll = int(gup_flags)
    fault_flags = _FAULTIN_FLAGS[bool(foll & _FOLL_WRITE), bool(foll & _FOLL_REMOTE)]
    ret = handle_mm_fault(vma, address, fault_flags)
    err = vm_fault_to_errno(ret, gup_flags)
    if err:
        return err, gup_flags
    if int(ret) & _FAULT_WRITE and not int(vma.vm_flags) & _VM_WRITE:
        gup_flags |= FOLL.COW
    return 0, gup_flags


def _bulk_populate(vma: Vma, start: int, end: int, gup_flags: FOLL) -> int:
    """Vectorised prefix of a populate; returns where the scalar walk resumes."""
    anon = vma_is_anonymous(vma) and not vma.vm_flags & VM.UFFD_MISSING
    if anon and (__transparent_hugepage_enabled(vma) or vma.vm_mm.pgd.pmd_leaves(start, end)):
        return start  # THP: the scalar walk faults (and skips) 2 MiB at a time
    if anon and (gup_flags & FOLL.WRITE or vma_is_accessible(vma)):
        return faultin_anon_bulk(vma, start, end, bool(gup_flags & FOLL.WRITE))
    bulk = getattr(vma.vm_ops, "populate_bulk", None)
    if bulk is not None and not vma.vm_flags & VM.UFFD_MISSING:  # holes go to handle_userfault
        stop: int = bulk(vma, start, end, bool(gup_flags & FOLL.WRITE))
        return stop
    return start


def __get_user_pages(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                     pages: list[Page] | None) -> int:
    """mm/gup.c ``__get_user_pages`` (v5.12): follow or fault each page, stopping at
    the first failure; returns ``i ? i : ret``. MADV_POPULATE's errno
    mapping is v5.14+. Not modelled: stack expansion (``find_extend_vma``).
    """
    if not int(gup_flags) & _FOLL_FORCE:
        gup_flags |= FOLL.NUMA
    foll = int(gup_flags)  # plain int for the tests below (FOLL_COW may join gup_flags later)
    i = 0
    vma: Vma | None = None
    while nr_pages:
        if vma is None or start >= vma.vm_end:
            vma = find_vma(mm, start)
            if vma is None or vma.vm_start > start:
                if foll & _FOLL_MADV_POPULATE:
                    return i or -errno.ENOMEM
                return i or -errno.EFAULT
            ret = check_vma_flags(vma, gup_flags)
            if ret:
                if foll & _FOLL_MADV_POPULATE:
                    return i or -errno.EINVAL  # "incompatible mappings / permissions"
                return i or ret
            if pages is None and foll & _FOLL_POPULATE_ANY:
                stop = _bulk_populate(vma, start, min(vma.vm_end, start + nr_pages * PAGE_SIZE),
                                      gup_flags)
                done = (stop - start) >> PAGE_SHIFT
                i, start, nr_pages = i + done, stop, nr_pages - done
                if not nr_pages:
                    break
                if start >= vma.vm_end:
                    continue
        page, page_mask = follow_pmd_mask(vma, start, gup_flags)
        if page is None and pages is None and foll & _FOLL_POPULATE_ANY \
                and not foll & _FOLL_GET_PIN and mm.core.hooks.guest_private \
                and len(guest_private_markers(mm, start, start + 1)):
            # hardened: a guest-private page is resident and locked in already; populating
            # (mlock, MAP_POPULATE, MADV_POPULATE_*) counts it and touches nothing
            i, start, nr_pages = i + 1, start + PAGE_SIZE, nr_pages - 1
            continue
        if page is None:
            ret, gup_flags = faultin_page(vma, start, gup_flags)
            if ret:
                return i or ret
            continue
        if isinstance(page, int):
            return i or page
        if pages is not None:
            pages.append(page)
            page_mask = 0  # the kernel fills pages[] subpage by subpage
        elif foll & _FOLL_GET_PIN:
            unpin_or_put(page, gup_flags)
        page_increm = min(1 + (~(start >> PAGE_SHIFT) & page_mask), nr_pages)
        i += page_increm
        start += page_increm * PAGE_SIZE
        nr_pages -= page_increm
    return i


def unpin_or_put(page: Page, gup_flags: FOLL) -> None:
    """Release what :func:`try_grab_page` took (``unpin_user_page`` or ``put_page``)."""
    put_compound_head(page, 1, gup_flags)  # it tests FOLL_PIN alone


def get_user_pages(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                   pages: list[Page] | None = None) -> int:
    """mm/gup.c ``get_user_pages`` (v5.12): FOLL_GET | FOLL_TOUCH."""
    return __get_user_pages(mm, start, nr_pages, FOLL(int(gup_flags) | _FOLL_GET_TOUCH), pages)


def get_user_pages_remote(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                          pages: list[Page] | None = None) -> int:
    """mm/gup.c ``get_user_pages_remote`` (v5.12): adds FOLL_REMOTE."""
    return get_user_pages(mm, start, nr_pages, gup_flags | FOLL.REMOTE, pages)


def get_user_pages_fast(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                        pages: list[Page] | None = None) -> int:
    """mm/gup.c ``get_user_pages_fast`` (v5.12), modelled by the slow path: GUP-fast
    bails to it on every PTE it cannot take (non-present, special).
    """
    return get_user_pages(mm, start, nr_pages, gup_flags, pages)


def pin_user_pages(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                   pages: list[Page] | None = None) -> int:
    """mm/gup.c ``pin_user_pages`` (v5.12): FOLL_PIN | FOLL_TOUCH."""
    return __get_user_pages(mm, start, nr_pages, gup_flags | FOLL.PIN | FOLL.TOUCH, pages)


def pin_user_pages_fast(mm: MmStruct, start: int, nr_pages: int, gup_flags: FOLL,
                        pages: list[Page] | None = None) -> int:
    """mm/gup.c ``pin_user_pages_fast`` (v5.12), by the slow path."""
    return pin_user_pages(mm, start, nr_pages, gup_flags, pages)


def unpin_user_pages(pages: list[Page]) -> None:
    """mm/gup.c ``unpin_user_pages``: ``put_compound_head(page, 1, FOLL_PIN)`` each."""
    for page in pages:
        put_compound_head(page, 1, FOLL.PIN)


def unpin_user_pages_dirty_lock(pages: list[Page], make_dirty: bool) -> None:
    """mm/gup.c ``unpin_user_pages_dirty_lock``: mark each page dirty, then unpin it."""
    for page in pages:
        if make_dirty:
            SetPageDirty(page)  # set_page_dirty_lock
        put_compound_head(page, 1, FOLL.PIN)


def put_pages(pages: list[Page]) -> None:
    """``put_page`` on each page (release of FOLL_GET references)."""
    for page in pages:
        put_page(page)


def access_remote_vm(mm: MmStruct, addr: int, data: bytes | int, gup_flags: FOLL) -> bytes | int:
    """mm/memory.c ``__access_remote_vm`` (v5.12): read ``data`` bytes (an int) or write ``data``.

    Returns the bytes read, or the number of bytes written; a page GUP cannot
    get ends the transfer (``vm_ops->access`` for VM_IO/VM_PFNMAP is not
    modelled). A write marks the page dirty (``set_page_dirty_lock``). The
    kernel touches the page through its own mapping (kmap), so consumed
    poison there is not MC-safe.
    """
    write = isinstance(data, bytes)
    total = len(data) if isinstance(data, bytes) else data
    out: list[bytes] = []
    done = 0
    while done < total:
        pages: list[Page] = []
        flags = gup_flags | (FOLL.WRITE if write else FOLL(0))
        if get_user_pages_remote(mm, addr + done, 1, flags, pages) <= 0:
            break
        page = pages[0]
        offset = (addr + done) & (PAGE_SIZE - 1)
        n = min(total - done, PAGE_SIZE - offset)
        pa = (page.pfn << PAGE_SHIFT) | offset
        if isinstance(data, bytes):
            mm.core.hw.write(pa, data[done : done + n], 0)
            SetPageDirty(page)  # set_page_dirty_lock
        else:
            got = mm.core.hw.load(pa, n, 0, Ctx.HOST_KERNEL)
            if got.kind is not Kind.OK:
                put_page(page)
                raise Halt(got)
            assert got.data is not None
            out.append(got.data)
        put_page(page)
        done += n
    return done if write else b"".join(out)


def get_dump_page(mm: MmStruct, addr: int) -> Page | None:
    """A page for the core dump, or None for a hole (FOLL_FORCE|FOLL_DUMP|FOLL_GET)."""
    vma = vma_lookup(mm, addr)
    if vma is None:
        return None
    pages: list[Page] = []
    if __get_user_pages(mm, addr, 1, FOLL.FORCE | FOLL.DUMP | FOLL.GET, pages) < 1:
        return None
    return pages[0]
