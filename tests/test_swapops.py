import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpoison.arch.x86.pgtable import is_swap_pte, pte_present
from kvmpoison.arch.x86.pgtable_64 import (
    MAX_SWP_OFFSET,
    __swp_entry,
    __swp_entry_array,
    __swp_offset,
    __swp_offset_array,
    __swp_type,
    __swp_type_array,
)
from kvmpoison.arch.x86.pgtable_types import max_physmem_bits
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.mm.swapops import (
    PteMarker,
    SwapTypes,
    hwpoison_entry_to_pfn,
    is_hwpoison_entry,
    is_poisoned_swp_entry,
    is_pte_marker,
    make_hwpoison_entry,
    make_pte_marker_entry,
    non_swap_entry,
    pte_marker_get,
    pte_to_swp_entry,
    swp_entry,
    swp_entry_to_pte,
    swp_offset,
    swp_offset_pfn,
    swp_type,
)

V6_18 = KernelConfig(version=KernelVersion.V6_18)
TYPES = st.integers(min_value=0, max_value=31)
OFFSETS = st.integers(min_value=0, max_value=MAX_SWP_OFFSET)


def test_rfc_kernel_hwpoison_vector() -> None:
    types = SwapTypes.for_config(RFC_BASE)
    entry = make_hwpoison_entry(0x12345, types)
    assert entry.val == 0x6C00000000012345
    assert swp_entry_to_pte(entry) == 0xDFFFFFFFFDB97400
    assert hwpoison_entry_to_pfn(pte_to_swp_entry(0xDFFFFFFFFDB97400, RFC_BASE)) == 0x12345


def test_soft_dirty_bit_after_mremap_is_ignored_by_decode() -> None:
    entry = pte_to_swp_entry(0xDFFFFFFFFDB97402, RFC_BASE)
    assert entry.val == 0x6C00000000012345


def test_swap_pte_low_bits_are_clear() -> None:
    raw = 0xDFFFFFFFFDB97400
    assert raw & 0x1FF == 0 and is_swap_pte(raw) and not pte_present(raw)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (
            RFC_BASE,
            {
                "max_swapfiles": 27,
                "hwpoison": 27,
                "migration_read": 28,
                "migration_write": 29,
                "device_write": 30,
                "device_read": 31,
                "pte_marker": None,
            },
        ),
        (
            KernelConfig(device_private=False),
            {
                "max_swapfiles": 29,
                "hwpoison": 29,
                "migration_read": 30,
                "migration_write": 31,
                "device_write": None,
            },
        ),
        (
            V6_18,
            {
                "max_swapfiles": 24,
                "hwpoison": 24,
                "migration_read": 25,
                "migration_read_exclusive": 26,
                "migration_write": 27,
                "device_write": 28,
                "device_read": 29,
                "device_exclusive": 30,
                "pte_marker": 31,
            },
        ),
        (
            THIS_MACHINE,  # MEMORY_FAILURE and DEVICE_PRIVATE off, as /proc/config.gz reads
            {
                "max_swapfiles": 28,
                "hwpoison": None,
                "migration_read": 28,
                "migration_write": 30,
                "device_write": None,
                "pte_marker": 31,
            },
        ),
    ],
)
def test_special_swap_type_numbers(cfg: KernelConfig, expected: dict[str, int | None]) -> None:
    types = SwapTypes.for_config(cfg)
    for name, value in expected.items():
        assert getattr(types, name) == value, name


@given(TYPES, OFFSETS)
def test_arch_swap_entry_round_trip(type_: int, offset: int) -> None:
    raw = __swp_entry(type_, offset)
    assert raw & 0x1FF == 0
    assert __swp_type(raw) == type_
    assert __swp_offset(raw) == offset


@given(TYPES, OFFSETS)
def test_generic_entry_round_trip_through_pte(type_: int, offset: int) -> None:
    entry = swp_entry(type_, offset)
    assert entry.val == (type_ << 58) | offset
    assert (swp_type(entry), swp_offset(entry)) == (type_, offset)
    raw = swp_entry_to_pte(entry)
    for cfg in (RFC_BASE, V6_18):
        assert pte_to_swp_entry(raw, cfg) == entry
        assert pte_to_swp_entry(raw | 0b110, cfg) == entry  # swap soft-dirty, uffd-wp
    assert pte_to_swp_entry(raw | 0b1000, V6_18) == entry  # exclusive, v5.19+


@given(st.lists(OFFSETS, min_size=1, max_size=64), TYPES)
def test_vectorised_encoding_matches_scalar(offsets: list[int], type_: int) -> None:
    arr = np.array(offsets, dtype=np.uint64)
    raws = __swp_entry_array(type_, arr)
    assert [int(r) for r in raws] == [__swp_entry(type_, o) for o in offsets]
    assert [int(t) for t in __swp_type_array(raws)] == [type_] * len(offsets)
    assert [int(o) for o in __swp_offset_array(raws)] == offsets


def test_out_of_range_swap_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="swap type"):
        __swp_entry(32, 0)
    with pytest.raises(ValueError, match="does not fit"):
        __swp_entry(0, MAX_SWP_OFFSET + 1)


@given(st.integers(min_value=0, max_value=(1 << 40) - 1))
def test_hwpoison_entries_on_both_kernels(pfn: int) -> None:
    for cfg, type_ in ((RFC_BASE, 27), (V6_18, 24)):
        types = SwapTypes.for_config(cfg)
        entry = make_hwpoison_entry(pfn, types)
        assert swp_type(entry) == type_ and is_hwpoison_entry(entry, types)
        assert non_swap_entry(entry, types)
        assert hwpoison_entry_to_pfn(entry) == pfn
        assert swp_offset_pfn(entry, cfg) == pfn & ((1 << (max_physmem_bits(False) - 12)) - 1)


def test_no_hwpoison_type_without_memory_failure() -> None:
    types = SwapTypes.for_config(THIS_MACHINE)
    with pytest.raises(ValueError, match="MEMORY_FAILURE"):
        make_hwpoison_entry(1, types)
    assert not is_hwpoison_entry(swp_entry(24, 1), types)


@pytest.mark.parametrize("marker", [PteMarker.UFFD_WP, PteMarker.POISONED, PteMarker.GUARD])
def test_pte_markers_on_v6_18(marker: PteMarker) -> None:
    types = SwapTypes.for_config(V6_18)
    entry = make_pte_marker_entry(marker, types)
    raw = swp_entry_to_pte(entry)
    assert swp_type(entry) == 31
    assert is_pte_marker(raw, V6_18, types)
    assert pte_marker_get(pte_to_swp_entry(raw, V6_18)) == marker
    assert is_poisoned_swp_entry(entry, types) == (marker is PteMarker.POISONED)


def test_markers_absent_from_rfc_kernel() -> None:
    with pytest.raises(ValueError, match="no PTE markers"):
        make_pte_marker_entry(PteMarker.POISONED, SwapTypes.for_config(RFC_BASE))


def test_kernel_version_parsing() -> None:
    assert KernelVersion.parse("6.18.44-fc-v669") is KernelVersion.V6_18
    assert KernelVersion.parse("v5.12") is KernelVersion.V5_12
    with pytest.raises(ValueError, match="unknown kernel version"):
        KernelVersion.parse("4.19")
