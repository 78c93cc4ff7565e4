"""The x86-64 swap-PTE encoding (the "arch" swap entry).

Follows ``arch/x86/include/asm/pgtable_64.h`` (v5.12; the layout is the same
in v6.18, which also uses bit 3 as ``_PAGE_SWP_EXCLUSIVE``)::

    | 63..59 type | 58..9 ~offset (L1TF-inverted) | 8..0 zero |

Bits 0-8 are zero so PRESENT, PSE and PROTNONE are clear. Storing the offset
inverted makes a speculative L1TF load through the entry point above RAM.
Scalar functions take Python ints; the ``*_array`` forms take numpy uint64.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import _PAGE_BIT_PROTNONE

U64 = 0xFFFF_FFFF_FFFF_FFFF

SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = _PAGE_BIT_PROTNONE + 1  # 9
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS  # 14
MAX_SWP_TYPE = (1 << SWP_TYPE_BITS) - 1
# The inverted offset occupies bits 9..58, so 50 bits of offset survive.
SWP_OFFSET_BITS = 64 - SWP_OFFSET_SHIFT
MAX_SWP_OFFSET = (1 << SWP_OFFSET_BITS) - 1

U64Array = npt.NDArray[np.uint64]


def __swp_entry(type_: int, offset: int) -> int:
    """Raw PTE for (type, offset): ``((~off << 14) >> 5) | (type << 59)``."""
    if not 0 <= type_ <= MAX_SWP_TYPE:
        raise ValueError(f"swap type {type_} is outside 0..{MAX_SWP_TYPE}")
    if not 0 <= offset <= MAX_SWP_OFFSET:
        raise ValueError(f"swap offset {offset:#x} does not fit in {SWP_OFFSET_BITS} bits")
    inverted = ((~offset & U64) << SWP_OFFSET_SHIFT) & U64
    return (inverted >> SWP_TYPE_BITS) | (type_ << (64 - SWP_TYPE_BITS))


def __swp_type(raw: int) -> int:
    return (raw & U64) >> (64 - SWP_TYPE_BITS)


def __swp_offset(raw: int) -> int:
    return ((((~raw) & U64) << SWP_TYPE_BITS) & U64) >> SWP_OFFSET_SHIFT


def __swp_entry_array(type_: int, offsets: U64Array) -> U64Array:
    """Vectorised ``__swp_entry`` for one type and many offsets."""
    offs = np.asarray(offsets, dtype=np.uint64)
    inverted = np.left_shift(np.invert(offs), np.uint64(SWP_OFFSET_SHIFT))
    return np.right_shift(inverted, np.uint64(SWP_TYPE_BITS)) | np.uint64(
        type_ << (64 - SWP_TYPE_BITS)
    )


def __swp_type_array(raw: U64Array) -> U64Array:
    return np.right_shift(np.asarray(raw, dtype=np.uint64), np.uint64(64 - SWP_TYPE_BITS))


def __swp_offset_array(raw: U64Array) -> U64Array:
    inverted = np.left_shift(np.invert(np.asarray(raw, dtype=np.uint64)), np.uint64(SWP_TYPE_BITS))
    return np.right_shift(inverted, np.uint64(SWP_OFFSET_SHIFT))
