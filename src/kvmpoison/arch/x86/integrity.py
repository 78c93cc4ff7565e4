"""The memory controller of a TDX platform: TD bit, MAC and poison per 64-byte line.

Access rules (docs/hardware.md) follow the TDX
Module Base Architecture Spec ch. 16 (non-ACT platforms):

* Writes are never checked. A full-line write sets TD = (KeyID is private),
  a fresh MAC (Ci mode, private KeyID), and clears integrity poison; it does
  not clear a real DRAM error.
* A sub-line write is a read-modify-write through the cache under the
  writer's KeyID. With the SPR/EMR erratum (``X86_BUG_TDX_PW_MCE``) a
  partial write that reaches the controller poisons a TD line at once.
* A private-KeyID read of a TD=0 line, or (Ci) of a line whose MAC fails,
  poisons the line and returns poison.
* A shared-KeyID read of a TD=1 line returns zeros; it poisons only when
  ``ci_shared_read_poisons`` is set (an unofficial reading of Ci mode).
* Poison is sticky: every later read returns it.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mac import LineMac, MacAlgo
from kvmpoison.arch.x86.mktme import LINE_SIZE, TWEAK_SIZE, KeyIdSpace, KeyTable
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.physmem import (
    LINE_HAS_MAC,
    LINE_POISON,
    LINE_TD,
    LINES_PER_PAGE,
    NO_KEYID,
    PhysicalMemory,
    ZeroState,
)
from kvmpoison.arch.x86.poison import ConsumptionPolicy, Ctx, consume_poison
from kvmpoison.outcome import Outcome


class IntegrityMode(enum.Enum):
    OFF = "off"  # no TDX: plain memory, no TD bit, no MAC
    LI = "li"  # logical integrity: TD bit only
    CI = "ci"  # cryptographic integrity: TD bit and MAC


class WriteHow(enum.Enum):
    CACHED = "cached"  # ordinary stores; full lines reach DRAM as full-line writebacks
    MOVDIR64B = "movdir64b"  # 64-byte direct store; must cover whole lines
    PARTIAL = "partial"  # UC/WC/non-temporal or sub-line DMA: partial writes reach DRAM


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    mem_bytes: int = 1 << 30
    integrity: IntegrityMode = IntegrityMode.CI
    mac_bits: int = 28
    mac_algo: MacAlgo = MacAlgo.HMAC_SHA3_256
    keyids: KeyIdSpace = field(default_factory=KeyIdSpace)
    erratum_pw_mce: bool = False
    ci_shared_read_poisons: bool = False
    seam_nr: bool = True
    lmce: bool = True
    seed: int = 0

    @property
    def consumption(self) -> ConsumptionPolicy:
        return ConsumptionPolicy(seam_nr=self.seam_nr, lmce=self.lmce)


@dataclass(frozen=True, slots=True)
class ReadResult:
    data: bytes
    poisoned_pa: int | None  # first poisoned line in the range, if any


@dataclass(frozen=True, slots=True)
class LineState:
    """Everything known about one line, hardware and oracle."""

    td: bool
    has_mac: bool
    poison: bool
    hw_poison: bool
    writer: int
    intruder: int | None  # last shared KeyID that wrote while the line was TD-owned


_ALL_LINES = np.arange(LINES_PER_PAGE)
_V = TypeVar("_V")


class _PageLineKeys:
    """One page's key material for the one-line path, line by line as lines are written:
    keystream ints and tweaks under one KeyID and key generation."""

    __slots__ = ("gen", "keyid", "ks", "misses", "tail")

    def __init__(self, keyid: int, gen: int) -> None:
        self.keyid, self.gen = keyid, gen
        self.ks: list[int | None] = [None] * LINES_PER_PAGE
        self.tail: list[bytes] = [b""] * LINES_PER_PAGE  # tweak + TD=1: a MAC input's end
        self.misses = 0  # lines computed alone; past _LINE_MISSES the page's keys are made


_LINE_MISSES = 8  # one line's keys cost ~1/16 of a page's: a page written line by line
# over many lines is cheaper made whole


class _LineKeys(dict[int, _PageLineKeys]):
    """The one-line path's key material by pfn; not copied with a machine (as below)."""

    def __deepcopy__(self, memo: dict[int, object]) -> _LineKeys:
        return _LineKeys()


