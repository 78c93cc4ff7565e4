"""Every access rule of the integrity model (hardware_model.md §5.3)."""

import errno
import hmac
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.integrity import (
    IntegrityMode,
    MemoryController,
    PlatformConfig,
    WriteHow,
)
from kvmpoison.arch.x86.mac import LineMac, MacAlgo
from kvmpoison.arch.x86.mce import MCG_STATUS_SEAM_NR, MCI_STATUS_AR, MCI_STATUS_UC
from kvmpoison.arch.x86.mktme import KeyIdSpace
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.outcome import Kind, McKind

TD = 17
OTHER_TD = 18
MKTME = 3  # a shared, non-zero KeyID
PA = 0x4000


def controller(**kw: object) -> MemoryController:
    return MemoryController(PlatformConfig(mem_bytes=1 << 20, **kw))  # type: ignore[arg-type]


def td_page(mc: MemoryController, pa: int = PA, keyid: int = TD) -> None:
    mc.write(pa, bytes(4096), keyid, WriteHow.MOVDIR64B)


def test_keyid_partition() -> None:
    space = KeyIdSpace(nr_mktme_keyids=15, nr_tdx_keyids=48)
    assert space.private_range == range(16, 64)
    assert not space.is_private(0) and not space.is_private(15) and space.is_private(16)
    with pytest.raises(ValueError, match="outside"):
        space.check(64)


def test_untouched_memory_costs_nothing_and_reads_zero() -> None:
    mc = MemoryController(PlatformConfig(mem_bytes=64 << 30))
    assert mc.read(0xF_0000_0000, 128, 0).data == bytes(128)
    mc.write(0xE_0000_0000, bytes(8192), 0)
    assert mc.mem.nr_allocated == 0


def test_td_reads_back_its_data_and_host_sees_zeros() -> None:
    mc = controller()
    td_page(mc)
    mc.write(PA + 10, b"secret", TD)
    assert mc.load(PA + 10, 6, TD, Ctx.TD).data == b"secret"
    host = mc.read(PA, 64, 0)
    assert host.data == bytes(64) and host.poisoned_pa is None
    assert not mc.line_state(PA).poison  # no new poison by default


def test_private_write_sets_td_bit_and_mac_only_in_ci() -> None:
    for mode, has_mac in ((IntegrityMode.CI, True), (IntegrityMode.LI, False)):
        mc = controller(integrity=mode)
        td_page(mc)
        state = mc.line_state(PA)
        assert state.td and state.has_mac is has_mac and state.writer == TD


def test_host_write_then_td_read_poisons_and_raises_mc() -> None:
    """The hazard the RFC exists for."""
    mc = controller()
    td_page(mc)
    mc.write(PA, b"host", 0)  # writes are never checked
    state = mc.line_state(PA)
    assert not state.td and not state.poison and state.intruder == 0
    assert mc.load(PA, 4, 0, Ctx.HOST_USER).data == b"host"  # the host reads its own data
    out = mc.load(PA, 8, TD, Ctx.TD)
    assert out.kind is Kind.MCE and out.mc_kind is McKind.TD_FATAL
    assert out.cell == "mce:td-fatal"
    assert out.mce is not None and out.mce.addr == PA
    assert out.mce.mci_status & MCI_STATUS_UC and out.mce.mci_status & MCI_STATUS_AR
    assert out.mce.mcacod == 0x134 and out.mce.mcg_status & MCG_STATUS_SEAM_NR
    assert mc.line_state(PA).poison  # sticky
    assert mc.read(PA, 8, 0).poisoned_pa == PA  # now everyone reads poison


def test_host_partial_write_zeroes_the_rest_of_the_line() -> None:
    mc = controller()
    td_page(mc)
    mc.write(PA, b"\xaa" * 64, TD)
    mc.write(PA + 8, b"\x55", 0)
    assert mc.read(PA, 64, 0).data == bytes(8) + b"\x55" + bytes(55)


