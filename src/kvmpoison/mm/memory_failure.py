"""memory_failure() for real hardware memory errors, and unpoison_memory().

Follows ``mm/memory-failure.c`` (v5.12 flow, with the v6.x differences the
model honours: an already-poisoned page returns -EHWPOISON instead of 0 and,
for an action-required error, ``kill_accessing_process`` signals the current
task; shmem keeps a poisoned page in its cache, ``TTU_HWPOISON`` replaces
``TTU_IGNORE_HWPOISON``, and unpoison refuses with -EOPNOTSUPP once a real
hardware error was seen). Kill policy: ``collect_procs`` gathers mappers
for early kill (sysctl, or MF_ACTION_REQUIRED for the current task);
``kill_procs`` sends BUS_MCEERR_AR to the current task on an action-required
error and BUS_MCEERR_AO to the others, or SIGKILL when the unmap failed on a
dirty page. Late-kill tasks get BUS_MCEERR_AR when they next touch the page.

An anonymous THP is split first (``try_to_split_thp_page``); when that fails
(a GUP pin), v5.12 and 6.1 give up ("unsplit thp", Ignored, -EBUSY) leaving
the THP mapped and nobody signalled, and v6.11+ signals the mappers at once
(``kill_procs_now``) and returns -EHWPOISON. Not modelled: hugetlb, KSM,
soft-offline migration, page-type filters.
"""

from __future__ import annotations

import enum
import errno
import functools
import signal
from dataclasses import dataclass

import numpy as np

from kvmpoison.arch.x86.pgtable import pte_none_array, pte_pfn_array, pte_present_array
from kvmpoison.arch.x86.pgtable_64 import __swp_offset_array, __swp_type_array
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import mapping_set_error
from kvmpoison.mm.huge_memory import split_huge_page
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import (
    Page,
    PageAnon,
    PageBuddy,
    PageDirty,
    PageFlag,
    PageHWPoison,
    PageKsm,
    TestClearPageHWPoison,
    TestSetPageHWPoison,
    get_page,
    lock_page,
    page_count,
    page_mapped,
    page_mapping,
    put_page,
    unlock_page,
)
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.rmap import TTU, TTU_HWPOISON, rmap_walk, try_to_unmap
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import BusCode, SigInfo

MF_COUNT_INCREASED = 1 << 0
MF_ACTION_REQUIRED = 1 << 1
MF_MUST_KILL = 1 << 2
MF_SOFT_OFFLINE = 1 << 3
MF_SW_SIMULATED = 1 << 5


class MfResult(enum.Enum):
    IGNORED = "Ignored"
    FAILED = "Failed"
    DELAYED = "Delayed"
    RECOVERED = "Recovered"


@dataclass(frozen=True, slots=True)
class MfReport:
    """The log line ``action_result`` prints: what the page was and what happened."""

    pfn: int
    page_type: str
    result: MfResult


def _report(core: MmCore, pfn: int, kind: str, result: MfResult) -> int:
    """``action_result`` (v5.12, 6.18): log the outcome; 0 for Recovered/Delayed, else -EBUSY."""
    core.mf_reports.append(MfReport(pfn, kind, result))
    return 0 if result in (MfResult.RECOVERED, MfResult.DELAYED) else -errno.EBUSY


def _take_off_buddy(core: MmCore, page: Page) -> bool:
    """``take_page_off_buddy`` + ``page_ref_inc`` (v5.10+, so v5.12 and 6.18).

    A free page: pull its buddy block apart so the poisoned page never
    returns; the poisoned page keeps one reference (unpoison gives it back).
    """
    mem = core.pages
    for order in range(11):
        head = page.pfn & ~((1 << order) - 1)
        if PageBuddy(mem[head]) and int(mem.order[head]) == order:
            mem.flags[head] = 0
            mem.order[head] = 0
            core.buddy.nr_free -= 1 << order
            rest = [p for p in range(head, head + (1 << order)) if p != page.pfn]
            mem._refcount[np.array(rest, dtype=np.int64)] = 0
            core.buddy.free_pages_bulk(np.array(rest, dtype=np.int64))
            mem.flags[page.pfn] |= np.uint32(mem.mask(PG.hwpoison))
            mem._refcount[page.pfn] = 1  # page_ref_inc
            return True
    return False


