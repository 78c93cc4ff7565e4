"""Name every field of a raw page-table value, and build raw values from fields.

The decoder follows the kernel's own reading order: ``pte_none`` first, then
``pte_present`` (PRESENT or PROTNONE, with the L1TF-inverted PFN for the
latter), otherwise ``pte_to_swp_entry`` and the special swap types of the
modelled kernel (``include/linux/swapops.h``, v5.12 or v6.18).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable import (
    pfn_pmd,
    pfn_pte,
    pmd_pfn,
    pmd_present,
    pte_none,
    pte_pfn,
    pte_present,
    pte_protnone,
)
from kvmpoison.arch.x86.pgtable_64 import __swp_offset, __swp_type
from kvmpoison.arch.x86.pgtable_types import (
    _PAGE_PROTNONE,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    PteFlag,
)
from kvmpoison.arch.x86.vmx import EptEntry, EptFlag
from kvmpoison.kconfig import KernelConfig
from kvmpoison.mm.swapops import (
    PteMarker,
    SwapTypes,
    is_hwpoison_entry,
    is_migration_entry,
    is_pte_marker_entry,
    make_hwpoison_entry,
    make_pte_marker_entry,
    pte_marker_get,
    pte_swp_clear_flags,
    pte_to_swp_entry,
    swp_entry,
    swp_entry_to_pte,
    swp_offset,
    swp_type,
)

U64 = 0xFFFF_FFFF_FFFF_FFFF
LEVELS = ("pte", "pmd")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    value: str
    bits: str = ""


@dataclass(frozen=True, slots=True)
class Decoding:
    raw: int
    kind: str  # none | present | protnone | swap | hwpoison | pte_marker | migration | device | ept
    fields: tuple[Field, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "raw": f"{self.raw:#018x}",
            "kind": self.kind,
            "fields": {f.name: f.value for f in self.fields},
        }


_PTE_FLAGS = [(int(flag), flag) for flag in PteFlag]  # plain ints: this runs per trace step


def _flag_names(raw: int, level: str, cfg: KernelConfig) -> list[str]:
    names = []
    for value, flag in _PTE_FLAGS:
        if not raw & value:
            continue
        name = flag.name or ""
        if flag is PteFlag.PSE and level == "pte":
            name = "PAT"
        elif flag is PteFlag.PAT_LARGE and level == "pte":
            continue  # a 4K PTE's bit 12 is part of the PFN
        elif flag is PteFlag.DEVMAP and cfg.version.tuple >= (6, 18):  # DEVMAP gone after 6.1
            name = "SOFTW4"
        elif flag is PteFlag.SAVED_DIRTY and cfg.version.tuple < (6, 6):
            name = "SOFTW5"
        names.append(name)
    return names


def decode(raw: int, cfg: KernelConfig, level: str = "pte") -> Decoding:
    """Decode a raw PTE or PMD value as the modelled kernel reads it."""
    if not 0 <= raw <= U64:
        raise ValueError(f"{raw:#x} is not a 64-bit value")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}")
    if pte_none(raw):
        return Decoding(raw, "none", (Field("pte_none", "true"),))
    if pmd_present(raw) if level == "pmd" else pte_present(raw):
        kind = "protnone" if pte_protnone(raw) else "present"
        pfn = pmd_pfn(raw) if level == "pmd" else pte_pfn(raw)
        huge = level == "pmd" and bool(raw & int(PteFlag.PSE))
        fields = [Field("pfn", f"{pfn:#x}", "51..21" if huge else "51..12")]
        if level == "pmd":
            fields.append(Field("pmd", _pmd_present_kind(raw, huge)))
        if kind == "protnone":
            fields.append(Field("pfn_inverted", "true (L1TF)"))
        flags = _flag_names(raw & ~(_PAGE_PROTNONE if kind == "protnone" else 0), level, cfg)
        if kind == "protnone":
            flags.append("PROTNONE")
        fields.append(Field("flags", "|".join(flags) or "0"))
        pkey = (raw >> 59) & 0xF
        if pkey:
            fields.append(Field("pkey", str(pkey), "62..59"))
        return Decoding(raw, kind, tuple(fields))
    dec = _decode_swap(raw, cfg)
    if level == "pmd":
        what = ("PMD migration entry (is_pmd_migration_entry; THP migration, x86-64 since 4.14)"
                if dec.kind == "migration" else
                "not a PMD encoding: a PMD holds no swap, hwpoison or marker entry (THP is "
                "split before swap-out or poisoning)")
        return Decoding(raw, dec.kind, (*dec.fields, Field("pmd", what)))
    return dec


def _pmd_present_kind(raw: int, huge: bool) -> str:
    """What a present PMD is (``pmd_trans_huge`` or a table; include/linux/pgtable.h)."""
    if not huge:
        return "table (pmd_page: the PTE table below)"
    if not raw & int(PteFlag.PRESENT) and not raw & _PAGE_PROTNONE:
        return "huge, invalidated (pmdp_invalidate: PRESENT clear, PSE kept while splitting)"
    return "huge (pmd_trans_huge: a 2 MiB THP mapped by one entry)"


def decode_kind(raw: int, cfg: KernelConfig) -> str:
    """``decode(raw, cfg).kind`` of a PTE, without building the fields of a present or none
    entry (the scenario trace asks for the kind on every step)."""
    if 0 <= raw <= U64:
        if pte_none(raw):
            return "none"
        if pte_present(raw):
            return "protnone" if pte_protnone(raw) else "present"
    return decode(raw, cfg).kind


def _decode_swap(raw: int, cfg: KernelConfig) -> Decoding:
    types = SwapTypes.for_config(cfg)
    entry = pte_to_swp_entry(raw, cfg)
    type_ = swp_type(entry)
    fields = [
        Field("swp_type", f"{type_} ({types.name_of(type_)})", "63..59"),
        Field("swp_offset", f"{swp_offset(entry):#x}", "58..9 inverted"),
        Field("swp_entry_t", f"{entry.val:#018x}"),
    ]
    soft = {"soft_dirty": _PAGE_SWP_SOFT_DIRTY, "uffd_wp": _PAGE_SWP_UFFD_WP}
    if cfg.has_swp_exclusive:
        soft["exclusive"] = _PAGE_SWP_EXCLUSIVE
    for name, bit in soft.items():
        if raw & bit:
            fields.append(Field(name, "true"))
    arch = pte_swp_clear_flags(raw, cfg)
    low = arch & 0x1FF
    if low:
        fields.append(Field("bad_low_bits", f"{low:#x}", "8..0 must be zero"))
    if __swp_type(arch) != type_ or __swp_offset(arch) != swp_offset(entry):
        raise AssertionError("swap entry decode disagrees with the arch decode")
    kind = "swap"
    if is_hwpoison_entry(entry, types):
        kind = "hwpoison"
        fields.append(Field("hwpoison_pfn", f"{swp_offset(entry):#x}"))
    elif is_pte_marker_entry(entry, types):
        kind = "pte_marker"
        marker = pte_marker_get(entry)
        fields.append(
            Field("marker", "|".join(m.name or "" for m in PteMarker if marker & m) or "0")
        )
    elif is_migration_entry(entry, types):
        kind = "migration"
        fields.append(Field("migration_pfn", f"{swp_offset(entry):#x}"))
    elif type_ >= types.max_swapfiles:
        kind = "device"
    return Decoding(raw, kind, tuple(fields))


def decode_ept(raw: int) -> Decoding:
    if not 0 <= raw <= U64:
        raise ValueError(f"{raw:#x} is not a 64-bit value")
    e = EptEntry.decode(raw)
    flags = "|".join(f.name or "" for f in type(e.flags) if e.flags & f) or "0"
    return Decoding(
        raw,
        "ept",
        (
            Field("pfn", f"{e.pfn:#x}", "51..12"),
            Field("flags", flags),
            Field("memtype", e.memtype.name, "5..3"),
            Field("present", str(e.present).lower()),
            # Bit 7 in a PDE: a 2 MiB leaf (KVM's huge SPTE over a THP, PT_PAGE_SIZE_MASK).
            *((Field("size", "2M leaf when in a PDE (PT_PAGE_SIZE_MASK)", "7"),)
              if e.flags & EptFlag.LARGE else ()),
        ),
    )


def parse_flags(text: str) -> int:
    """``"RW|USER|NX"`` -> bits; names are :class:`PteFlag` members (PAT = PSE)."""
    value = 0
    for part in filter(None, (p.strip().upper() for p in text.replace(",", "|").split("|"))):
        name = "PSE" if part == "PAT" else part
        if name == "PROTNONE":
            value |= _PAGE_PROTNONE
            continue
        try:
            value |= int(PteFlag[name])
        except KeyError:
            known = ", ".join(f.name or "" for f in PteFlag)
            raise ValueError(f"unknown PTE flag {part!r} (known: {known}, PAT, PROTNONE)") from None
    return value


def encode_present(pfn: int, flags: int, level: str = "pte") -> int:
    if pfn < 0 or pfn >= 1 << 40:
        raise ValueError(f"pfn {pfn:#x} does not fit in 40 bits")
    flags |= int(PteFlag.PRESENT) if not flags & _PAGE_PROTNONE else 0
    if level == "pmd":
        if pfn & 0x1FF:
            raise ValueError(f"a PMD maps a 2M-aligned pfn; {pfn:#x} is not")
        return pfn_pmd(pfn, flags | int(PteFlag.PSE))
    return pfn_pte(pfn, flags)


def encode_swap(type_: int, offset: int) -> int:
    return swp_entry_to_pte(swp_entry(type_, offset))


def encode_hwpoison(pfn: int, cfg: KernelConfig) -> int:
    return swp_entry_to_pte(make_hwpoison_entry(pfn, SwapTypes.for_config(cfg)))


def encode_marker(names: str, cfg: KernelConfig) -> int:
    marker = PteMarker(0)
    for part in filter(None, (p.strip().upper() for p in names.replace(",", "|").split("|"))):
        try:
            marker |= PteMarker[part]
        except KeyError:
            known = ", ".join(m.name or "" for m in PteMarker)
            raise ValueError(f"unknown PTE marker {part!r} (known: {known})") from None
    return swp_entry_to_pte(make_pte_marker_entry(marker, SwapTypes.for_config(cfg)))
