"""One line's key material made alone is the page's, and a cold one-line write (its page's
keys not at hand) gives the general path's memory."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.integrity import IntegrityMode, MemoryController, PlatformConfig
from kvmpoison.arch.x86.mktme import KeyIdSpace, KeyTable

PAGE = 4096
TD, OTHER_TD, MKTME = 17, 18, 3
KEYIDS = (0, MKTME, TD, OTHER_TD)


@settings(max_examples=200, deadline=2000)
@given(seed=st.integers(0, 2**32), keyid=st.integers(0, 63), gen=st.integers(0, 3),
       pfn=st.integers(0, (1 << 40) - 1), line=st.integers(0, 63))
def test_line_keys_are_the_page_keys_slice(seed: int, keyid: int, gen: int, pfn: int,
                                           line: int) -> None:
    keys = KeyTable(seed, KeyIdSpace())
    ks, tweak = keys.page_keys(keyid, pfn * PAGE, gen)
    got_ks, got_tweak = keys.line_keys(keyid, pfn * PAGE + line * 64, gen)
    assert got_ks == int.from_bytes(ks[line * 64 : (line + 1) * 64], "little")
    assert got_tweak == tweak[line * 16 : (line + 1) * 16]


def _controller(mode: IntegrityMode) -> MemoryController:
    return MemoryController(PlatformConfig(mem_bytes=1 << 20, integrity=mode))


def _cold(mc: MemoryController) -> None:
    """Forget every cached page key, so the one-line path makes lines alone."""
    mc._page_keys_cache.clear()
    mc._line_keys.clear()


writes = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 63), st.sampled_from(KEYIDS),
              st.binary(min_size=64, max_size=64), st.sampled_from(["write", "cold", "rekey"])),
    min_size=1, max_size=60)


@settings(max_examples=40, deadline=4000)
@given(ops=writes, mode=st.sampled_from(list(IntegrityMode)))
def test_cold_one_line_writes_give_the_general_paths_memory(
        ops: list[tuple[int, int, int, bytes, str]], mode: IntegrityMode) -> None:
    fast, slow = _controller(mode), _controller(mode)
    slow._write_one_line = lambda pa, data, keyid: False  # type: ignore[method-assign]
    for mc in (fast, slow):
        for pfn in range(3):  # stored frames, so the one-line path applies
            mc.write(pfn * PAGE, bytes([pfn + 1]) * PAGE, TD)
    _cold(fast)
    lines_alone = 0
    for pfn, line, keyid, data, what in ops:
        if what == "cold":
            _cold(fast)
        elif what == "rekey":  # a new key generation: cached lines must not be reused
            for mc in (fast, slow):
                mc.keys.program_key(keyid)
        for mc in (fast, slow):
            mc.write(pfn * PAGE + line * 64, data, keyid)
        lines_alone += sum(e.misses for e in fast._line_keys.values())
    top = fast.mem._top
    for name in ("ct", "mac", "flags", "writer"):
        assert np.array_equal(getattr(fast.mem, name)[:top], getattr(slow.mem, name)[:top]), name
    for keyid in KEYIDS:
        for pfn in range(3):
            assert fast.read(pfn * PAGE, PAGE, keyid) == slow.read(pfn * PAGE, PAGE, keyid)
    if mode is not IntegrityMode.OFF and any(k == TD for _, _, k, _, _ in ops):
        assert lines_alone > 0  # the line-alone path ran


def test_a_page_written_line_by_line_makes_its_keys_whole_after_a_few_lines() -> None:
    mc = _controller(IntegrityMode.CI)
    mc.write(PAGE, b"\x01" * PAGE, TD)
    _cold(mc)
    for line in range(64):
        mc.write(PAGE + line * 64, bytes([line]) * 64, TD)
    entry = mc._line_keys[1]
    assert 0 < entry.misses < 64  # some lines alone, then the page's keys
    assert (TD, mc.keys.generation(TD), 1) in mc._page_keys_cache
    assert mc.read(PAGE + 640, 64, TD).data == bytes([10]) * 64
