"""The per-line integrity MAC of TDX Ci mode.

Inputs follow the TDX Module spec (Table 16.1): the 512-bit ciphertext, the
128-bit address tweak, the TD-owner bit, and one platform MAC key. The
faithful construction is HMAC-SHA3-256 over ``ct || tweak || td`` truncated to
its top ``mac_bits`` bits (28 on real parts).

HMAC is computed the RFC 2104 way, with the key-block states precomputed
once: each line then costs two Keccak permutations (inner and outer hash),
against one for a plain SHA3-256 of the line. Copying two pre-keyed hashlib
states gives the bytes of ``hmac.digest(key, msg, "sha3_256")`` (the tests
check it) at about 0.7x the cost of ``hmac.HMAC.copy()`` per line here.

``mix64`` is a documented *stand-in* for large runs: a keyed, vectorised
multiply-xorshift over the same inputs. It is not a cryptographic MAC and is
never the default.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.mktme import LINE_SIZE, TWEAK_SIZE, mix64

MAC_INPUT_SIZE = LINE_SIZE + TWEAK_SIZE + 1
_SHA3_256_BLOCK = 136  # SHA3-256 rate in bytes

U8Array = npt.NDArray[np.uint8]


class MacAlgo(enum.Enum):
    HMAC_SHA3_256 = "hmac-sha3-256"
    MIX64 = "mix64"  # stand-in, see module docstring


class LineMac:
    """Computes truncated MACs for batches of lines."""

    def __init__(self, key: bytes, mac_bits: int = 28, algo: MacAlgo = MacAlgo.HMAC_SHA3_256):
        if not 1 <= mac_bits <= 256:
            raise ValueError(f"mac_bits must be within 1..256, got {mac_bits}")
        if algo is MacAlgo.MIX64 and mac_bits > 64:
            raise ValueError("the mix64 stand-in produces at most 64 bits")
        self.mac_bits = mac_bits
        self.algo = algo
        self.nbytes = (mac_bits + 7) // 8
        if len(key) > _SHA3_256_BLOCK:  # RFC 2104: long keys are hashed first
            key = hashlib.sha3_256(key).digest()
        block = key.ljust(_SHA3_256_BLOCK, b"\0")
        self._inner = hashlib.sha3_256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha3_256(bytes(b ^ 0x5C for b in block))
        spare = self.nbytes * 8 - mac_bits
        self._last_mask = (0xFF << spare) & 0xFF
        self._mix_key = np.uint64(int.from_bytes(hashlib.sha3_256(key).digest()[:8], "little"))

    def __deepcopy__(self, memo: dict[int, object]) -> LineMac:
        return self  # immutable after __init__ (the hash states are only ever copied)

    def hmac_states(self) -> tuple[Callable[[], Any], Callable[[], Any], int] | None:
        """(copy of the keyed inner state, of the outer state, mask of the last MAC byte)
        for callers that inline :meth:`mac_line`; None for the mix64 stand-in."""
        if self.algo is not MacAlgo.HMAC_SHA3_256:
            return None
        return self._inner.copy, self._outer.copy, self._last_mask

    def mac_line(self, msg: bytes) -> bytes:
        """The truncated HMAC-SHA3-256 of one ``ct || tweak || td`` message (the scalar path:
        two hashlib state copies, no numpy), bit-identical to :meth:`compute`."""
        h = self._inner.copy()
        h.update(msg)
        o = self._outer.copy()
        o.update(h.digest())
        mac = o.digest()[: self.nbytes]
        if self._last_mask != 0xFF:
            mac = mac[:-1] + bytes((mac[-1] & self._last_mask,))
        return mac

    def compute(self, ct: U8Array, tweak: U8Array, td: npt.NDArray[np.bool_]) -> U8Array:
        """MACs of n lines, shape (n, nbytes), left-aligned (top ``mac_bits`` bits kept)."""
        n = ct.shape[0]
        if self.algo is MacAlgo.MIX64:
            full = self._mix64(ct, tweak, td).astype(">u8").view(np.uint8).reshape(n, 8)
        else:
            full = self._hmac_sha3(ct, tweak, td)
        return self._truncate(full[:, : self.nbytes])

    def _hmac_sha3(self, ct: U8Array, tweak: U8Array, td: npt.NDArray[np.bool_]) -> U8Array:
        n = ct.shape[0]
        msgs = np.empty((n, MAC_INPUT_SIZE), dtype=np.uint8)
        msgs[:, :LINE_SIZE] = ct
        msgs[:, LINE_SIZE : LINE_SIZE + TWEAK_SIZE] = tweak
        msgs[:, -1] = td
        copy_inner, copy_outer = self._inner.copy, self._outer.copy
        digests = []
        # One bytes object per message, made by numpy in C (a void view, so no trailing
        # NULs are stripped): cheaper than slicing a buffer per line.
        for msg in msgs.view(f"V{MAC_INPUT_SIZE}").ravel().tolist():
            h = copy_inner()
            h.update(msg)
            o = copy_outer()
            o.update(h.digest())
            digests.append(o.digest())
        return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32)

    def _mix64(
        self, ct: U8Array, tweak: U8Array, td: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.uint64]:
        words = np.ascontiguousarray(ct).view(np.uint64)
        tw = np.ascontiguousarray(tweak).view(np.uint64)
        h = mix64(np.full(ct.shape[0], self._mix_key, dtype=np.uint64) ^ td.astype(np.uint64))
        for col in range(words.shape[1]):
            h = mix64(h ^ words[:, col])
        for col in range(tw.shape[1]):
            h = mix64(h ^ tw[:, col])
        return h

    def _truncate(self, macs: U8Array) -> U8Array:
        spare = self.nbytes * 8 - self.mac_bits
        if spare:
            macs = macs.copy()
            macs[:, -1] &= np.uint8((0xFF << spare) & 0xFF)
        return macs