def collect_procs(core: MmCore, page: Page, force_early: bool,
                  current_pid: int | None) -> list[tuple[int, int]]:
    """``mm/memory-failure.c:collect_procs`` (v5.12, 6.18): (pid, address) of each process
    mapping the page that is killed early: all with the early-kill sysctl, else only
    the current task for an action-required error (``task_early_kill``). No
    PR_MCE_KILL per-task policy."""
    out = []
    for vma, addr in rmap_walk(page):
        pid = vma.vm_mm.owner_pid
        early = core.sysctl_memory_failure_early_kill or (force_early and pid == current_pid)
        if early:
            out.append((pid, addr))
    return out


def kill_procs(core: MmCore, tokill: list[tuple[int, int]], forcekill: bool, fail: bool,
               flags: int, current_pid: int | None) -> None:
    """``mm/memory-failure.c:kill_procs`` (v5.12, 6.18): with ``forcekill`` (a dirty page
    or MF_MUST_KILL), SIGKILL when unmapping failed, else ``kill_proc``: BUS_MCEERR_AR
    to the current task on an action-required error, BUS_MCEERR_AO to the others.
    Simplified: the AO signal is forced like the AR one (no ignored SIGBUS).
    """
    if not forcekill or core.send_signal is None:
        return
    for pid, addr in tokill:
        if fail:
            core.send_signal(pid, SigInfo(signal.SIGKILL, 0, addr))
        elif flags & MF_ACTION_REQUIRED and pid == current_pid:
            core.send_signal(pid, SigInfo(signal.SIGBUS, BusCode.BUS_MCEERR_AR, addr, PAGE_SHIFT))
        else:
            core.send_signal(pid, SigInfo(signal.SIGBUS, BusCode.BUS_MCEERR_AO, addr, PAGE_SHIFT))


def hwpoison_user_mappings(core: MmCore, page: Page, flags: int,
                           current_pid: int | None) -> bool:
    """``mm/memory-failure.c:hwpoison_user_mappings`` (v5.12, 6.1): unmap and kill.

    A KSM page is refused ("can't handle KSM pages"): unmapping fails.
    """
    if not page_mapped(page):
        return True
    if PageKsm(page):
        core.dmesg.append(f"Memory failure: {page.pfn:#x}: can't handle KSM pages.")
        return False  # nobody is collected or killed; the page stays mapped
    modern = core.kcfg.version.tuple >= (6, 0)  # TTU_HWPOISON, not TTU_IGNORE_HWPOISON
    ttu = TTU.IGNORE_MLOCK | (TTU.SYNC | TTU_HWPOISON if modern else TTU(0))
    kill = True
    mapping = page_mapping(page)
    if mapping is not None and not PageDirty(page) and not flags & MF_MUST_KILL and \
            getattr(mapping.host, "kind", "") == "file":
        kill = False  # "corrupted page was clean: dropped without side effects"
        ttu = (ttu & ~TTU_HWPOISON) if modern else ttu | TTU.IGNORE_HWPOISON
    tokill = collect_procs(core, page, bool(flags & MF_ACTION_REQUIRED), current_pid) if kill \
        else []
    unmapped = try_to_unmap(page, ttu)
    forcekill = PageDirty(page) or bool(flags & MF_MUST_KILL)
    kill_procs(core, tokill, forcekill, not unmapped, flags, current_pid)
    return unmapped


