"""Generic swap entries: ``swp_entry_t``, special swap types, hwpoison entries, PTE markers.

Follows ``include/linux/swap.h`` and ``include/linux/swapops.h``:
v5.12 for the RFC's kernel and v6.18 for this machine's. The special type
numbers are computed from the same formulas as the kernel, so they follow the
CONFIG_* switches of a :class:`~kvmpoison.kconfig.KernelConfig`.

Two encodings exist and both are exposed: the raw PTE (``arch/x86/pgtable_64``)
and the generic ``swp_entry_t`` value ``(type << 58) | offset``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable import is_swap_pte
from kvmpoison.arch.x86.pgtable_64 import SWP_TYPE_BITS, __swp_entry, __swp_offset, __swp_type
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    PAGE_SHIFT,
    max_physmem_bits,
)
from kvmpoison.kconfig import KernelConfig

MAX_SWAPFILES_SHIFT = 5
BITS_PER_XA_VALUE = 63
SWP_TYPE_SHIFT = BITS_PER_XA_VALUE - MAX_SWAPFILES_SHIFT  # 58
SWP_OFFSET_MASK = (1 << SWP_TYPE_SHIFT) - 1


@dataclass(frozen=True, slots=True)
class swp_entry_t:
    """``typedef struct { unsigned long val; } swp_entry_t;``"""

    val: int

    def __repr__(self) -> str:
        return f"swp_entry_t({self.val:#x})"


class PteMarker(enum.IntFlag):
    """``pte_marker`` bits (swapops.h, v6.18)."""

    UFFD_WP = 1 << 0  # v5.19
    POISONED = 1 << 1  # SWAPIN_ERROR in v6.0, renamed and given hwpoison meaning in v6.6
    GUARD = 1 << 2  # MADV_GUARD_INSTALL, v6.13
    # Not upstream: the hardened design's marker (docs/hardened.md). A guest-private
    # page's PTE in every host mm; unlike the others it carries the page's pfn above
    # the marker bits, as a hwpoison entry carries it in its offset.
    GUEST_PRIVATE = 1 << 3


PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT = 4  # hardened: the pfn sits above the marker bits


@dataclass(frozen=True, slots=True)
class SwapTypes:
    """Special swap type numbers of one kernel build (``include/linux/swap.h``).

    A field is ``None`` where the build has no such type. v5.12 has two
    migration and two device types; v6.18 has three of each and PTE markers.
    v6.1 has three migration types, four device types (DEVICE_EXCLUSIVE_WRITE
    and _READ), a PTE marker type (CONFIG_PTE_MARKER) and, last,
    SWP_SWAPIN_ERROR (include/linux/swap.h, v6.1.192).
    """

    max_swapfiles: int
    hwpoison: int | None
    migration_read: int | None
    migration_read_exclusive: int | None
    migration_write: int | None
    device_write: int | None
    device_read: int | None
    device_exclusive: int | None
    pte_marker: int | None
    device_exclusive_read: int | None = None
    swapin_error: int | None = None

    @classmethod
    def for_config(cls, cfg: KernelConfig) -> SwapTypes:
        modern = cfg.version.tuple >= (5, 19)  # SWP_MIGRATION_READ_EXCLUSIVE
        v6_1 = (5, 14) <= cfg.version.tuple < (6, 3)  # SWP_DEVICE_EXCLUSIVE_WRITE/READ
        device_num = (4 if v6_1 else 3 if modern else 2) if cfg.device_private else 0
        migration_num = (3 if modern else 2) if cfg.migration else 0
        hwpoison_num = 1 if cfg.memory_failure else 0
        marker_num = 1 if cfg.has_pte_markers else 0
        swapin_error_num = 1 if cfg.has_swapin_error else 0
        max_swapfiles = (
            (1 << MAX_SWAPFILES_SHIFT) - device_num - migration_num - hwpoison_num - marker_num
            - swapin_error_num
        )
        mig = max_swapfiles + hwpoison_num
        dev = mig + migration_num
        return cls(
            max_swapfiles=max_swapfiles,
            hwpoison=max_swapfiles if hwpoison_num else None,
            migration_read=mig if migration_num else None,
            migration_read_exclusive=mig + 1 if migration_num == 3 else None,
            migration_write=mig + migration_num - 1 if migration_num else None,
            device_write=dev if device_num else None,
            device_read=dev + 1 if device_num else None,
            device_exclusive=dev + 2 if device_num >= 3 else None,
            pte_marker=dev + device_num if marker_num else None,
            device_exclusive_read=dev + 3 if device_num == 4 else None,
            swapin_error=dev + device_num + marker_num if swapin_error_num else None,
        )

    def name_of(self, type_: int) -> str:
        """The kernel's name for a swap type number (``SWP_HWPOISON``, or a swap file)."""
        names = {
            self.hwpoison: "SWP_HWPOISON",
            self.migration_read: "SWP_MIGRATION_READ",
            self.migration_read_exclusive: "SWP_MIGRATION_READ_EXCLUSIVE",
            self.migration_write: "SWP_MIGRATION_WRITE",
            self.device_write: "SWP_DEVICE_WRITE",
            self.device_read: "SWP_DEVICE_READ",
            self.device_exclusive: "SWP_DEVICE_EXCLUSIVE" if self.device_exclusive_read is None
            else "SWP_DEVICE_EXCLUSIVE_WRITE",
            self.device_exclusive_read: "SWP_DEVICE_EXCLUSIVE_READ",
            self.pte_marker: "SWP_PTE_MARKER",
            self.swapin_error: "SWP_SWAPIN_ERROR",
        }
        names.pop(None, None)
        if type_ in names:
            return names[type_]
        if type_ < self.max_swapfiles:
            return f"swapfile {type_}"
        return f"unused special type {type_}"


