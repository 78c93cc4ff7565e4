"""The frame store: zero form, the one-line write path and bulk clearing give the same
memory as the general paths (compared state by state), and cost what they should."""

import hmac

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.integrity import IntegrityMode, MemoryController, PlatformConfig, WriteHow
from kvmpoison.arch.x86.mac import LineMac
from kvmpoison.arch.x86.physmem import LINES_PER_PAGE
from kvmpoison.arch.x86.poison import Ctx

TD, OTHER_TD, MKTME = 17, 18, 3
KEYIDS = (0, MKTME, TD, OTHER_TD)
PAGE = 4096


def controller(**kw: object) -> MemoryController:
    return MemoryController(PlatformConfig(mem_bytes=1 << 20, **kw))  # type: ignore[arg-type]


def general_only(mc: MemoryController) -> MemoryController:
    """The controller with its one-line fast path switched off."""
    mc._write_one_line = lambda pa, data, keyid: False  # type: ignore[method-assign]
    return mc


def assert_same_memory(a: MemoryController, b: MemoryController, pfns: range) -> None:
    """Every line of ``pfns`` in the same state, and the same bytes under every KeyID
    (reads may poison: both sides take the same reads)."""
    for pfn in pfns:
        for line in range(LINES_PER_PAGE):
            pa = pfn * PAGE + line * 64
            assert a.line_state(pa) == b.line_state(pa), (pfn, line)
    for keyid in KEYIDS:
        for pfn in pfns:
            ra, rb = a.read(pfn * PAGE, PAGE, keyid), b.read(pfn * PAGE, PAGE, keyid)
            assert ra == rb, (keyid, pfn)


def test_zero_page_under_a_private_keyid_stores_nothing_and_reads_as_if_stored() -> None:
    zero_form, stored = controller(), controller()
    zero_form.write(PAGE, bytes(PAGE), TD, WriteHow.MOVDIR64B)
    for line in range(LINES_PER_PAGE):  # line by line: the frame is stored, not zero form
        stored.write(PAGE + line * 64, bytes(64), TD, WriteHow.MOVDIR64B)
    assert zero_form.mem.nr_allocated == 0 and stored.mem.nr_allocated == 1
    assert zero_form.load(PAGE, 64, TD, Ctx.TD).data == bytes(64)
    assert zero_form.mem.nr_allocated == 0  # its own KeyID reads it without storing it
    assert_same_memory(zero_form, stored, range(1, 2))


def test_zero_form_survives_a_rekey_like_stored_data() -> None:
    zero_form, stored = controller(), controller()
    zero_form.write(PAGE, bytes(PAGE), TD)
    for line in range(LINES_PER_PAGE):
        stored.write(PAGE + line * 64, bytes(64), TD)
    for mc in (zero_form, stored):
        mc.keys.program_key(TD)  # the old zeros no longer decrypt or verify
    got = zero_form.read(PAGE, 128, TD)
    assert got == stored.read(PAGE, 128, TD) and got.poisoned_pa == PAGE
    assert_same_memory(zero_form, stored, range(1, 2))


def test_shared_zero_page_over_td_lines_records_the_intruder() -> None:
    zero_form, stored = controller(), controller()
    for mc in (zero_form, stored):
        mc.write(PAGE, bytes(range(256)) * 16, TD)
    zero_form.write(PAGE, bytes(PAGE), MKTME)
    for line in range(LINES_PER_PAGE):
        stored.write(PAGE + line * 64, bytes(64), MKTME)
    assert zero_form.mem.nr_allocated == 0
    assert zero_form.line_state(PAGE + 640).intruder == MKTME
    assert_same_memory(zero_form, stored, range(1, 2))


line_writes = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, LINES_PER_PAGE - 1), st.sampled_from(KEYIDS),
              st.binary(min_size=64, max_size=64)),
    min_size=1, max_size=40)


@settings(max_examples=40, deadline=2000)
@given(writes=line_writes, mode=st.sampled_from(list(IntegrityMode)))
def test_one_line_path_gives_the_general_paths_memory(
        writes: list[tuple[int, int, int, bytes]], mode: IntegrityMode) -> None:
    fast, slow = controller(integrity=mode), general_only(controller(integrity=mode))
    for mc in (fast, slow):
        for pfn in range(3):  # stored frames, so the fast path applies
            mc.write(pfn * PAGE, bytes([pfn + 1]) * PAGE, TD)
    for pfn, line, keyid, data in writes:
        for mc in (fast, slow):
            mc.write(pfn * PAGE + line * 64, data, keyid)
    top = fast.mem._top
    for name in ("ct", "mac", "flags", "writer"):
        assert np.array_equal(getattr(fast.mem, name)[:top], getattr(slow.mem, name)[:top]), name
    assert_same_memory(fast, slow, range(3))