def test_full_line_host_then_td_write_leaves_only_oracle_evidence() -> None:
    mc = controller()
    td_page(mc)
    mc.write(PA, b"\x11" * 64, 0)
    mc.write(PA, b"\x22" * 64, TD)  # full-line TD write: no fill, no check
    state = mc.line_state(PA)
    assert state.td and state.has_mac and not state.poison and not state.hw_poison
    assert mc.load(PA, 64, TD, Ctx.TD).data == b"\x22" * 64
    assert state.intruder == 0  # the model-only oracle still flags the host write


def test_li_mode_catches_host_writes_too() -> None:
    mc = controller(integrity=IntegrityMode.LI)
    td_page(mc)
    mc.write(PA, b"x", 0)
    assert mc.load(PA, 1, TD, Ctx.TD).cell == "mce:td-fatal"


def test_mac_catches_ciphertext_tampering_only_in_ci() -> None:
    ci = controller(mac_bits=256)
    td_page(ci)
    ci.tamper_ciphertext(PA + 5)
    assert ci.load(PA, 8, TD, Ctx.TD).cell == "mce:td-fatal"
    li = controller(integrity=IntegrityMode.LI)
    td_page(li)
    li.tamper_ciphertext(PA + 5)
    out = li.load(PA, 8, TD, Ctx.TD)
    assert out.kind is Kind.OK and out.data != bytes(8)  # undetected: garbage


def test_wrong_private_keyid_fails_mac_in_ci() -> None:
    mc = controller(mac_bits=256)
    td_page(mc, keyid=TD)
    assert mc.load(PA, 8, OTHER_TD, Ctx.SEAM_ROOT).kind is Kind.SHUTDOWN


def test_full_line_write_clears_integrity_poison_but_not_dram_poison() -> None:
    mc = controller()
    td_page(mc)
    mc.write(PA, b"x", 0)
    mc.read(PA, 1, TD)
    assert mc.line_state(PA).poison
    mc.write(PA, bytes(64), TD, WriteHow.MOVDIR64B)
    assert not mc.line_state(PA).poison
    assert mc.load(PA, 8, TD, Ctx.TD).kind is Kind.OK
    mc.inject_dram_error(PA + 64)
    mc.write(PA + 64, bytes(64), TD, WriteHow.MOVDIR64B)
    assert mc.read(PA + 64, 8, TD).poisoned_pa == PA + 64


def test_partial_write_into_poisoned_line_keeps_poison() -> None:
    mc = controller()
    td_page(mc)
    mc.write(PA, b"x", 0)
    mc.read(PA, 1, TD)
    mc.write(PA + 3, b"y", TD)  # the RFO fill returns poison
    assert mc.line_state(PA).poison


def test_shared_read_of_td_line_poisons_only_with_switch() -> None:
    mc = controller(ci_shared_read_poisons=True)
    td_page(mc)
    out = mc.load(PA, 8, 0, Ctx.HOST_USER, vaddr=0x7F00_0000_4000)
    assert out.cell == "mce:recoverable"  # the signal is kill_me_maybe's (kernel/mce.py)
    assert out.mce is not None and out.mce.addr == PA


def test_erratum_partial_write_poisons_at_once() -> None:
    plain = controller()
    td_page(plain)
    plain.write(PA, b"z", 0, WriteHow.PARTIAL)
    assert not plain.line_state(PA).poison
    buggy = controller(erratum_pw_mce=True)
    td_page(buggy)
    buggy.write(PA, b"z", 0, WriteHow.PARTIAL)
    assert buggy.line_state(PA).poison
    assert buggy.load(PA, 1, 0, Ctx.HOST_KERNEL).kind is Kind.PANIC  # even the host's read


def test_shared_keyids_decrypt_with_their_own_keys() -> None:
    mc = controller()
    mc.write(PA, b"mktme data", MKTME)
    assert mc.read(PA, 10, MKTME).data == b"mktme data"
    assert mc.read(PA, 10, 0).data != b"mktme data"  # wrong key: garbage, no poison
    assert mc.read(PA, 10, 0).poisoned_pa is None


