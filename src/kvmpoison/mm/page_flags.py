"""``page->flags`` bit numbers per modelled kernel.

Follows ``include/linux/page-flags.h``: v5.12 on x86-64 with CONFIG_MMU,
CONFIG_X86_PAT (so PG_uncached exists) and CONFIG_MEMORY_FAILURE, giving
PG_hwpoison = 23; v6.18 (no PG_uncached, PG_writeback moved to bit 1,
PG_dropbehind added), giving PG_hwpoison = 21.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmpoison.kconfig import KernelConfig, KernelVersion


class PG(enum.Enum):
    """Logical page flags; :class:`PageFlagBits` gives their bit per kernel."""

    locked = "locked"
    writeback = "writeback"
    referenced = "referenced"
    uptodate = "uptodate"
    dirty = "dirty"
    lru = "lru"
    head = "head"
    waiters = "waiters"
    active = "active"
    workingset = "workingset"
    owner_priv_1 = "owner_priv_1"  # PG_swapcache / PG_checked alias
    arch_1 = "arch_1"
    reserved = "reserved"
    private = "private"
    private_2 = "private_2"
    reclaim = "reclaim"
    swapbacked = "swapbacked"
    unevictable = "unevictable"
    mlocked = "mlocked"
    hwpoison = "hwpoison"
    guest_private = "guest_private"  # not upstream: the hardened design's own flag


_V5_12 = {
    PG.locked: 0, PG.referenced: 1, PG.uptodate: 2, PG.dirty: 3, PG.lru: 4, PG.active: 5,
    PG.workingset: 6, PG.waiters: 7, PG.owner_priv_1: 10, PG.arch_1: 11, PG.reserved: 12,
    PG.private: 13, PG.private_2: 14, PG.writeback: 15, PG.head: 16, PG.reclaim: 18,
    PG.swapbacked: 19, PG.unevictable: 20, PG.mlocked: 21, PG.hwpoison: 23,
}  # 8 error, 9 slab, 17 mappedtodisk, 22 uncached, 24 arch_2 are not modelled

_V6_18 = {
    PG.locked: 0, PG.writeback: 1, PG.referenced: 2, PG.uptodate: 3, PG.dirty: 4, PG.lru: 5,
    PG.head: 6, PG.waiters: 7, PG.active: 8, PG.workingset: 9, PG.owner_priv_1: 10,
    PG.arch_1: 12, PG.reserved: 13, PG.private: 14, PG.private_2: 15, PG.reclaim: 16,
    PG.swapbacked: 17, PG.unevictable: 18, PG.mlocked: 20, PG.hwpoison: 21,
}  # 11 owner_2, 19 dropbehind are not modelled

# Model-only bits above the kernel's flag range (the kernel keeps these in page_type).
PG_BUDDY_BIT = 30
# The hardened design's PG_guest_private (docs/hardened.md): a flag of its own, so a
# protected page is never mistaken for PG_hwpoison. Kept above the kernel's flag range.
PG_GUEST_PRIVATE_BIT = 29
PG_PGTABLE_BIT = 31


@dataclass(frozen=True, slots=True)
class PageFlagBits:
    bit: dict[PG, int]
    version: KernelVersion = KernelVersion.V5_12  # for page-level rules that moved (pincount)

    @classmethod
    def for_config(cls, cfg: KernelConfig) -> PageFlagBits:
        bits = dict(_V6_18 if cfg.version >= KernelVersion.V6_18 else _V5_12)
        bits[PG.guest_private] = PG_GUEST_PRIVATE_BIT
        return cls(bits, cfg.version)

    def mask(self, *flags: PG) -> int:
        out = 0
        for flag in flags:
            out |= 1 << self.bit[flag]
        return out

    def names(self, value: int) -> list[str]:
        """``PG_*`` names of the bits set in ``value`` (drgn's decode_page_flags shape)."""
        names = [f"PG_{flag.value}" for flag, bit in sorted(self.bit.items(), key=lambda x: x[1])
                 if value >> bit & 1]
        if value >> PG_BUDDY_BIT & 1:
            names.append("PageBuddy")
        if value >> PG_PGTABLE_BIT & 1:
            names.append("PageTable")
        return names