def _page_action(core: MmCore, page: Page) -> int:
    """``identify_page_state`` + ``page_action`` (v5.12, 6.18) for an LRU page no longer mapped.

    Anonymous: Recovered. Page cache: a dirty page sets AS_EIO/wb_err; the page
    leaves the cache (``truncate_error_page``) except shmem from 5.16 (the model's
    6.18), which keeps it. From 5.16 ``has_extra_refcount`` fails a page-cache page
    still referenced beyond memory_failure's own reference (and the cache's, for a
    kept shmem page): MF_FAILED, -EBUSY. Simplified: swap cache, huge pages and
    guest_memfd's ``error_remove_folio`` (6.18 keeps the folio) are not modelled.
    """
    pfn = page.pfn
    if PageAnon(page):
        return _report(core, pfn, "dirty LRU page" if PageDirty(page) else "clean LRU page",
                       MfResult.RECOVERED)
    mapping = page_mapping(page)
    if mapping is None:
        return _report(core, pfn, "unknown page", MfResult.FAILED)
    dirty = PageDirty(page)
    if dirty:
        mapping_set_error(mapping, -errno.EIO)
    remove = mapping.error_remove_folio  # truncate_error_folio: the a_ops hook first
    if remove is not None and remove(int(core.pages.index[pfn])):
        return _report(core, pfn, "clean LRU page", MfResult.FAILED)
    kind = getattr(mapping.host, "kind", "")
    keep = kind == "shmem" and core.kcfg.version.tuple >= (5, 16)
    if not keep:  # truncate_error_page: the page leaves the page cache
        index = int(core.pages.index[pfn])
        if mapping.delete_from_page_cache(index) is not None:
            put_page(page)
    result = MfResult.RECOVERED
    if core.kcfg.version.tuple >= (5, 16) and page_count(page) - 1 - int(keep) > 0:
        result = MfResult.FAILED  # "still referenced by N users"
    return _report(core, pfn, "dirty LRU page" if dirty else "clean LRU page", result)


def _find_pfn_in_mm(core: MmCore, mm: MmStruct, pfn: int) -> int | None:
    """The lowest address whose PTE maps ``pfn`` or is a hwpoison entry for it.

    ``hwpoison_pte_range``/``check_hwpoisoned_entry`` over every VMA
    (``hwpoison_test_walk`` accepts VM_PFNMAP too), vectorised per chunk.
    """
    types = core.swap_types
    for vma in sorted(mm.vmas, key=lambda v: v.vm_start):
        for chunk in mm.pgd.chunks(vma.vm_start, vma.vm_end):
            ptes = core.ptes.rows[chunk.rows, chunk.cols]
            present = pte_present_array(ptes)
            hit = present & (pte_pfn_array(ptes) == pfn)
            if types.hwpoison is not None:
                swap = ~present & ~pte_none_array(ptes)
                kind = __swp_type_array(ptes).astype(np.int64)
                off = __swp_offset_array(ptes).astype(np.int64)
                hit |= swap & (kind == types.hwpoison) & (off == pfn)
            if hit.any():
                return int(chunk.addr[int(np.argmax(hit))])
    return None


def kill_accessing_process(core: MmCore, current_pid: int | None, pfn: int, flags: int) -> int:
    """``mm/memory-failure.c:kill_accessing_process`` (since 5.13; 6.18 as read in 6.1.y).

    An action-required error on a page that is already poisoned: walk the
    current task's page tables for the page and send it SIGBUS
    BUS_MCEERR_AR (``kill_proc``) at the first address found. -EHWPOISON
    when a signal went out, 0 when the task does not map the page (the
    6.1.y/6.18 return; 5.13-6.0 returned -EFAULT there), -EFAULT without an mm.
    """
    mm = next((m for m in core.mms.values() if current_pid is not None
               and m.owner_pid == current_pid), None)
    if mm is None:
        return -errno.EFAULT
    addr = _find_pfn_in_mm(core, mm, pfn)
    if addr is None:
        return 0
    assert current_pid is not None
    kill_procs(core, [(current_pid, addr)], True, False, flags | MF_ACTION_REQUIRED, current_pid)
    return -EHWPOISON


