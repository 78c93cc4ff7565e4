"""Physical memory: frames and per-line integrity metadata, allocated lazily.

A frame costs nothing until a write changes it; an untouched frame reads as
plaintext zeros under KeyID 0 with TD=0 and no poison. The per-line state is
what a non-ACT TDX platform keeps in the ECC bits (TD bit, MAC, poison) plus
two model-only oracle fields (last writer KeyID, last shared-KeyID intruder).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mktme import LINE_SIZE
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE

LINES_PER_PAGE = PAGE_SIZE // LINE_SIZE
NO_KEYID = -1


class Frame:
    """One 4 KiB frame: ciphertext and per-line metadata."""

    __slots__ = ("ct", "has_mac", "hw_poison", "intruder", "mac", "poison", "td", "writer")

    def __init__(self, mac_nbytes: int):
        self.ct: npt.NDArray[np.uint8] = np.zeros((LINES_PER_PAGE, LINE_SIZE), dtype=np.uint8)
        self.td: npt.NDArray[np.bool_] = np.zeros(LINES_PER_PAGE, dtype=bool)
        self.mac: npt.NDArray[np.uint8] = np.zeros((LINES_PER_PAGE, mac_nbytes), dtype=np.uint8)
        self.has_mac: npt.NDArray[np.bool_] = np.zeros(LINES_PER_PAGE, dtype=bool)
        self.poison: npt.NDArray[np.bool_] = np.zeros(LINES_PER_PAGE, dtype=bool)
        self.hw_poison: npt.NDArray[np.bool_] = np.zeros(LINES_PER_PAGE, dtype=bool)
        # Model-only oracle: the last writer, and the last shared KeyID that
        # wrote while the line was TD-owned (hardware keeps neither).
        self.writer: npt.NDArray[np.int16] = np.zeros(LINES_PER_PAGE, dtype=np.int16)
        self.intruder: npt.NDArray[np.int16] = np.full(LINES_PER_PAGE, NO_KEYID, dtype=np.int16)


class PhysicalMemory:
    """The DRAM of one machine, ``mem_bytes`` long."""

    def __init__(self, mem_bytes: int, mac_nbytes: int):
        if mem_bytes <= 0 or mem_bytes % PAGE_SIZE:
            raise ValueError(f"memory size must be a positive multiple of {PAGE_SIZE}")
        self.mem_bytes = mem_bytes
        self.nr_frames = mem_bytes >> PAGE_SHIFT
        self._mac_nbytes = mac_nbytes
        self._frames: dict[int, Frame] = {}

    def check_range(self, pa: int, size: int) -> None:
        if size < 0 or pa < 0 or pa + size > self.mem_bytes:
            raise ValueError(
                f"physical range [{pa:#x}, {pa + size:#x}) is outside memory of "
                f"{self.mem_bytes:#x} bytes"
            )

    def get(self, pfn: int) -> Frame | None:
        return self._frames.get(pfn)

    def materialize(self, pfn: int) -> Frame:
        frame = self._frames.get(pfn)
        if frame is None:
            frame = Frame(self._mac_nbytes)
            self._frames[pfn] = frame
        return frame

    @property
    def nr_allocated(self) -> int:
        return len(self._frames)

    def allocated_pfns(self) -> list[int]:
        return sorted(self._frames)

    def allocated_pfns_in(self, pfns: npt.NDArray[np.int64]) -> list[int]:
        """The pfns among ``pfns`` whose frames hold data (cost: allocated frames, not pfns)."""
        if not self._frames:
            return []
        have = np.fromiter(self._frames, dtype=np.int64, count=len(self._frames))
        return [int(p) for p in have[np.isin(have, pfns)]]

    def drop(self, pfn: int) -> None:
        """Forget a frame's contents (it reads as untouched memory again)."""
        self._frames.pop(pfn, None)
