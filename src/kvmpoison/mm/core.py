"""The host kernel's memory-management state: what mm/ code reaches through globals.

One :class:`MmCore` per machine holds the hardware memory controller, the
``struct page`` array, the buddy allocator, the page-table store, the CPUs
and the hook points a design fills in. mm never imports ``virt/``: KVM
(and the RFC) change mm behaviour only through :class:`MmHooks`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvmpoison.arch.x86.integrity import MemoryController, PlatformConfig
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT
from kvmpoison.arch.x86.tlb import Cpu, flush_tlb_mm_range
from kvmpoison.kconfig import KernelConfig
from kvmpoison.mm.huge_memory import ThpSettings
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.page import PageArray
from kvmpoison.mm.page_alloc import BuddyAllocator, PfnArray
from kvmpoison.mm.page_flags import PageFlagBits
from kvmpoison.mm.pagetable import PageTables, PteStore
from kvmpoison.mm.swapops import SwapTypes
from kvmpoison.outcome import Outcome
from kvmpoison.uapi.siginfo import SigInfo


class FollowPoisoned(enum.Enum):
    """What ``follow_page_pte`` does with a hwpoison entry."""

    NEVER = "never"  # upstream: no page, the caller faults and gets -EFAULT/-EHWPOISON
    ALWAYS = "always"  # RFC v1: the FOLL_ALLOW_POISONED test is commented out
    WITH_FLAG = "with-flag"  # RFC v2: only for callers passing FOLL_ALLOW_POISONED


@dataclass
class MmHooks:
    """mm behaviour a design may change (each names the RFC patch that adds it)."""

    follow_poisoned: FollowPoisoned = FollowPoisoned.NEVER  # patch 08
    shmem_getpage_fails_poisoned: bool = False  # patch 09
    hwpoison_entry_holds_ref: bool = False  # patch 10
    do_swap_page_restores_unpoisoned: bool = False  # patch 11
    # The hardened design (not a posted patch; docs/hardened.md): PG_guest_private pages
    # and PTE_MARKER_GUEST_PRIVATE entries are honoured by the fault, zap, fork, rmap,
    # shmem, reclaim, migration and offline paths.
    guest_private: bool = False


SignalSender = Callable[[int, SigInfo], None]  # (pid, siginfo)
MemoryFailure = Callable[[int, int], int]  # (pfn, MF_* flags) -> 0 | -errno
MemoryFailureCurrent = Callable[[int, int, int | None], int]  # (pfn, flags, current pid)


@dataclass
class MmCore:
    kcfg: KernelConfig
    hw: MemoryController
    pages: PageArray
    buddy: BuddyAllocator
    ptes: PteStore
    cpus: list[Cpu]
    swap_types: SwapTypes
    hooks: MmHooks = field(default_factory=MmHooks)
    num_poisoned_pages: int = 0
    zero_pfn: int = 0
    send_signal: SignalSender | None = None
    memory_failure: MemoryFailureCurrent | None = None  # set when mm/memory_failure is wired in
    soft_offline_page: MemoryFailure | None = None  # likewise
    mms: dict[int, MmStruct] = field(default_factory=dict)
    sysctl_memory_failure_early_kill: bool = False
    swap_space: dict[int, bytes] = field(default_factory=dict)  # swap offset -> data
    swap_map: dict[int, int] = field(default_factory=dict)  # offset -> entries beyond the first
    next_swap_offset: int = 1
    mf_reports: list[object] = field(default_factory=list)  # memory_failure's action_result log
    mce_log: list[int] = field(default_factory=list)  # pfns of the #MCs a TD consumed (mce_log)
    hw_memory_failure: bool = False  # a real (not software-injected) error was handled
    dmesg: list[str] = field(default_factory=list)  # WARNs and messages, oldest first
    halted: Outcome | None = None  # the host panicked or shut down
    thp: ThpSettings = field(default_factory=ThpSettings)  # /sys/kernel/mm/transparent_hugepage
    huge_zero_pfn: int = -1  # the huge zero page, once allocated
    deferred_split_queue: list[int] = field(default_factory=list)  # THP heads (deferred_split)

    def warn(self, message: str) -> None:
        """``WARN_ON_ONCE``-style: the model logs it and carries on, as the kernel does."""
        self.dmesg.append(f"WARNING: {message}")
    _next_mm: int = 1

    @classmethod
    def boot(cls, kcfg: KernelConfig, platform: PlatformConfig, nr_cpus: int = 2) -> MmCore:
        hw = MemoryController(platform)
        hw.kernel_memory_failure = kcfg.memory_failure  # mce_severity's AR rows need it
        pages = PageArray(hw.mem.nr_frames, PageFlagBits.for_config(kcfg))
        buddy = BuddyAllocator(pages, reserved=1)  # pfn 0 is the shared zero page
        # Leaf tables for 64x the machine's memory fit before the store must grow.
        ptes = PteStore(capacity=max(64, hw.mem.nr_frames // 8))
        return cls(kcfg=kcfg, hw=hw, pages=pages, buddy=buddy, ptes=ptes,
                   cpus=[Cpu(i) for i in range(nr_cpus)],
                   swap_types=SwapTypes.for_config(kcfg))

    def mm_alloc(self, owner_pid: int = 0) -> MmStruct:
        mm = MmStruct(core=self, pgd=PageTables(self.ptes, self.buddy), ident=self._next_mm,
                      owner_pid=owner_pid)
        self._next_mm += 1
        self.mms[mm.ident] = mm
        return mm

    def flush_tlb_range(self, mm: MmStruct, start: int, end: int) -> None:
        """TLB shootdown plus ``mmu_notifier_invalidate_range`` for [start, end)."""
        flush_tlb_mm_range(self.cpus, mm.ident, start, end)
        for notifier in list(mm.mmu_notifiers):
            notifier.invalidate_range(start, end)

    def clear_pages(self, pfns: PfnArray) -> None:
        """``clear_page`` for each pfn: only frames that ever held data cost anything
        (a per-pfn lookup, not a scan of the frames in use)."""
        self.hw.clear_frames(pfns)

    def copy_page(self, dst: int, src: int) -> None:
        data = self.hw.read(src << PAGE_SHIFT, 1 << PAGE_SHIFT, 0).data
        if any(data) or self.hw.mem.holds(dst):
            self.hw.write(dst << PAGE_SHIFT, data, 0)

    def swap_duplicate(self, offset: int) -> None:
        """mm/swapfile.c ``swap_duplicate``: one more PTE refers to the slot (fork)."""
        self.swap_map[offset] = self.swap_map.get(offset, 0) + 1

    def swap_free(self, offset: int) -> None:
        """``swap_free``/``free_swap_and_cache``: drop one reference; the last frees the slot."""
        extra = self.swap_map.get(offset, 0)
        if extra:
            self.swap_map[offset] = extra - 1
        else:
            self.swap_map.pop(offset, None)
            self.swap_space.pop(offset, None)

    def rss_pages(self) -> int:
        return int(np.count_nonzero(self.pages._refcount > 0))
