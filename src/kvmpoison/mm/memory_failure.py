"""memory_failure() for real hardware memory errors, and unpoison_memory().

Follows ``mm/memory-failure.c`` (v5.12 flow, with the v6.x differences the
model honours: an already-poisoned page returns -EHWPOISON instead of 0,
shmem keeps a poisoned page in its cache, ``TTU_HWPOISON`` replaces
``TTU_IGNORE_HWPOISON``, and unpoison refuses with -EOPNOTSUPP once a real
hardware error was seen). Kill policy: ``collect_procs`` gathers mappers
for early kill (sysctl, or MF_ACTION_REQUIRED for the current task);
``kill_procs`` sends BUS_MCEERR_AR to the current task on an action-required
error and BUS_MCEERR_AO to the others, or SIGKILL when the unmap failed on a
dirty page. Late-kill tasks get BUS_MCEERR_AR when they next touch the page.

Not modelled: hugetlb and THP splitting (all pages are order-0), KSM,
soft-offline migration, page-type filters.
"""

from __future__ import annotations

import enum
import errno
import signal
from dataclasses import dataclass

import numpy as np

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.kconfig import KernelVersion
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import mapping_set_error
from kvmpoison.mm.page import (
    Page,
    PageAnon,
    PageBuddy,
    PageDirty,
    PageFlag,
    PageHWPoison,
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
    core.mf_reports.append(MfReport(pfn, kind, result))
    return 0 if result in (MfResult.RECOVERED, MfResult.DELAYED) else -errno.EBUSY


def _take_off_buddy(core: MmCore, page: Page) -> bool:
    """A free page: pull its buddy block apart so the poisoned page never returns."""
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
            return True
    return False


def collect_procs(core: MmCore, page: Page, force_early: bool,
                  current_pid: int | None) -> list[tuple[int, int]]:
    """(pid, page-aligned address) of each process to kill early."""
    out = []
    for vma, addr in rmap_walk(page):
        pid = vma.vm_mm.owner_pid
        early = core.sysctl_memory_failure_early_kill or (force_early and pid == current_pid)
        if early:
            out.append((pid, addr))
    return out


def kill_procs(core: MmCore, tokill: list[tuple[int, int]], forcekill: bool, fail: bool,
               flags: int, current_pid: int | None) -> None:
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
    if not page_mapped(page):
        return True
    modern = core.kcfg.version >= KernelVersion.V6_18
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
    """identify_page_state + page_action for an LRU page that is no longer mapped."""
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
    keep = kind == "shmem" and core.kcfg.version >= KernelVersion.V6_18
    if not keep:  # truncate_error_page: the page leaves the page cache
        index = int(core.pages.index[pfn])
        if mapping.delete_from_page_cache(index) is not None:
            put_page(page)
    return _report(core, pfn, "dirty LRU page" if dirty else "clean LRU page",
                   MfResult.RECOVERED)


def memory_failure(core: MmCore, pfn: int, flags: int, current_pid: int | None = None) -> int:
    """Handle a hardware error on ``pfn``: poison, unmap, kill, isolate. 0 or -errno."""
    if not core.kcfg.memory_failure:
        return -errno.ENXIO
    if not 0 < pfn < core.pages.nr_pages:
        return -errno.ENXIO  # "memory outside kernel control"
    page = core.pages[pfn]
    if not flags & MF_SW_SIMULATED:
        core.hw_memory_failure = True
    if TestSetPageHWPoison(page):
        _report(core, pfn, "already poisoned", MfResult.IGNORED)
        return -EHWPOISON if core.kcfg.version >= KernelVersion.V6_18 else 0
    core.num_poisoned_pages += 1
    if PageFlag(page, PG.reserved):
        return _report(core, pfn, "reserved kernel page", MfResult.IGNORED)
    if page_count(page) == 0:
        kind = "free buddy page" if _take_off_buddy(core, page) else "free page"
        return _report(core, pfn, kind, MfResult.DELAYED)
    if not flags & MF_COUNT_INCREASED:
        get_page(page)  # get_hwpoison_page: kept while the page stays poisoned
    lock_page(page)
    try:
        if not hwpoison_user_mappings(core, page, flags, current_pid):
            return _report(core, pfn, "unmapping failed", MfResult.FAILED)
        return _page_action(core, page)
    finally:
        unlock_page(page)


def unpoison_memory(core: MmCore, pfn: int) -> int:
    """The debugfs ``hwpoison/unpoison-pfn`` (CONFIG_HWPOISON_INJECT). 0 or -errno.

    It never rewrites page tables: hwpoison entries that still point at the
    page stay behind (the RFC's patch 11 turns them back into PTEs on fault).
    """
    if not 0 < pfn < core.pages.nr_pages:
        return -errno.ENXIO
    page = core.pages[pfn]
    modern = core.kcfg.version >= KernelVersion.V6_18
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
    kernel returns when migrate_pages() fails.
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
    if flags & MF_COUNT_INCREASED:
        put_page(page)
    return _report(core, pfn, "soft offline: migration not modelled", MfResult.FAILED)


def wire_memory_failure(core: MmCore) -> None:
    """Let madvise(MADV_HWPOISON/SOFT_OFFLINE) reach this file (it sits above madvise)."""
    if core.kcfg.memory_failure:
        core.memory_failure = lambda pfn, flags: memory_failure(core, pfn, flags)
        core.soft_offline_page = lambda pfn, flags: soft_offline_page(core, pfn, flags)
