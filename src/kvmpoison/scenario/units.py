"""Sizes in scenario files: a byte count or a count with a K, M or G suffix."""

from __future__ import annotations

from typing import Any

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE

_SIZE_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(value: Any, what: str) -> int:
    """A positive, page-aligned size: ``4194304``, ``"4M"``, ``"64K"``."""
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and value[:-1].isdigit() and value[-1:].upper() in _SIZE_SUFFIX:
        size = int(value[:-1]) * _SIZE_SUFFIX[value[-1].upper()]
    if size is None or size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{what} must be a positive multiple of 4K, as bytes or like '64M', "
                         f"not {value!r}")
    return size
