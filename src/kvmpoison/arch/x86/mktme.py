"""MKTME/TDX KeyIDs, per-KeyID keys, and the memory-encryption stand-in.

KeyID partitioning follows ``IA32_MKTME_KEYID_PARTITIONING`` as Linux reads it
in ``arch/x86/virt/vmx/tdx/tdx.c`` (``record_keyid_partitioning``): KeyID 0 is
the TME key (shared, no integrity), ``1..nr_mktme`` are shared MKTME KeyIDs,
and ``nr_mktme+1 .. nr_mktme+nr_tdx`` are private TDX KeyIDs.

The cipher is a modelling stand-in for AES-XTS: a keystream keyed by
(KeyID key, physical address), so a wrong-key decrypt gives garbage. The
tweak models "the PA encrypted under the per-HKID tweak key". Both are
vectorised over lines with numpy; only the MAC (``mac.py``) is cryptographic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

LINE_SIZE = 64
LINE_WORDS = LINE_SIZE // 8
TWEAK_SIZE = 16

U64Array = npt.NDArray[np.uint64]

_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_MIX1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_MIX2 = np.uint64(0x94D0_49BB_1331_11EB)
_WORD_OFFSETS = np.arange(LINE_WORDS, dtype=np.uint64) * np.uint64(8)
_PAGE_LINES = 64  # lines of a 4 KiB page
_PAGE_WORDS = _PAGE_LINES * LINE_WORDS
_PAGE_WORD_OFFSETS = np.arange(_PAGE_WORDS, dtype=np.uint64) * np.uint64(8)
_PAGE_LINE_OFFSETS = np.arange(_PAGE_LINES, dtype=np.uint64) * np.uint64(LINE_SIZE)


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# One line's key material in Python ints: the 8 keystream words and the tweak's first
# word as 9 lanes of one int, a lane per 128 bits, so a lane's 128-bit product never
# reaches the next lane and one mask after each step drops what a shift brought down.
_LANE_BITS = 128
_LANES = LINE_WORDS + 1
_U64 = (1 << 64) - 1
_ONES = sum(1 << (_LANE_BITS * i) for i in range(_LANES))
_LANE_MASK = _ONES * _U64
_LANE_GOLDEN = _ONES * int(_GOLDEN)
_LANE_OFFSETS = sum((8 * i) << (_LANE_BITS * i) for i in range(LINE_WORDS))
_MIX1_INT, _MIX2_INT, _GOLDEN_INT = int(_MIX1), int(_MIX2), int(_GOLDEN)


def _mix64_int(x: int) -> int:
    """:func:`mix64` of one 64-bit Python int."""
    z = (x + _GOLDEN_INT) & _U64
    z = ((z ^ (z >> 30)) * _MIX1_INT) & _U64
    z = ((z ^ (z >> 27)) * _MIX2_INT) & _U64
    return z ^ (z >> 31)


def mix64(x: U64Array) -> U64Array:
    """splitmix64's finaliser: a fast bijective 64-bit mixer (vectorised).

    Array integer arithmetic wraps without warnings; a 0-d input is made an array
    so scalar overflow warnings cannot fire either.
    """
    arr = np.asarray(x, dtype=np.uint64)
    if arr.ndim == 0:
        return mix64(arr.reshape(1)).reshape(())
    z = arr + _GOLDEN
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


@dataclass(frozen=True, slots=True)
class KeyIdSpace:
    """The KeyID partition of one platform."""

    nr_mktme_keyids: int = 15
    nr_tdx_keyids: int = 48

    @property
    def nr_keyids(self) -> int:
        return 1 + self.nr_mktme_keyids + self.nr_tdx_keyids

    @property
    def private_range(self) -> range:
        """Private (TDX) KeyIDs; Linux prints e.g. ``private KeyID range: [16, 64)``."""
        first = self.nr_mktme_keyids + 1
        return range(first, first + self.nr_tdx_keyids)

    def is_private(self, keyid: int) -> bool:
        return keyid in self.private_range

    def check(self, keyid: int) -> None:
        if not 0 <= keyid < self.nr_keyids:
            raise ValueError(f"KeyID {keyid} is outside 0..{self.nr_keyids - 1}")


@dataclass
class KeyTable:
    """Per-KeyID encryption and tweak keys, re-randomised by :meth:`program_key`.

    Keys derive from the machine seed, so a run is deterministic.
    """

    seed: int
    space: KeyIdSpace
    _generation: dict[int, int] = field(default_factory=dict)
    _cache: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    _lane_keys: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    def program_key(self, keyid: int) -> None:
        """PCONFIG ``MKTME_KEYID_SET_KEY_RANDOM`` (TDH.MNG.KEY.CONFIG for a TD)."""
        self.space.check(keyid)
        self._generation[keyid] = self._generation.get(keyid, 0) + 1

    def generation(self, keyid: int) -> int:
        """How many times ``keyid`` has been (re)programmed."""
        return self._generation.get(keyid, 0)

    def keys(self, keyid: int, gen: int | None = None) -> tuple[int, int]:
        """(encryption key, tweak key) of ``keyid`` (at generation ``gen``, default the
        current one), as 64-bit stand-in keys."""
        if gen is None:
            gen = self._generation.get(keyid, 0)
        cached = self._cache.get((keyid, gen))
        if cached is None:
            digest = hashlib.blake2b(
                f"kvmpoison-keyid/{self.seed}/{keyid}/{gen}".encode(), digest_size=16
            ).digest()
            cached = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"))
            self._cache[(keyid, gen)] = cached
        return cached

    def keystream(self, keyid: int, line_pas: U64Array,
                  gen: int | None = None) -> npt.NDArray[np.uint8]:
        """Keystream bytes, shape (n, 64), for the lines at ``line_pas`` under ``keyid``."""
        enc_key, _ = self.keys(keyid, gen)
        counters = line_pas.astype(np.uint64)[:, None] + _WORD_OFFSETS[None, :]
        ks = mix64(counters ^ np.uint64(enc_key))
        return ks.view(np.uint8).reshape(len(line_pas), LINE_SIZE)

    def page_keys(self, keyid: int, page_pa: int, gen: int | None = None) -> tuple[bytes, bytes]:
        """:meth:`keystream` and :meth:`tweak` of the 64 lines of the page at ``page_pa``,
        as bytes (4096 and 1024), computed together: one mixing pass covers the keystream
        words and the tweaks' first half."""
        enc_key, tweak_key = self.keys(keyid, gen)
        tk = np.uint64(tweak_key)
        x = np.empty(_PAGE_WORDS + _PAGE_LINES, dtype=np.uint64)
        np.bitwise_xor(np.uint64(page_pa) + _PAGE_WORD_OFFSETS, np.uint64(enc_key),
                       out=x[:_PAGE_WORDS])
        np.bitwise_xor(np.uint64(page_pa) + _PAGE_LINE_OFFSETS, tk, out=x[_PAGE_WORDS:])
        x = mix64(x)
        tweak = np.empty((_PAGE_LINES, 2), dtype=np.uint64)
        tweak[:, 0] = lo = x[_PAGE_WORDS:]
        tweak[:, 1] = mix64(lo ^ tk)
        return x[:_PAGE_WORDS].tobytes(), tweak.tobytes()

    def line_keys(self, keyid: int, line_pa: int, gen: int) -> tuple[int, bytes]:
        """:meth:`keystream` of the line at ``line_pa`` (as one little-endian int of its
        64 bytes) and its :meth:`tweak` (16 bytes), bit-identical to :meth:`page_keys`'s
        slice for that line, without a page's worth of work (the one-line write path)."""
        lane_keys = self._lane_keys.get((keyid, gen))
        if lane_keys is None:
            enc_key, tweak_key = self.keys(keyid, gen)
            keys = sum(enc_key << (_LANE_BITS * i) for i in range(LINE_WORDS))
            keys |= tweak_key << (_LANE_BITS * LINE_WORDS)
            lane_keys = self._lane_keys[(keyid, gen)] = (keys, tweak_key)
        keys, tweak_key = lane_keys
        mask = _LANE_MASK
        z = (((line_pa * _ONES + _LANE_OFFSETS) ^ keys) + _LANE_GOLDEN) & mask
        z = ((z ^ (z >> 30)) & mask) * _MIX1_INT & mask
        z = ((z ^ (z >> 27)) & mask) * _MIX2_INT & mask
        z = (z ^ (z >> 31)) & mask
        words = memoryview(z.to_bytes(_LANES * 16, "little")).cast("Q")
        lo = words[2 * LINE_WORDS]
        hi = _mix64_int(lo ^ tweak_key)
        return (int.from_bytes(words[0 : 2 * LINE_WORDS : 2].tobytes(), "little"),
                (lo | hi << 64).to_bytes(TWEAK_SIZE, "little"))

    def tweak(self, keyid: int, line_pas: U64Array,
              gen: int | None = None) -> npt.NDArray[np.uint8]:
        """The 128-bit MAC tweak per line, shape (n, 16): PA under the KeyID's tweak key."""
        _, tweak_key = self.keys(keyid, gen)
        base = line_pas.astype(np.uint64) ^ np.uint64(tweak_key)
        out = np.empty((len(line_pas), 2), dtype=np.uint64)
        out[:, 0] = lo = mix64(base)
        out[:, 1] = mix64(lo ^ np.uint64(tweak_key))
        return out.view(np.uint8).reshape(len(line_pas), TWEAK_SIZE)