def try_to_split_thp_page(core: MmCore, page: Page) -> int:
    """mm/memory-failure.c ``try_to_split_thp_page`` (v5.12; 6.1 the same result):
    ``split_huge_page`` of an anon THP (a non-anon one, such as the huge zero page,
    is -EBUSY: "non anonymous thp"); on failure the caller's reference goes
    (``put_page`` here in v5.12 and 6.1, by the caller from v6.11)."""
    if not PageAnon(page):
        core.dmesg.append(f"Memory failure: {page.pfn:#x}: non anonymous thp")
        return -errno.EBUSY
    ret = split_huge_page(core, page)
    if ret:
        core.dmesg.append(f"Memory failure: {page.pfn:#x}: thp split failed")
    return ret


def _unsplit_thp(core: MmCore, page: Page, flags: int, current_pid: int | None) -> int:
    """memory_failure's "unsplit thp" exit. v5.12/6.1: drop the reference, report
    Ignored, -EBUSY: the THP stays mapped with PG_hwpoison on the subpage, nobody is
    signalled. v6.11+ ("send SIGBUS in the event of thp split fail"):
    ``kill_procs_now`` signals the early-kill mappers (the current task for an
    action-required error), then Failed and -EHWPOISON."""
    pfn = page.pfn
    if core.kcfg.version.tuple >= (6, 11):
        tokill = collect_procs(core, page, bool(flags & MF_ACTION_REQUIRED), current_pid)
        kill_procs(core, tokill, True, False, flags, current_pid)
        put_page(page)
        _report(core, pfn, "unsplit thp", MfResult.FAILED)
        return -EHWPOISON
    put_page(page)
    return _report(core, pfn, "unsplit thp", MfResult.IGNORED)


def memory_failure(core: MmCore, pfn: int, flags: int, current_pid: int | None = None) -> int:
    """Handle a hardware error on ``pfn``: poison, unmap, kill, isolate. 0 or -errno.

    ``mm/memory-failure.c:memory_failure`` (v5.12 and 6.18). The int is the
    kernel's: for a page that already has PG_hwpoison, v5.12 returns 0 and
    does nothing else ("already hardware poisoned"); v5.13+ returns -EHWPOISON,
    or with MF_ACTION_REQUIRED what ``kill_accessing_process`` returns (it
    sends the current task SIGBUS BUS_MCEERR_AR), and drops the reference of
    MF_COUNT_INCREASED. ``current_pid`` is ``current``: the task that
    consumed the poison, None for a kernel context.
    """
    if not core.kcfg.memory_failure:
        return -errno.ENXIO
    if not 0 < pfn < core.pages.nr_pages:
        return -errno.ENXIO  # "memory outside kernel control"
    page = core.pages[pfn]
    if not flags & MF_SW_SIMULATED:
        core.hw_memory_failure = True
    if TestSetPageHWPoison(page):
        if core.kcfg.version.tuple < (5, 13):
            _report(core, pfn, "already poisoned", MfResult.IGNORED)
            return 0
        res = -EHWPOISON
        if flags & MF_ACTION_REQUIRED:
            res = kill_accessing_process(core, current_pid, pfn, flags)
        if flags & MF_COUNT_INCREASED:
            put_page(page)
        _report(core, pfn, "already poisoned", MfResult.FAILED)
        return res
    core.num_poisoned_pages += 1
    if PageFlag(page, PG.reserved):
        return _report(core, pfn, "reserved kernel page", MfResult.IGNORED)
    if page_count(page) == 0:  # get_hwpoison_page found no user
        if _take_off_buddy(core, page):
            return _report(core, pfn, "free buddy page", MfResult.RECOVERED)
        return _report(core, pfn, "high-order kernel page", MfResult.IGNORED)  # -EBUSY
    if not flags & MF_COUNT_INCREASED:
        get_page(page)  # get_hwpoison_page: kept while the page stays poisoned
    # PageTransHuge(hpage): split first
    if core.pages.order[pfn] and try_to_split_thp_page(core, page) < 0:
        return _unsplit_thp(core, page, flags, current_pid)
    lock_page(page)
    try:
        if not hwpoison_user_mappings(core, page, flags, current_pid):
            return _report(core, pfn, "unmapping failed", MfResult.FAILED)
        return _page_action(core, page)
    finally:
        unlock_page(page)


