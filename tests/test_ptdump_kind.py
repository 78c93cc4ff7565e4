"""``decode_kind``: the kind ``decode`` gives, for any 64-bit value on every modelled kernel."""

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpoison.arch.x86.pgtable_types import _PAGE_PRESENT, _PAGE_PROTNONE
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.mm.ptdump import decode, decode_kind

CONFIGS = [RFC_BASE, THIS_MACHINE, KernelConfig(version=KernelVersion.V6_1)]
U64 = st.integers(0, (1 << 64) - 1)
# Values with the low bits that pick the kind set in every combination.
LOW = st.sampled_from([0, _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_PRESENT | _PAGE_PROTNONE])


@settings(max_examples=400, deadline=timedelta(milliseconds=200))
@given(raw=U64, low=LOW, which=st.integers(0, len(CONFIGS) - 1))
def test_decode_kind_is_decodes_kind(raw: int, low: int, which: int) -> None:
    cfg = CONFIGS[which]
    for value in (raw, (raw & ~0xFFF) | low, raw & 0xFFF, low):
        assert decode_kind(value, cfg) == decode(value, cfg).kind


def test_the_kinds_it_shortcuts() -> None:
    assert decode_kind(0, RFC_BASE) == "none"
    assert decode_kind(0x8000_0000_1234_5067, RFC_BASE) == "present"
    assert decode_kind(decode_value_protnone(), RFC_BASE) == "protnone"


def decode_value_protnone() -> int:
    value = _PAGE_PROTNONE | 0x7FFF_FFFF_EDCB_A000  # PFN bits inverted (L1TF)
    assert decode(value, RFC_BASE).kind == "protnone"
    return value