def test_private_read_of_never_written_memory_poisons() -> None:
    mc = controller()
    assert mc.read(PA, 8, TD).poisoned_pa == PA
    assert mc.line_state(PA).poison


def test_integrity_off_is_plain_memory() -> None:
    mc = controller(integrity=IntegrityMode.OFF)
    mc.write(PA, b"abc", TD)
    assert mc.read(PA, 3, 0).data == b"abc"
    assert not mc.line_state(PA).td


@pytest.mark.parametrize(
    ("ctx", "cell"),
    [
        (Ctx.HOST_USER, "mce:recoverable"),  # kill_me_maybe decides the rest
        (Ctx.HOST_KERNEL, "panic"),
        (Ctx.HOST_KERNEL_MC_SAFE, "err:EFAULT"),
        (Ctx.GUEST, "mce:recoverable"),
        (Ctx.TD, "mce:td-fatal"),
        (Ctx.SEAM_ROOT, "shutdown"),
    ],
)
def test_consumption_depends_on_context(ctx: Ctx, cell: str) -> None:
    mc = controller()
    mc.inject_dram_error(PA)
    assert mc.load(PA, 8, TD if ctx in (Ctx.TD, Ctx.SEAM_ROOT) else 0, ctx).cell == cell


def test_mc_safe_copy_can_report_eio() -> None:
    mc = controller()
    mc.inject_dram_error(PA)
    assert mc.load(PA, 8, 0, Ctx.HOST_KERNEL_MC_SAFE, mc_safe_errno=errno.EIO).cell == "err:EIO"


def test_td_consumption_without_seam_nr_panics_the_host() -> None:
    mc = controller(seam_nr=False)
    mc.inject_dram_error(PA)
    out = mc.load(PA, 8, TD, Ctx.TD)
    assert out.kind is Kind.PANIC and "unrecoverable area of kernel" in out.detail


def test_write_rejects_bad_ranges_and_keyids() -> None:
    mc = controller()
    with pytest.raises(ValueError, match="outside memory"):
        mc.write((1 << 20) - 2, b"abcd", 0)
    with pytest.raises(ValueError, match="KeyID"):
        mc.write(PA, b"a", 99)
    with pytest.raises(ValueError, match="MOVDIR64B"):
        mc.write(PA + 1, bytes(64), TD, WriteHow.MOVDIR64B)


@settings(max_examples=40, deadline=timedelta(seconds=5))
@given(st.integers(0, 8191), st.binary(min_size=1, max_size=300), st.sampled_from([0, MKTME, TD]))
def test_write_read_round_trip_any_alignment(off: int, data: bytes, keyid: int) -> None:
    mc = controller(mac_algo=MacAlgo.MIX64)
    if keyid == TD:
        mc.write(0, bytes(16384), TD, WriteHow.MOVDIR64B)
    mc.write(off, data, keyid)
    assert mc.read(off, len(data), keyid).data == data


def test_mix64_stand_in_also_detects_tampering() -> None:
    mc = controller(mac_algo=MacAlgo.MIX64, mac_bits=64)
    td_page(mc)
    mc.tamper_ciphertext(PA)
    assert mc.read(PA, 1, TD).poisoned_pa == PA


@pytest.mark.parametrize(("bits", "key_len"), [(28, 16), (64, 32), (256, 136), (28, 200)])
def test_mac_is_hmac_sha3_256_truncated_to_top_bits(bits: int, key_len: int) -> None:
    key = bytes(i & 0xFF for i in range(key_len))  # 200 > the 136-byte block: hashed first
    ct = np.arange(64, dtype=np.uint8)[None, :]
    tweak = np.arange(100, 116, dtype=np.uint8)[None, :]
    got = int.from_bytes(LineMac(key, bits).compute(ct, tweak, np.ones(1, dtype=bool))[0], "big")
    full = hmac.digest(key, ct.tobytes() + tweak.tobytes() + b"\x01", "sha3_256")
    nbytes = (bits + 7) // 8
    assert got >> (nbytes * 8 - bits) == int.from_bytes(full, "big") >> (256 - bits)
