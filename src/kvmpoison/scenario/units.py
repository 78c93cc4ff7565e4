"""Sizes in scenario files: a byte count or a count with a K, M or G suffix, within limits."""

from __future__ import annotations

from typing import Any

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE

_SIZE_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

# The model keeps per-frame arrays for the machine's memory, so it has to fit in this process.
MACHINE_MEMORY_MIN = 1 << 20
MACHINE_MEMORY_MAX = 16 << 30
# Guest RAM is allocated lazily, but bulk guest operations (KVM_HC_MEM_SHARE) visit every page.
VM_MEMORY_MAX = 4 << 30


def human(size: int) -> str:
    """``16G``, ``1M``, ``4K``: the largest unit that divides ``size``."""
    for suffix, unit in sorted(_SIZE_SUFFIX.items(), key=lambda kv: -kv[1]):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_size(value: Any, what: str, lo: int = PAGE_SIZE, hi: int | None = None) -> int:
    """A page-aligned size from ``lo`` to ``hi``: ``4194304``, ``"4M"``, ``"64K"``."""
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and value[:-1].isdigit() and value[-1:].upper() in _SIZE_SUFFIX:
        size = int(value[:-1]) * _SIZE_SUFFIX[value[-1].upper()]
    if size is None or size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{what} must be a positive multiple of 4K, as bytes or like '64M', "
                         f"not {value!r}")
    if size < lo or (hi is not None and size > hi):
        limits = f"from {human(lo)} to {human(hi)}" if hi is not None else f"at least {human(lo)}"
        raise ValueError(f"{what} {value!r} is out of range: it must be {limits}")
    return size
