"""The modelled kernel: its version and the CONFIG_* switches the model honours.

Numbers that move between releases (swap type numbers, page-flag bits, FOLL_*
values) are looked up from a :class:`KernelConfig`, never hard-coded by callers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KernelVersion(enum.Enum):
    """Kernel releases the model knows.

    V5_12 is the RFC's base (kas/linux ``kvm-unmapped-poison`` sits on ~v5.12-rc);
    V6_1 is Debian bookworm's kernel, booted under QEMU as the second referee
    (``kvmpoison oracle --kernel debian-6.1``, CONFIG_MEMORY_FAILURE=y);
    V6_18 is the kernel running on this project's machines (the oracle).
    """

    V5_12 = "5.12"
    V6_1 = "6.1"
    V6_18 = "6.18"

    @classmethod
    def parse(cls, text: str) -> KernelVersion:
        """Accept ``5.12``, ``v6.18`` or a full ``uname -r`` such as ``6.18.44-fc``."""
        cleaned = text.strip().lstrip("v")
        parts = cleaned.split(".")
        if len(parts) >= 2:
            major_minor = f"{parts[0]}.{''.join(ch for ch in parts[1] if ch.isdigit())}"
            for member in cls:
                if member.value == major_minor:
                    return member
        known = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown kernel version {text!r} (known: {known})")

    @property
    def tuple(self) -> tuple[int, int]:
        return _ORDER[self._value_]

    # Keyed by the value string: hashing an Enum member runs Python code, and these
    # comparisons sit on per-page paths.
    def __ge__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return _ORDER[self._value_] >= _ORDER[other._value_]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return _ORDER[self._value_] < _ORDER[other._value_]


_ORDER = {v.value: (int(v.value.split(".")[0]), int(v.value.split(".")[1])) for v in KernelVersion}


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """CONFIG_* switches that change what the model encodes or does.

    Defaults are those of the RFC's base build for x86-64 (MEMORY_FAILURE,
    MIGRATION and DEVICE_PRIVATE on; 4-level paging).
    """

    version: KernelVersion = KernelVersion.V5_12
    memory_failure: bool = True
    migration: bool = True
    device_private: bool = True
    mem_soft_dirty: bool = True
    x86_5level: bool = False

    @property
    def has_pte_markers(self) -> bool:
        """PTE markers exist from v5.19 (CONFIG_PTE_MARKER, on in Debian 6.1); always from v6.2."""
        return self.version >= KernelVersion.V6_1

    @property
    def has_swp_exclusive(self) -> bool:
        """``_PAGE_SWP_EXCLUSIVE`` (bit 3 of a swap PTE) exists from v5.19."""
        return self.version >= KernelVersion.V6_1

    @property
    def has_swapin_error(self) -> bool:
        """``SWP_SWAPIN_ERROR``: a swap type of its own in v6.1 only (a PTE marker from v6.2)."""
        return self.version == KernelVersion.V6_1

    @property
    def has_madv_populate(self) -> bool:
        """MADV_POPULATE_READ/WRITE exist from v5.14."""
        return self.version >= KernelVersion.V6_1

    @property
    def has_guard_pages(self) -> bool:
        """MADV_GUARD_INSTALL/REMOVE exist from v6.13."""
        return self.version >= KernelVersion.V6_18

    @property
    def has_uffdio_poison(self) -> bool:
        """UFFDIO_POISON exists from v6.6."""
        return self.version >= KernelVersion.V6_18


RFC_BASE = KernelConfig()
"""The RFC's kernel: v5.12 with MEMORY_FAILURE, MIGRATION and DEVICE_PRIVATE."""

THIS_MACHINE = KernelConfig(version=KernelVersion.V6_18, memory_failure=False)
"""The kernel on this project's machines: 6.18 with CONFIG_MEMORY_FAILURE off."""