def unpoison_memory(core: MmCore, pfn: int) -> int:
    """``mm/memory-failure.c:unpoison_memory`` via debugfs ``hwpoison/unpoison-pfn``.

    v5.12 refuses quietly (0); 6.18 refuses with -EBUSY, and with -EOPNOTSUPP
    once a real hardware error was handled. 0 or -errno.

    It never rewrites page tables: hwpoison entries that still point at the
    page stay behind (the RFC's patch 11 turns them back into PTEs on fault).
    """
    if not 0 < pfn < core.pages.nr_pages:
        return -errno.ENXIO
    page = core.pages[pfn]
    modern = core.kcfg.version.tuple >= (6, 0)  # -EBUSY refusals; off after a HW error
    if modern and core.hw_memory_failure:
        return -errno.EOPNOTSUPP
    if not PageHWPoison(page):
        return 0 if not modern else -errno.EBUSY  # "already unpoisoned"
    if page_count(page) > 1 or page_mapped(page) or page_mapping(page) is not None:
        return 0 if not modern else -errno.EBUSY  # refused, with a log line
    if page_count(page) == 0:
        if TestClearPageHWPoison(page):
            core.num_poisoned_pages -= 1
        return 0  # "Software-unpoisoned free page"
    lock_page(page)
    cleared = TestClearPageHWPoison(page)
    unlock_page(page)
    if cleared:
        core.num_poisoned_pages -= 1
        put_page(page)
    return 0


def soft_offline_page(core: MmCore, pfn: int, flags: int) -> int:
    """Retire a page that is not yet bad (``mm/memory-failure.c``, v5.12 and v6.18).

    A page that is already PageHWPoison is taken as retired: "page already
    poisoned", return 0, nothing else happens (E16: a protected page reports
    success while the TD keeps using the frame). A free page is taken off the
    buddy lists and poisoned. Simplified: the model has no page migration, so
    an in-use page is reported as failing isolation (-EBUSY), which the real
    kernel returns when migrate_pages() fails. An anon THP is split first
    (``soft_offline_in_use_page``); a failed split is -EBUSY at once.
    """
    if not 0 < pfn < core.pages.nr_pages:
        return -errno.ENXIO
    page = core.pages[pfn]
    if PageHWPoison(page):
        _report(core, pfn, "soft offline: page already poisoned", MfResult.IGNORED)
        if flags & MF_COUNT_INCREASED:
            put_page(page)
        return 0
    if page_count(page) == 0 and _take_off_buddy(core, page):
        core.num_poisoned_pages += 1
        return _report(core, pfn, "soft offline: free buddy page", MfResult.RECOVERED)
    if core.pages.order[pfn]:  # soft_offline_in_use_page: split a THP first
        held = bool(flags & MF_COUNT_INCREASED)
        if not held:
            get_page(page)
        if not PageAnon(page) or split_huge_page(core, page):
            put_page(page)
            core.dmesg.append(f"soft offline: {pfn:#x}: "
                              + ("thp split failed" if PageAnon(page) else "non anonymous thp"))
            return -errno.EBUSY
        if not held:
            put_page(page)
    if flags & MF_COUNT_INCREASED:
        put_page(page)
    return _report(core, pfn, "soft offline: migration not modelled", MfResult.FAILED)


def wire_memory_failure(core: MmCore) -> None:
    """Let madvise(MADV_HWPOISON/SOFT_OFFLINE) reach this file (it sits above madvise)."""
    if core.kcfg.memory_failure:
        # Partials, not closures: a copied machine's core gets its own bound core.
        core.memory_failure = functools.partial(memory_failure, core)
        core.soft_offline_page = functools.partial(soft_offline_page, core)
