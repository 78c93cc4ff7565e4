"""The memory controller of a TDX platform: TD bit, MAC and poison per 64-byte line.

Access rules follow ``shared/research/hardware_model.md`` §5.3, from the TDX
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

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mac import LineMac, MacAlgo
from kvmpoison.arch.x86.mktme import LINE_SIZE, KeyIdSpace, KeyTable
from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.physmem import LINES_PER_PAGE, NO_KEYID, Frame, PhysicalMemory
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


class MemoryController:
    """Reads and writes physical memory under a KeyID, applying the integrity rules."""

    kernel_memory_failure = True  # the booted kernel's CONFIG_MEMORY_FAILURE (set at boot)

    def __init__(self, cfg: PlatformConfig):
        self.cfg = cfg
        self.keys = KeyTable(cfg.seed, cfg.keyids)
        mac_key = hashlib.sha3_256(f"kvmpoison-mac-key/{cfg.seed}".encode()).digest()[:16]
        self.mac = LineMac(mac_key, cfg.mac_bits, cfg.mac_algo)
        self.mem = PhysicalMemory(cfg.mem_bytes, self.mac.nbytes)

    # -- helpers -------------------------------------------------------------

    def _private(self, keyid: int) -> bool:
        return self.cfg.integrity is not IntegrityMode.OFF and self.cfg.keyids.is_private(keyid)

    def _line_pas(self, pfn: int, lines: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        return np.uint64(pfn << PAGE_SHIFT) + lines.astype(np.uint64) * np.uint64(LINE_SIZE)

    def _crypt(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int, data: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]:
        if self.cfg.integrity is IntegrityMode.OFF:
            return data.copy()
        return data ^ self.keys.keystream(keyid, self._line_pas(pfn, lines))

    def _frame(self, pfn: int) -> Frame:
        frame = self.mem.get(pfn)
        if frame is None:
            frame = self.mem.materialize(pfn)
            everything = np.arange(LINES_PER_PAGE)
            frame.ct[:] = self._crypt(pfn, everything, 0, frame.ct)
        return frame

    def _macs(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int, ct: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]:
        tweak = self.keys.tweak(keyid, self._line_pas(pfn, lines))
        return self.mac.compute(ct, tweak, np.ones(len(lines), dtype=bool))

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
        self.mem.check_range(pa, len(data))
        self.cfg.keyids.check(keyid)
        if how is WriteHow.MOVDIR64B and (pa % LINE_SIZE or len(data) % LINE_SIZE):
            raise ValueError("MOVDIR64B stores whole, 64-byte-aligned lines")
        buf = np.frombuffer(data, dtype=np.uint8)
        done = 0
        for pfn, off, n in self._chunks(pa, len(data)):
            self._write_frame(pfn, off, buf[done : done + n], keyid, how)
            done += n

    def _write_frame(
        self, pfn: int, off: int, buf: npt.NDArray[np.uint8], keyid: int, how: WriteHow
    ) -> None:
        frame = self.mem.get(pfn)
        if frame is None and keyid == 0 and not buf.any():
            return  # zeros under KeyID 0 onto an untouched frame change nothing
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
        frame = self._frame(pfn)
        private = self._private(keyid)
        ct = self._crypt(pfn, lines, keyid, plain)
        frame.intruder[lines] = np.where(
            frame.td[lines] & (not private), keyid, frame.intruder[lines]
        )
        frame.ct[lines] = ct
        frame.td[lines] = private
        frame.poison[lines] = False
        frame.writer[lines] = keyid
        with_mac = private and self.cfg.integrity is IntegrityMode.CI
        frame.has_mac[lines] = with_mac
        if with_mac:
            frame.mac[lines] = self._macs(pfn, lines, keyid, ct)

    def _write_partial_line(
        self, pfn: int, line: int, at: int, part: npt.NDArray[np.uint8], keyid: int, how: WriteHow
    ) -> None:
        frame = self._frame(pfn)
        if how is WriteHow.PARTIAL and self.cfg.erratum_pw_mce and frame.td[line]:
            frame.poison[line] = True  # X86_BUG_TDX_PW_MCE: poisoned at once
            frame.writer[line] = keyid
            return
        fill = self._read_lines(pfn, np.array([line]), keyid)
        if fill is None:
            return  # the fill returned poison; the line stays poisoned
        merged = fill.copy()
        merged[0, at : at + len(part)] = part
        self._write_full_lines(pfn, np.array([line]), merged, keyid)

    def inject_dram_error(self, pa: int) -> None:
        """A real (ECC) memory error on the line at ``pa``: poison MOVDIR64B cannot clear."""
        self.mem.check_range(pa, 1)
        self._frame(pa >> PAGE_SHIFT).hw_poison[(pa & (PAGE_SIZE - 1)) // LINE_SIZE] = True

    # -- reads ---------------------------------------------------------------

    def _read_lines(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int
    ) -> npt.NDArray[np.uint8] | None:
        """Plaintext of whole lines under ``keyid``, or None if any line is poison."""
        out, poisoned = self._read_lines_masked(pfn, lines, keyid)
        return None if poisoned.any() else out

    def _read_lines_masked(
        self, pfn: int, lines: npt.NDArray[np.intp], keyid: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        mode = self.cfg.integrity
        frame = self.mem.get(pfn)
        if frame is None and (keyid == 0 or mode is IntegrityMode.OFF):
            return (
                np.zeros((len(lines), LINE_SIZE), dtype=np.uint8),
                np.zeros(len(lines), dtype=bool),
            )
        frame = self._frame(pfn)
        poisoned = frame.poison[lines] | frame.hw_poison[lines]
        td = frame.td[lines]
        if self._private(keyid):
            bad = ~poisoned & ~td
            if mode is IntegrityMode.CI:
                check = ~poisoned & td & frame.has_mac[lines]
                if check.any():
                    idx = lines[check]
                    expect = self._macs(pfn, idx, keyid, frame.ct[idx])
                    mismatch = np.zeros(len(lines), dtype=bool)
                    mismatch[check] = (expect != frame.mac[idx]).any(axis=1)
                    bad |= mismatch
            frame.poison[lines[bad]] = True
            poisoned |= bad
            hidden = np.zeros(len(lines), dtype=bool)
        else:
            hidden = td & ~poisoned
            if hidden.any() and mode is IntegrityMode.CI and self.cfg.ci_shared_read_poisons:
                frame.poison[lines[hidden]] = True
                poisoned |= hidden
        out = self._crypt(pfn, lines, keyid, frame.ct[lines])
        out[poisoned | hidden] = 0
        return out, poisoned

    def read(self, pa: int, size: int, keyid: int) -> ReadResult:
        """Read ``size`` bytes at ``pa`` under ``keyid``; poisoned lines read as zeros."""
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
        frame = self.mem.get(pa >> PAGE_SHIFT)
        if frame is None:
            return LineState(False, False, False, False, 0, None)
        i = (pa & (PAGE_SIZE - 1)) // LINE_SIZE
        intruder = int(frame.intruder[i])
        return LineState(
            bool(frame.td[i]),
            bool(frame.has_mac[i]),
            bool(frame.poison[i]),
            bool(frame.hw_poison[i]),
            int(frame.writer[i]),
            None if intruder == NO_KEYID else intruder,
        )

    def tamper_ciphertext(self, pa: int, xor: int = 1) -> None:
        """A physical attack: flip ciphertext bits in DRAM without updating the MAC."""
        self.mem.check_range(pa, 1)
        frame = self._frame(pa >> PAGE_SHIFT)
        off = pa & (PAGE_SIZE - 1)
        frame.ct[off // LINE_SIZE, off % LINE_SIZE] ^= np.uint8(xor & 0xFF)
