"""``struct range`` arrays: add_range_with_merge and clean_sort_range.

Follows ``kernel/range.c`` (v5.12). Ranges are [start, end). Adding a range
merges every existing range it overlaps or touches; when the array is full
and nothing merges, ``add_range`` silently drops the new range.
"""

from __future__ import annotations


def add_range(ranges: list[tuple[int, int]], az: int, start: int, end: int) -> int:
    """``kernel/range.c:add_range`` (v5.12): append [start, end); silently dropped when full."""
    if start >= end:
        return len(ranges)
    if len(ranges) >= az:  # out of slots: the range is lost without an error
        return len(ranges)
    ranges.append((start, end))
    return len(ranges)


def add_range_with_merge(ranges: list[tuple[int, int]], az: int, start: int, end: int) -> int:
    """``kernel/range.c:add_range_with_merge`` (v5.12): fold every range that overlaps
    or touches [start, end) into it (the kernel memmoves the rest down and rechecks
    the same slot), then ``add_range`` the result.
    """
    if start >= end:
        return len(ranges)
    i = 0
    while i < len(ranges):
        lo, hi = ranges[i]
        if not hi:
            i += 1
            continue
        common_start = max(lo, start)
        common_end = min(hi, end)
        if common_start > common_end:
            i += 1
            continue
        start, end = min(lo, start), max(hi, end)
        ranges.pop(i)  # memmove the rest down; the kernel then rechecks slot i (i--)
    return add_range(ranges, az, start, end)


def clean_sort_range(ranges: list[tuple[int, int]]) -> int:
    """``kernel/range.c:clean_sort_range`` (v5.12): drop empty ranges, sort by start."""
    ranges[:] = sorted(r for r in ranges if r[0] < r[1])
    return len(ranges)
