"""Physical memory: frame data and per-line integrity metadata in shared arrays.

The per-line state is what a non-ACT TDX platform keeps in the ECC bits (TD
bit, MAC, poison) plus two model-only oracle fields (last writer KeyID, last
shared-KeyID intruder).

A frame is in one of two forms:

* **zero form** (no storage): every line holds the encryption of zeros under
  one KeyID and key generation, with that KeyID as writer, TD = (KeyID is
  private), a valid MAC where integrity wants one, and no integrity poison.
  ``zstate[pfn]`` names the (KeyID, generation) pair; 0 is never-touched memory
  (KeyID 0, read as zeros under any generation of its key, as before frames had
  forms). A full-page write of zeros puts a frame back in
  this form, so an all-zero page under any KeyID stores nothing.
* **stored form**: a slot in the slot arrays (``ct``, ``mac``, ``flags``,
  ``writer``), 4480 bytes per frame with 28-bit MACs and one-byte KeyIDs. The
  arrays are anonymous ``MAP_NORESERVE`` mappings as large as memory, so host
  RAM is only spent on slots handed out (densely, lowest first).

Rare state lives in dicts keyed by pfn: real DRAM errors (``hw_poison``) and
intruders. Both survive a change of form.
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mktme import LINE_SIZE
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE

LINES_PER_PAGE = PAGE_SIZE // LINE_SIZE
NO_KEYID = -1

# Per-line bits of ``flags`` in a stored frame.
LINE_TD = 1
LINE_HAS_MAC = 2
LINE_POISON = 4

_MAP_NORESERVE = 0x4000  # not exported by Python's mmap module

ZeroState = tuple[int, int]  # (KeyID, key generation) whose zeros a zero-form frame holds


def lazy_zeros(shape: tuple[int, ...], dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A zero-filled array whose pages cost host RAM only once written.

    An anonymous private ``MAP_NORESERVE`` mapping: no commit charge, so it may be
    as large as the modelled memory even where that exceeds the host's.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class PhysicalMemory:
    """The DRAM of one machine, ``mem_bytes`` long."""

    # The slot arrays (see the module docstring), made by _reserve_slots.
    ct: npt.NDArray[np.uint8]
    mac: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    writer: npt.NDArray[np.signedinteger[Any]]

    def __init__(self, mem_bytes: int, mac_nbytes: int, nr_keyids: int = 128):
        if mem_bytes <= 0 or mem_bytes % PAGE_SIZE:
            raise ValueError(f"memory size must be a positive multiple of {PAGE_SIZE}")
        self.mem_bytes = mem_bytes
        self.nr_frames = n = mem_bytes >> PAGE_SHIFT
        self.mac_nbytes = mac_nbytes
        # The writer KeyID per line: one byte while every KeyID fits in one.
        self.writer_dtype: type[np.signedinteger[Any]] = np.int8 if nr_keyids <= 128 \
            else np.int16
        # Per pfn: slot + 1 of a stored frame (0: zero form), and the zero form's state.
        self.slot_of: npt.NDArray[np.int32] = np.zeros(n, dtype=np.int32)
        self.zstate: npt.NDArray[np.uint16] = np.zeros(n, dtype=np.uint16)
        self.zero_states: list[ZeroState] = [(0, 0)]
        self._zero_index: dict[ZeroState, int] = {(0, 0): 0}
        # Slot arrays.
        self._reserve_slots(0)
        self._top = 0  # slots [0, _top) have been handed out at least once
        self._free: list[int] = []
        # Rare per-line state, by pfn.
        self.hw_poison: dict[int, npt.NDArray[np.bool_]] = {}
        self.intruder: dict[int, npt.NDArray[np.int16]] = {}

    def _reserve_slots(self, top: int) -> None:
        """(Re)make the slot arrays, keeping slots [0, top): a lazy reservation as large
        as memory, or where the host refuses one (strict overcommit), plain arrays that
        grow by doubling (:meth:`new_slot`)."""
        n = self.nr_frames
        shapes: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            "ct": ((LINES_PER_PAGE, LINE_SIZE), np.uint8),
            "mac": ((LINES_PER_PAGE, self.mac_nbytes), np.uint8),
            "flags": ((LINES_PER_PAGE,), np.uint8),
            "writer": ((LINES_PER_PAGE,), self.writer_dtype),
        }
        old = {name: getattr(self, name) for name in shapes if hasattr(self, name)}
        try:
            made = {name: lazy_zeros((n, *shape), dtype) for name, (shape, dtype) in shapes.items()}
            self._cap = n
        except OSError:
            cap = min(n, max(256, 2 * top, 2 * getattr(self, "_cap", 0)))
            made = {name: np.zeros((cap, *shape), dtype=dtype)
                    for name, (shape, dtype) in shapes.items()}
            self._cap = cap
        for name, arr in made.items():
            if name in old:
                arr[:top] = old[name][:top]
            setattr(self, name, arr)
        self._views()

    def _views(self) -> None:
        """Flat memoryviews of the per-pfn and slot arrays, in their element types: the
        one-line paths index them far more cheaply than numpy scalar indexing."""
        self.slot_mv = self.slot_of.data.cast("B").cast("i")
        self.ct_mv = self.ct.reshape(-1).data.cast("B")
        self.mac_mv = self.mac.reshape(-1).data.cast("B")
        self.flags_mv = self.flags.reshape(-1).data.cast("B")
        self.writer_mv = self.writer.reshape(-1).data.cast("B").cast(
            "b" if self.writer.itemsize == 1 else "h")

    def check_range(self, pa: int, size: int) -> None:
        if size < 0 or pa < 0 or pa + size > self.mem_bytes:
            raise ValueError(
                f"physical range [{pa:#x}, {pa + size:#x}) is outside memory of "
                f"{self.mem_bytes:#x} bytes"
            )

    # -- forms ---------------------------------------------------------------------

    def slot(self, pfn: int) -> int:
        """The slot of a stored frame, or -1 for a frame in zero form."""
        return int(self.slot_of[pfn]) - 1

    def zero_state(self, pfn: int) -> ZeroState:
        return self.zero_states[int(self.zstate[pfn])]

    def new_slot(self, pfn: int) -> int:
        """Give ``pfn`` a slot (its arrays are the caller's to fill)."""
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._top
            if slot >= self._cap:
                self._reserve_slots(slot)
            self._top += 1
        self.slot_of[pfn] = slot + 1
        return slot

    def to_zero_form(self, pfn: int, state: ZeroState) -> None:
        """The frame now holds the zeros of ``state``; its slot (if any) is released."""
        slot = self.slot(pfn)
        if slot >= 0:
            self.slot_of[pfn] = 0
            self._free.append(slot)
        self.zstate[pfn] = self.zero_index(state)

    # -- inspection -----------------------------------------------------------------

    @property
    def nr_allocated(self) -> int:
        """Frames in stored form (those that cost a slot)."""
        return self._top - len(self._free)

    def allocated_pfns(self) -> list[int]:
        """Frames that hold anything but never-touched zeros (stored, or zeros of a key)."""
        return [int(p) for p in np.flatnonzero((self.slot_of != 0) | (self.zstate != 0))]

    def holds(self, pfn: int) -> bool:
        """Whether the frame holds anything but never-touched zeros."""
        return bool(self.slot_of[pfn] != 0 or self.zstate[pfn] != 0)

    def allocated_pfns_in(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The pfns among ``pfns`` holding anything but never-touched zeros.

        A per-pfn lookup: its cost is ``len(pfns)``, not the number of frames in use.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        held = (self.slot_of[pfns] != 0) | (self.zstate[pfns] != 0)
        return np.asarray(pfns[held], dtype=np.int64)

    def zero_index(self, state: ZeroState) -> int:
        """The ``zstate`` value of ``state`` (registered on first use)."""
        index = self._zero_index.get(state)
        if index is None:
            index = len(self.zero_states)
            if index > np.iinfo(np.uint16).max:
                raise RuntimeError("too many (KeyID, key generation) pairs")
            self.zero_states.append(state)
            self._zero_index[state] = index
        return index

    def to_zero_form_bulk(self, pfns: npt.NDArray[np.int64], state: ZeroState) -> None:
        """:meth:`to_zero_form` for many frames at once."""
        slots = self.slot_of[pfns]
        self._free.extend((slots[slots != 0] - 1).tolist())
        self.slot_of[pfns] = 0
        self.zstate[pfns] = self.zero_index(state)

    def drop(self, pfn: int) -> None:
        """Forget a frame's contents (it reads as untouched memory again)."""
        self.to_zero_form(pfn, (0, 0))
        self.hw_poison.pop(pfn, None)
        self.intruder.pop(pfn, None)

    # -- copies -------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, object]) -> PhysicalMemory:
        """A copy sharing nothing: the slot arrays are copied up to the last slot used."""
        new = PhysicalMemory.__new__(PhysicalMemory)
        memo[id(self)] = new
        new.mem_bytes, new.nr_frames, new.mac_nbytes = self.mem_bytes, self.nr_frames, \
            self.mac_nbytes
        new.writer_dtype = self.writer_dtype
        new.slot_of = self.slot_of.copy()
        new.zstate = self.zstate.copy()
        new.zero_states = list(self.zero_states)
        new._zero_index = dict(self._zero_index)
        top = self._top
        new._cap = self._cap
        new._reserve_slots(0)
        for name in ("ct", "mac", "flags", "writer"):
            getattr(new, name)[:top] = getattr(self, name)[:top]
        new._top = top
        new._free = list(self._free)
        new.hw_poison = {p: a.copy() for p, a in self.hw_poison.items()}
        new.intruder = {p: a.copy() for p, a in self.intruder.items()}
        return new