def test_mac_line_is_the_batch_mac_and_truncated_hmac_sha3() -> None:
    mc = controller()
    rng = np.random.default_rng(5)
    ct = rng.integers(0, 256, (8, 64), dtype=np.uint8)
    tweak = rng.integers(0, 256, (8, 16), dtype=np.uint8)
    batch = mc.mac.compute(ct, tweak, np.ones(8, dtype=bool))
    for i in range(8):
        msg = ct[i].tobytes() + tweak[i].tobytes() + b"\x01"
        assert mc.mac_line(msg) == batch[i].tobytes()
        assert mc.mac_line(msg)[-1] & 0x0F == 0  # 28 of 32 bits kept
    mac = LineMac(b"k" * 16, 28)
    msg = bytes(range(81))
    want = bytearray(hmac.digest(b"k" * 16, msg, "sha3_256")[:4])
    want[-1] &= 0xF0
    assert mac.mac_line(msg) == bytes(want)


def test_clear_frames_clears_only_the_named_frames_as_a_zero_write_would() -> None:
    bulk, one_by_one = controller(), controller()
    for mc in (bulk, one_by_one):
        mc.write(1 * PAGE, b"\x11" * PAGE, 0)
        mc.write(2 * PAGE, b"\x22" * PAGE, TD)
        mc.write(3 * PAGE, b"\x33" * PAGE, 0)
        mc.write(4 * PAGE, bytes(PAGE), TD)  # zero form under TD
    bulk.clear_frames(np.array([2, 3, 4, 9], dtype=np.int64))
    for pfn in (2, 3, 4):  # clear_page: zeros written under KeyID 0, in full
        one_by_one.write(pfn * PAGE, bytes(PAGE), 0)
    assert bulk.mem.nr_allocated == 1 and bulk.read(PAGE, 8, 0).data == b"\x11" * 8
    assert bulk.line_state(2 * PAGE).intruder == 0  # KeyID 0 wrote over TD lines
    assert list(bulk.mem.allocated_pfns_in(np.arange(256, dtype=np.int64))) == [1]
    assert_same_memory(bulk, one_by_one, range(1, 10))


def _mix64_reference(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


@settings(max_examples=50, deadline=2000)
@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=20))
def test_mix64_is_splitmix64_for_arrays_and_scalars(xs: list[int]) -> None:
    from kvmpoison.arch.x86.mktme import mix64

    got = mix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [_mix64_reference(x) for x in xs]
    assert int(mix64(np.array([xs[0]], dtype=np.uint64))[0]) == _mix64_reference(xs[0])


def test_keyids_beyond_one_byte_are_recorded_whole() -> None:
    from kvmpoison.arch.x86.mktme import KeyIdSpace

    wide = KeyIdSpace(nr_mktme_keyids=15, nr_tdx_keyids=300)
    for mc in (controller(keyids=wide), general_only(controller(keyids=wide))):
        mc.write(PAGE, b"\x01" * PAGE, 300)
        mc.write(PAGE + 64, b"\x02" * 64, 250)  # the one-line path (where it applies)
        assert mc.line_state(PAGE).writer == 300 and mc.line_state(PAGE + 64).writer == 250
        assert mc.read(PAGE + 64, 64, 250).data == b"\x02" * 64


@settings(max_examples=30, deadline=2000)
@given(keyid=st.sampled_from(KEYIDS), pfn=st.integers(0, (1 << 40) - 1),
       gen=st.integers(0, 3))
def test_page_keys_are_the_lines_keystream_and_tweaks(keyid: int, pfn: int, gen: int) -> None:
    keys = controller().keys
    pas = np.uint64(pfn << 12) + np.arange(64, dtype=np.uint64) * np.uint64(64)
    ks, tw = keys.page_keys(keyid, pfn << 12, gen)
    assert ks == keys.keystream(keyid, pas, gen).tobytes()
    assert tw == keys.tweak(keyid, pas, gen).tobytes()


def test_never_touched_memory_reads_zero_under_keyid_0_after_a_rekey_too() -> None:
    mc = controller()
    mc.keys.program_key(0)
    assert mc.read(2 * PAGE, 64, 0).data == bytes(64)
    mc.write(2 * PAGE + 8, b"\xff", 0)  # a partial write stores the frame under the new key
    assert mc.read(2 * PAGE, 16, 0).data == bytes(8) + b"\xff" + bytes(7)


def test_without_a_lazy_reservation_slots_grow_and_keep_their_data(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import copy

    from kvmpoison.arch.x86 import physmem

    def refuse(shape, dtype):  # type: ignore[no-untyped-def]
        raise OSError(12, "Cannot allocate memory")  # as under strict overcommit

    monkeypatch.setattr(physmem, "lazy_zeros", refuse)
    mc = MemoryController(PlatformConfig(mem_bytes=4 << 20))  # 1024 frames
    assert mc.mem._cap == 256
    for pfn in range(300):  # past the first 256 slots: the arrays double
        mc.write(pfn * PAGE, bytes([pfn % 251]) * 64, TD)
    assert mc.mem._cap == 512 and mc.mem.nr_allocated == 300
    twin = copy.deepcopy(mc)
    for pfn in (0, 100, 255, 256, 299):
        want = bytes([pfn % 251]) * 64
        assert mc.read(pfn * PAGE, 64, TD).data == want
        assert twin.read(pfn * PAGE, 64, TD).data == want
