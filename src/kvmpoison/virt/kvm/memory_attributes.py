"""Per-gfn memory attributes: ``kvm->mem_attr_array`` and ``KVM_SET_MEMORY_ATTRIBUTES``.

Follows ``virt/kvm/kvm_main.c`` (v6.18, CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES):
``kvm_vm_ioctl_set_mem_attributes`` checks its arguments (flags must be 0,
only supported attributes, size non-zero and no wrap, page-aligned address
and size), then ``kvm_vm_set_mem_attributes`` does nothing when the whole
range already has the attributes, else zaps the range's SPTEs
(``kvm_arch_pre_set_memory_attributes`` -> ``kvm_unmap_gfn_range``) and
stores the new value for every gfn.

The kernel keeps an xarray of values indexed by gfn. The model keeps the
same function as a piecewise-constant map over [0, 2^52): sorted breakpoints
and the value from each breakpoint on, so a conversion of any size is a few
numpy operations, never a per-page loop. Simplified: ``xa_reserve`` never
fails (no -ENOMEM).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3  # include/uapi/linux/kvm.h
GFN_LIMIT = 1 << (64 - PAGE_SHIFT)
U64_MAX = (1 << 64) - 1


class MemAttrArray:
    """``kvm->mem_attr_array`` as breakpoints: gfns in [starts[i], starts[i+1]) hold values[i]."""

    def __init__(self) -> None:
        self.starts: npt.NDArray[np.int64] = np.zeros(1, dtype=np.int64)
        self.values: npt.NDArray[np.uint64] = np.zeros(1, dtype=np.uint64)

    def get(self, gfn: int) -> int:
        """``kvm_get_memory_attributes``: the value stored for ``gfn`` (0 when none)."""
        i = int(np.searchsorted(self.starts, gfn, side="right")) - 1
        return int(self.values[i])

    def get_many(self, gfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        idx = np.searchsorted(self.starts, gfns, side="right") - 1
        return self.values[idx]

    def range_has(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """Every gfn of [start, end) has ``value & mask == attrs``."""
        lo = int(np.searchsorted(self.starts, start, side="right")) - 1
        hi = int(np.searchsorted(self.starts, end, side="left"))
        return bool(np.all((self.values[lo:hi] & np.uint64(mask)) == np.uint64(attrs)))

    def store(self, start: int, end: int, value: int) -> None:
        """``xa_store`` of ``value`` at every gfn of [start, end), as one range update."""
        tail: list[int] = [end] if end < GFN_LIMIT else []
        tail_value = [self.get(end)] if tail else []
        left, right = self.starts < start, self.starts > end
        starts = np.concatenate([self.starts[left], np.array([start, *tail], dtype=np.int64),
                                 self.starts[right]])
        values = np.concatenate([self.values[left],
                                 np.array([value, *tail_value], dtype=np.uint64),
                                 self.values[right]])
        # Merge neighbours holding the same value (the xarray has no "ranges" to keep).
        same = np.concatenate([[False], values[1:] == values[:-1]])
        self.starts, self.values = starts[~same], values[~same]

    def ranges(self, value: int) -> list[tuple[int, int]]:
        """The [start, end) ranges holding exactly ``value`` (for reports and tests)."""
        ends = np.append(self.starts[1:], GFN_LIMIT)
        pick = self.values == np.uint64(value)
        return [(int(s), int(e)) for s, e in zip(self.starts[pick], ends[pick], strict=True)]


def kvm_supported_mem_attributes(has_private_mem: bool) -> int:
    """``kvm_supported_mem_attributes``: PRIVATE when the VM type has private memory."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if has_private_mem else 0


def kvm_vm_ioctl_set_mem_attributes(attrs: MemAttrArray, has_private_mem: bool,
                                    zap: Callable[[int, int], None], address: int, size: int,
                                    attributes: int, flags: int = 0) -> int:
    """``KVM_SET_MEMORY_ATTRIBUTES``: 0 or -errno (6.18's order of checks).

    ``zap(first_gfn, last_gfn)`` is ``kvm_unmap_gfn_range`` over the VM's memslots.
    """
    if not (0 <= address <= U64_MAX and 0 <= size <= U64_MAX and 0 <= attributes <= U64_MAX
            and 0 <= flags <= U64_MAX):
        return -errno.EINVAL  # the uapi fields are u64
    if flags:
        return -errno.EINVAL  # "flags is currently not used"
    if attributes & ~kvm_supported_mem_attributes(has_private_mem):
        return -errno.EINVAL
    if size == 0 or address + size > U64_MAX:
        return -errno.EINVAL
    if address & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        return -errno.EINVAL
    start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
    return kvm_vm_set_mem_attributes(attrs, zap, start, end, attributes)


def kvm_vm_set_mem_attributes(attrs: MemAttrArray, zap: Callable[[int, int], None],
                              start: int, end: int, attributes: int) -> int:
    """Set ``attributes`` for gfns [start, end): zap first, then store (always 0 here)."""
    if attrs.range_has(start, end, ~0 & U64_MAX, attributes):
        return 0  # "Nothing to do if the entire range as the desired attributes."
    zap(start, end)  # kvm_handle_gfn_range(pre_set_range): kvm_unmap_gfn_range
    attrs.store(start, end, attributes)
    return 0