def swp_entry(type_: int, offset: int) -> swp_entry_t:
    return swp_entry_t((type_ << SWP_TYPE_SHIFT) | (offset & SWP_OFFSET_MASK))


def swp_type(entry: swp_entry_t) -> int:
    return entry.val >> SWP_TYPE_SHIFT


def swp_offset(entry: swp_entry_t) -> int:
    return entry.val & SWP_OFFSET_MASK


def swp_offset_pfn(entry: swp_entry_t, cfg: KernelConfig) -> int:
    """v6.1+: the offset masked to ``SWP_PFN_BITS = MAX_PHYSMEM_BITS - PAGE_SHIFT``."""
    pfn_bits = max_physmem_bits(cfg.x86_5level) - PAGE_SHIFT
    return swp_offset(entry) & ((1 << pfn_bits) - 1)


def pte_swp_clear_flags(pte: int, cfg: KernelConfig) -> int:
    """Clear the software bits a swap PTE may carry beside the entry."""
    mask = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP
    if cfg.has_swp_exclusive:
        mask |= _PAGE_SWP_EXCLUSIVE
    return pte & ~mask


def pte_to_swp_entry(pte: int, cfg: KernelConfig) -> swp_entry_t:
    """Decode a swap PTE into the generic entry, ignoring soft-dirty/uffd-wp/exclusive."""
    arch = pte_swp_clear_flags(pte, cfg)
    return swp_entry(__swp_type(arch), __swp_offset(arch))


def swp_entry_to_pte(entry: swp_entry_t) -> int:
    return __swp_entry(swp_type(entry), swp_offset(entry))


def non_swap_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    return swp_type(entry) >= types.max_swapfiles


def make_hwpoison_entry(pfn: int, types: SwapTypes) -> swp_entry_t:
    """``swp_entry(SWP_HWPOISON, pfn)``.

    The kernel takes a locked ``struct page``; the model takes its pfn and checks
    the lock in ``mm``. Without CONFIG_MEMORY_FAILURE the kernel returns
    ``swp_entry(0, 0)``; the model refuses, since that entry cannot mean poison.
    """
    if types.hwpoison is None:
        raise ValueError("this kernel has no SWP_HWPOISON (CONFIG_MEMORY_FAILURE is off)")
    return swp_entry(types.hwpoison, pfn)


def is_hwpoison_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    return types.hwpoison is not None and swp_type(entry) == types.hwpoison


def hwpoison_entry_to_pfn(entry: swp_entry_t) -> int:
    """Added by the RFC (patch 07) and upstream in v5.13: the offset is the pfn."""
    return swp_offset(entry)


def is_migration_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    kinds = (types.migration_read, types.migration_read_exclusive, types.migration_write)
    return swp_type(entry) in {k for k in kinds if k is not None}


def is_device_private_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    kinds = (types.device_write, types.device_read)
    return swp_type(entry) in {k for k in kinds if k is not None}


def make_pte_marker_entry(marker: PteMarker, types: SwapTypes) -> swp_entry_t:
    if types.pte_marker is None:
        raise ValueError("this kernel has no PTE markers (they arrived in v5.19)")
    return swp_entry(types.pte_marker, int(marker))


def is_pte_marker_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    return types.pte_marker is not None and swp_type(entry) == types.pte_marker


def pte_marker_get(entry: swp_entry_t) -> PteMarker:
    return PteMarker(
        swp_offset(entry) & int(PteMarker.UFFD_WP | PteMarker.POISONED | PteMarker.GUARD
                                | PteMarker.GUEST_PRIVATE)
    )


def make_guest_private_entry(pfn: int, types: SwapTypes) -> swp_entry_t:
    """The hardened design's ``make_pte_marker(PTE_MARKER_GUEST_PRIVATE)`` with the pfn.

    Modelled on ``make_pte_marker_entry`` (include/linux/swapops.h, v6.18),
    which puts only marker bits in the offset; this marker also carries the
    page's pfn (above ``PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT``) because an
    anonymous private page has no other home than this entry.
    """
    if types.pte_marker is None:
        raise ValueError("this kernel has no PTE markers (they arrived in v5.19)")
    return swp_entry(types.pte_marker,
                     int(PteMarker.GUEST_PRIVATE) | (pfn << PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT))


def is_guest_private_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    return is_pte_marker_entry(entry, types) and bool(swp_offset(entry)
                                                      & int(PteMarker.GUEST_PRIVATE))


def guest_private_entry_to_pfn(entry: swp_entry_t) -> int:
    return swp_offset(entry) >> PTE_MARKER_GUEST_PRIVATE_PFN_SHIFT


def is_pte_marker(pte: int, cfg: KernelConfig, types: SwapTypes) -> bool:
    return is_swap_pte(pte) and is_pte_marker_entry(pte_to_swp_entry(pte, cfg), types)


def is_poisoned_swp_entry(entry: swp_entry_t, types: SwapTypes) -> bool:
    """v6.6+: a hwpoison entry, or a marker carrying POISONED."""
    if is_hwpoison_entry(entry, types):
        return True
    return is_pte_marker_entry(entry, types) and bool(pte_marker_get(entry) & PteMarker.POISONED)


assert SWP_TYPE_BITS == MAX_SWAPFILES_SHIFT