class _KeyCache(dict[tuple[int, int, int], _V]):
    """Key material by (KeyID, key generation, pfn): a pure function of its key, so a
    copied machine starts with an empty cache instead of copying it."""

    def __deepcopy__(self, memo: dict[int, object]) -> _KeyCache[_V]:
        return _KeyCache()


class MemoryController:
    """Reads and writes physical memory under a KeyID, applying the integrity rules."""

    kernel_memory_failure = True  # the booted kernel's CONFIG_MEMORY_FAILURE (set at boot)

    def __init__(self, cfg: PlatformConfig):
        self.cfg = cfg
        self.keys = KeyTable(cfg.seed, cfg.keyids)
        mac_key = hashlib.sha3_256(f"kvmpoison-mac-key/{cfg.seed}".encode()).digest()[:16]
        self.mac = LineMac(mac_key, cfg.mac_bits, cfg.mac_algo)
        self.mem = PhysicalMemory(cfg.mem_bytes, self.mac.nbytes, cfg.keyids.nr_keyids)
        # Keystream and tweaks of recently used pages, by (KeyID, generation, pfn).
        self._page_keys_cache: _KeyCache[tuple[bytes, bytes]] = _KeyCache()
        # Per pfn: keystream ints and MAC-input tails per line, made as lines are written.
        self._line_keys: _LineKeys = _LineKeys()
        self._generations = self.keys._generation  # read directly on the one-line path
        self._line_limit = cfg.mem_bytes - LINE_SIZE + 1  # a line starting below fits
        self._plain = cfg.integrity is IntegrityMode.OFF
        self._ci = cfg.integrity is IntegrityMode.CI
        self._nr_keyids = cfg.keyids.nr_keyids
        self._private_keyids = frozenset(cfg.keyids.private_range)
        self._hmac = self.mac.hmac_states()
        # Device memory outside DRAM (a PCI BAR): pfn -> its bytes. Plain memory behind
        # the root complex: no KeyID, no MAC, no poison (drivers/char/mem.py maps it).
        self.iomem: dict[int, bytearray] = {}

    def add_iomem(self, pa: int, size: int) -> None:
        """Decode ``[pa, pa + size)`` as device memory (a BAR): page-aligned, above DRAM."""
        if pa % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or pa < self.cfg.mem_bytes:
            raise ValueError(f"device memory {pa:#x}+{size:#x} must be page-aligned and above "
                             "DRAM")
        for pfn in range(pa >> PAGE_SHIFT, (pa + size) >> PAGE_SHIFT):
            self.iomem.setdefault(pfn, bytearray(PAGE_SIZE))

    def _iomem_access(self, pa: int, size: int, data: bytes | None) -> bytes | None:
        """A read (``data`` None: the bytes) or write of device memory; None when
        ``[pa, pa + size)`` is not all device memory."""
        out = bytearray()
        done = 0
        while done < size:
            page = self.iomem.get((pa + done) >> PAGE_SHIFT)
            if page is None:
                return None
            off = (pa + done) & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, size - done)
            if data is None:
                out += page[off : off + n]
            else:
                page[off : off + n] = data[done : done + n]
            done += n
        return bytes(out)

    # -- helpers -------------------------------------------------------------

    def _private(self, keyid: int) -> bool:
        return self.cfg.integrity is not IntegrityMode.OFF and self.cfg.keyids.is_private(keyid)

    def _line_pas(self, pfn: int, lines: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        return np.uint64(pfn << PAGE_SHIFT) + lines.astype(np.uint64) * np.uint64(LINE_SIZE)

    def _page_keys(self, keyid: int, gen: int | None, pfn: int) -> tuple[bytes, bytes]:
        """The page's keystream (64 lines of 64 bytes) and MAC tweaks (64 of 16 bytes)
        under ``keyid`` at key generation ``gen`` (default: current), cached for the
        last 256 pages: a hot page is encrypted and MACed without recomputing them."""
        if gen is None:
            gen = self.keys.generation(keyid)
        key = (keyid, gen, pfn)
        got = self._page_keys_cache.get(key)
        if got is None:
            got = self.keys.page_keys(keyid, pfn << PAGE_SHIFT, gen)
            if len(self._page_keys_cache) >= 256:
                self._page_keys_cache.pop(next(iter(self._page_keys_cache)))
            self._page_keys_cache[key] = got
        return got

    def _crypt(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int, data: npt.NDArray[np.uint8],
        gen: int | None = None,
    ) -> npt.NDArray[np.uint8]:
        if self.cfg.integrity is IntegrityMode.OFF:
            return data.copy()
        ks = np.frombuffer(self._page_keys(keyid, gen, pfn)[0], dtype=np.uint8)
        return data ^ ks.reshape(LINES_PER_PAGE, LINE_SIZE)[lines]

    def _macs(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int, ct: npt.NDArray[np.uint8],
        gen: int | None = None,
    ) -> npt.NDArray[np.uint8]:
        tw = np.frombuffer(self._page_keys(keyid, gen, pfn)[1], dtype=np.uint8)
        tweak = tw.reshape(LINES_PER_PAGE, TWEAK_SIZE)[lines]
        return self.mac.compute(ct, tweak, np.ones(len(lines), dtype=bool))

    def _zero_flags(self, keyid: int) -> int:
        """The per-line flags of a zero-form frame holding ``keyid``'s zeros."""
        if not self._private(keyid):
            return 0
        return LINE_TD | (LINE_HAS_MAC if self.cfg.integrity is IntegrityMode.CI else 0)

    def _slot(self, pfn: int) -> int:
        """The frame's slot, storing it first if it is in zero form (its zeros encrypted
        and MACed under the KeyID and key generation they were written with)."""
        mem = self.mem
        slot = int(mem.slot_of[pfn]) - 1
        if slot >= 0:
            return slot
        keyid, gen_at_write = mem.zero_state(pfn)
        # Never-touched memory takes KeyID 0's current key when first stored.
        gen = None if mem.zstate[pfn] == 0 else gen_at_write
        slot = mem.new_slot(pfn)
        everything = np.arange(LINES_PER_PAGE)
        ct = self._crypt(pfn, everything, keyid, np.zeros((LINES_PER_PAGE, LINE_SIZE),
                                                           dtype=np.uint8), gen)
        mem.ct[slot] = ct
        flags = self._zero_flags(keyid)
        mem.flags[slot] = flags
        mem.writer[slot] = keyid
        if flags & LINE_HAS_MAC:
            mem.mac[slot] = self._macs(pfn, everything, keyid, ct, gen)
        return slot

    def _td_lines(self, pfn: int, lines: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        slot = self.mem.slot(pfn)
        if slot >= 0:
            return np.asarray((self.mem.flags[slot, lines] & LINE_TD) != 0, dtype=np.bool_)
        keyid, _ = self.mem.zero_state(pfn)
        return np.full(len(lines), bool(self._zero_flags(keyid) & LINE_TD))

    def _note_intruder(self, pfn: int, lines: npt.NDArray[np.intp], keyid: int,
                       private: bool) -> None:
        """A shared KeyID writing over TD lines is remembered (model-only oracle)."""
        if private:
            return
        td = self._td_lines(pfn, lines)
        if td.any():
            intruder = self.mem.intruder.get(pfn)
            if intruder is None:
                intruder = np.full(LINES_PER_PAGE, NO_KEYID, dtype=np.int16)
                self.mem.intruder[pfn] = intruder
            intruder[lines[td]] = keyid

    @staticmethod
    def _chunks(pa: int, size: int) -> list[tuple[int, int, int]]:
        """Split [pa, pa+size) into (pfn, offset in frame, length) pieces."""
        out = []
        end = pa + size
        while pa < end:
            pfn, off = pa >> PAGE_SHIFT, pa & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, end - pa)
            out.append((pfn, off, n))
            pa += n
        return out

    # -- writes --------------------------------------------------------------

    def write(self, pa: int, data: bytes, keyid: int, how: WriteHow = WriteHow.CACHED) -> None:
        """Store ``data`` at ``pa`` under ``keyid``. Writes are never checked."""
        if (len(data) == LINE_SIZE and not pa % LINE_SIZE and 0 <= pa < self._line_limit
                and 0 <= keyid < self._nr_keyids and self._write_one_line(pa, data, keyid)):
            return
        if pa >= self.cfg.mem_bytes and self.iomem and \
                self._iomem_access(pa, len(data), data) is not None:
            return  # device memory: the KeyID does not reach it
        self.mem.check_range(pa, len(data))
        self.cfg.keyids.check(keyid)
        if how is WriteHow.MOVDIR64B and (pa % LINE_SIZE or len(data) % LINE_SIZE):
            raise ValueError("MOVDIR64B stores whole, 64-byte-aligned lines")
        buf = np.frombuffer(data, dtype=np.uint8)
        done = 0
        for pfn, off, n in self._chunks(pa, len(data)):
            self._write_frame(pfn, off, buf[done : done + n], keyid, how)
            done += n

    def _write_one_line(self, pa: int, data: bytes, keyid: int) -> bool:
        """One whole, aligned line into a stored frame: the general path's result, with
        Python ints, bytes and memoryviews instead of numpy. False: not handled here."""
        mem = self.mem
        pfn = pa >> PAGE_SHIFT
        slot = mem.slot_mv[pfn] - 1
        if slot < 0 or self._plain:
            return False
        private = keyid in self._private_keyids
        at = (slot << 6) | ((pa & (PAGE_SIZE - 1)) >> 6)  # line index over all slots
        flags = mem.flags_mv
        if not private and flags[at] & LINE_TD:
            return False  # an intruder to record: the general path does it
        # Keyed by pfn alone (an int: no tuple for the garbage collector to count), for the
        # KeyID and key generation the entry names.
        gen = self._generations.get(keyid, 0)
        entry = self._line_keys.get(pfn)
        if entry is None or entry.keyid != keyid or entry.gen != gen:
            entry = _PageLineKeys(keyid, gen)
            if len(self._line_keys) >= 256:
                self._line_keys.pop(next(iter(self._line_keys)))
            self._line_keys[pfn] = entry
        line = at & (LINES_PER_PAGE - 1)
        ks_line = entry.ks[line]
        if ks_line is None:
            ks_line = self._line_key(entry, pfn, line)
        ct = (int.from_bytes(data, "little") ^ ks_line).to_bytes(LINE_SIZE, "little")
        mem.ct_mv[at << 6 : (at + 1) << 6] = ct
        mem.writer_mv[at] = keyid
        if private and self._ci:
            nb = mem.mac_nbytes
            end = (at + 1) * nb
            msg = ct + entry.tail[line]
            macs = mem.mac_mv
            if self._hmac is not None:  # the MAC inline: HMAC-SHA3-256 from keyed states
                copy_inner, copy_outer, mask = self._hmac
                h = copy_inner()
                h.update(msg)
                o = copy_outer()
                o.update(h.digest())
                digest = o.digest()
                macs[end - nb : end] = digest[:nb]
                macs[end - 1] = digest[nb - 1] & mask
            else:
                macs[end - nb : end] = self.mac_line(msg)
            flags[at] = LINE_TD | LINE_HAS_MAC
        else:
            flags[at] = LINE_TD if private else 0
        return True

    def _line_key(self, entry: _PageLineKeys, pfn: int, line: int) -> int:
        """Fill ``entry``'s keystream int and tweak of ``line``: from the page's keys when
        they are at hand (or the page has had many lines written), else the line's alone
        (a cold page's one-line write need not pay for 64 lines)."""
        keyid, gen = entry.keyid, entry.gen
        page = self._page_keys_cache.get((keyid, gen, pfn))
        if page is None and entry.misses >= _LINE_MISSES:
            page = self._page_keys(keyid, gen, pfn)
        if page is None:
            entry.misses += 1
            ks, tweak = self.keys.line_keys(keyid, (pfn << PAGE_SHIFT) | (line * LINE_SIZE),
                                            gen)
        else:
            o = line * LINE_SIZE
            ks = int.from_bytes(page[0][o : o + LINE_SIZE], "little")
            tweak = page[1][line * TWEAK_SIZE : (line + 1) * TWEAK_SIZE]
        entry.ks[line] = ks
        entry.tail[line] = tweak + b"\x01"
        return ks

    def mac_line(self, msg: bytes) -> bytes:
        """One line's MAC from its ``ct || tweak || td`` message (the algorithm's own path)."""
        if self.mac.algo is MacAlgo.HMAC_SHA3_256:
            return self.mac.mac_line(msg)
        arr = np.frombuffer(msg, dtype=np.uint8)
        macs = self.mac.compute(arr[None, :LINE_SIZE], arr[None, LINE_SIZE:-1],
                                np.array([bool(arr[-1])]))
        return bytes(macs[0].tobytes())

    def _write_frame(
        self, pfn: int, off: int, buf: npt.NDArray[np.uint8], keyid: int, how: WriteHow
    ) -> None:
        mem = self.mem
        zeros = not buf.any()
        if zeros and keyid == 0 and mem.slot_of[pfn] == 0 and mem.zstate[pfn] == 0:
            return  # zeros under KeyID 0 onto an untouched frame change nothing
        if zeros and off == 0 and len(buf) == PAGE_SIZE:
            # A page of zeros: the frame goes to zero form (nothing stored).
            self._note_intruder(pfn, _ALL_LINES, keyid, self._private(keyid))
            mem.to_zero_form(pfn, (keyid, self.keys.generation(keyid)))
            return
        first, last = off // LINE_SIZE, (off + len(buf) - 1) // LINE_SIZE
        head, tail = off % LINE_SIZE, (off + len(buf)) % LINE_SIZE
        full_lo = first + (1 if head else 0)
        full_hi = last - (1 if tail else 0)
        if full_hi >= full_lo:
            start = full_lo * LINE_SIZE - off
            lines = np.arange(full_lo, full_hi + 1)
            plain = buf[start : start + len(lines) * LINE_SIZE].reshape(len(lines), LINE_SIZE)
            self._write_full_lines(pfn, lines, plain, keyid)
        for line in sorted({first, last}):
            lo = max(off, line * LINE_SIZE)
            hi = min(off + len(buf), (line + 1) * LINE_SIZE)
            if hi - lo < LINE_SIZE:
                self._write_partial_line(
                    pfn, line, lo % LINE_SIZE, buf[lo - off : hi - off], keyid, how
                )

    def _write_full_lines(
        self, pfn: int, lines: npt.NDArray[np.intp], plain: npt.NDArray[np.uint8], keyid: int
    ) -> None:
        mem = self.mem
        slot = self._slot(pfn)
        private = self._private(keyid)
        ct = self._crypt(pfn, lines, keyid, plain)
        self._note_intruder(pfn, lines, keyid, private)
        mem.ct[slot, lines] = ct
        mem.writer[slot, lines] = keyid
        with_mac = private and self.cfg.integrity is IntegrityMode.CI
        mem.flags[slot, lines] = (LINE_TD if private else 0) | (LINE_HAS_MAC if with_mac else 0)
        if with_mac:
            mem.mac[slot, lines] = self._macs(pfn, lines, keyid, ct)

    def _write_partial_line(
        self, pfn: int, line: int, at: int, part: npt.NDArray[np.uint8], keyid: int, how: WriteHow
    ) -> None:
        if how is WriteHow.PARTIAL and self.cfg.erratum_pw_mce and \
                self._td_lines(pfn, np.array([line]))[0]:
            slot = self._slot(pfn)
            self.mem.flags[slot, line] |= LINE_POISON  # X86_BUG_TDX_PW_MCE: poisoned at once
            self.mem.writer[slot, line] = keyid
            return
        fill = self._read_lines(pfn, np.array([line]), keyid)
        if fill is None:
            return  # the fill returned poison; the line stays poisoned
        merged = fill.copy()
        merged[0, at : at + len(part)] = part
        self._write_full_lines(pfn, np.array([line]), merged, keyid)

    def clear_frames(self, pfns: npt.NDArray[np.int64]) -> None:
        """A page of zeros written under KeyID 0 to each frame (``clear_page``), in bulk:
        frames holding anything go back to never-touched zeros."""
        mem = self.mem
        held = mem.allocated_pfns_in(pfns)
        if not len(held):
            return
        # Frames with TD lines record KeyID 0 as their intruder (rare; the rest is bulk).
        slots = mem.slot_of[held] - 1
        stored = slots >= 0
        has_td = np.zeros(len(held), dtype=bool)
        has_td[stored] = ((mem.flags[slots[stored]] & LINE_TD) != 0).any(axis=1)
        zero_td = np.array([bool(self._zero_flags(k) & LINE_TD) for k, _ in mem.zero_states])
        has_td[~stored] = zero_td[mem.zstate[held[~stored]]]
        everything = np.arange(LINES_PER_PAGE)
        for pfn in held[has_td].tolist():
            self._note_intruder(pfn, everything, 0, False)
        mem.to_zero_form_bulk(held, (0, self.keys.generation(0)))

    def inject_dram_error(self, pa: int) -> None:
        """A real (ECC) memory error on the line at ``pa``: poison MOVDIR64B cannot clear."""
        self.mem.check_range(pa, 1)
        pfn = pa >> PAGE_SHIFT
        hw = self.mem.hw_poison.get(pfn)
        if hw is None:
            hw = self.mem.hw_poison[pfn] = np.zeros(LINES_PER_PAGE, dtype=bool)
        hw[(pa & (PAGE_SIZE - 1)) // LINE_SIZE] = True

    # -- reads ---------------------------------------------------------------

    def _read_lines(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int
    ) -> npt.NDArray[np.uint8] | None:
        """Plaintext of whole lines under ``keyid``, or None if any line is poison."""
        out, poisoned = self._read_lines_masked(pfn, lines, keyid)
        return None if poisoned.any() else out

    def _reads_own_zeros(self, pfn: int, keyid: int) -> bool:
        """A zero-form frame read under the KeyID (and key) whose zeros it holds: zeros,
        no poison, no MAC failure (the MAC was made from these very inputs)."""
        mem = self.mem
        if mem.slot_of[pfn] != 0 or pfn in mem.hw_poison:
            return False
        if self.cfg.integrity is IntegrityMode.OFF:
            return True
        index = int(mem.zstate[pfn])
        if index == 0:  # never touched: zeros under KeyID 0, whatever its key generation
            return keyid == 0
        state: ZeroState = mem.zero_states[index]
        return state == (keyid, self.keys.generation(keyid))

    def _read_lines_masked(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        mode = self.cfg.integrity
        mem = self.mem
        if self._reads_own_zeros(pfn, keyid):
            return (
                np.zeros((len(lines), LINE_SIZE), dtype=np.uint8),
                np.zeros(len(lines), dtype=bool),
            )
        slot = self._slot(pfn)
        flags = mem.flags[slot, lines]
        poisoned = (flags & LINE_POISON) != 0
        hw = mem.hw_poison.get(pfn)
        if hw is not None:
            poisoned |= hw[lines]
        td = (flags & LINE_TD) != 0
        if self._private(keyid):
            bad = ~poisoned & ~td
            if mode is IntegrityMode.CI:
                check = ~poisoned & td & ((flags & LINE_HAS_MAC) != 0)
                if check.any():
                    idx = lines[check]
                    expect = self._macs(pfn, idx, keyid, mem.ct[slot, idx])
                    mismatch = np.zeros(len(lines), dtype=bool)
                    mismatch[check] = (expect != mem.mac[slot, idx]).any(axis=1)
                    bad |= mismatch
            mem.flags[slot, lines[bad]] |= LINE_POISON
            poisoned |= bad
            hidden = np.zeros(len(lines), dtype=bool)
        else:
            hidden = td & ~poisoned
            if hidden.any() and mode is IntegrityMode.CI and self.cfg.ci_shared_read_poisons:
                mem.flags[slot, lines[hidden]] |= LINE_POISON
                poisoned |= hidden
        out = self._crypt(pfn, lines, keyid, mem.ct[slot, lines])
        out[poisoned | hidden] = 0
        return out, poisoned

    def read(self, pa: int, size: int, keyid: int) -> ReadResult:
        """Read ``size`` bytes at ``pa`` under ``keyid``; poisoned lines read as zeros."""
        if pa >= self.cfg.mem_bytes and self.iomem:
            got = self._iomem_access(pa, size, None)
            if got is not None:
                return ReadResult(got, None)
        self.mem.check_range(pa, size)
        self.cfg.keyids.check(keyid)
        parts: list[bytes] = []
        first_poison: int | None = None
        for pfn, off, n in self._chunks(pa, size):
            lines = np.arange(off // LINE_SIZE, (off + n - 1) // LINE_SIZE + 1)
            data, poisoned = self._read_lines_masked(pfn, lines, keyid)
            if first_poison is None and poisoned.any():
                line = int(lines[np.argmax(poisoned)])
                first_poison = (pfn << PAGE_SHIFT) + line * LINE_SIZE
            start = off - int(lines[0]) * LINE_SIZE
            parts.append(data.reshape(-1)[start : start + n].tobytes())
        return ReadResult(b"".join(parts), first_poison)

    def load(
        self,
        pa: int,
        size: int,
        keyid: int,
        ctx: Ctx,
        *,
        vaddr: int | None = None,
        mc_safe_errno: int = errno.EFAULT,
    ) -> Outcome:
        """A CPU load that consumes what it reads: data, or the fate of consumed poison."""
        res = self.read(pa, size, keyid)
        if res.poisoned_pa is None:
            return Outcome.ok(res.data)
        if vaddr is not None:
            vaddr += res.poisoned_pa - pa if res.poisoned_pa > pa else 0
        policy = self.cfg.consumption
        if not self.kernel_memory_failure:
            policy = dataclasses.replace(policy, memory_failure=False)
        return consume_poison(
            res.poisoned_pa, ctx, policy, vaddr=vaddr, mc_safe_errno=mc_safe_errno
        )

    # -- inspection ----------------------------------------------------------

    def line_state(self, pa: int) -> LineState:
        self.mem.check_range(pa, 1)
        mem = self.mem
        pfn = pa >> PAGE_SHIFT
        i = (pa & (PAGE_SIZE - 1)) // LINE_SIZE
        hw = mem.hw_poison.get(pfn)
        hw_poison = bool(hw[i]) if hw is not None else False
        intr = mem.intruder.get(pfn)
        intruder = NO_KEYID if intr is None else int(intr[i])
        slot = mem.slot(pfn)
        if slot >= 0:
            flags = int(mem.flags[slot, i])
            writer = int(mem.writer[slot, i])
        else:
            writer, _ = mem.zero_state(pfn)
            flags = self._zero_flags(writer)
        return LineState(
            bool(flags & LINE_TD),
            bool(flags & LINE_HAS_MAC),
            bool(flags & LINE_POISON),
            hw_poison,
            writer,
            None if intruder == NO_KEYID else intruder,
        )

    def tamper_ciphertext(self, pa: int, xor: int = 1) -> None:
        """A physical attack: flip ciphertext bits in DRAM without updating the MAC."""
        self.mem.check_range(pa, 1)
        slot = self._slot(pa >> PAGE_SHIFT)
        off = pa & (PAGE_SIZE - 1)
        self.mem.ct[slot, off // LINE_SIZE, off % LINE_SIZE] ^= np.uint8(xor & 0xFF)
