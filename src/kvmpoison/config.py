"""The top-level configuration a machine is built from."""

from __future__ import annotations

from dataclasses import dataclass

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import KernelConfig
from kvmpoison.mm.huge_memory import ThpSettings

# Every design runs on the same hardware unless told otherwise: a TDX host in
# Ci mode. Intel describes TDX's MKTME engine as AES-128-XTS "and integrity
# using 28-bit MAC and a TD-ownership bit" (Ci); Li (TD bit only) is the
# lighter platform option, and off is a host without TDX (SEV-like or plain
# KVM). The RFC itself ran on plain KVM; a TDX host is where it was aimed.
DEFAULT_INTEGRITY = IntegrityMode.CI


def parse_integrity(text: str) -> IntegrityMode:
    """``off``, ``li`` or ``ci`` (any case), with a one-line error otherwise."""
    try:
        return IntegrityMode(text.strip().lower())
    except ValueError:
        known = ", ".join(m.value for m in IntegrityMode)
        raise ValueError(f"unknown integrity mode {text!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class Config:
    """Design, kernel build, platform (memory, integrity), VM size and seed.

    ``kernel=None`` takes the design's kernel (v5.12 for the RFC's designs);
    ``platform=None`` a 64 MiB host in ``integrity`` mode. The integrity mode
    is the hardware's, so it is the same for every design. The default is Ci,
    what a TDX host gives: Intel documents TDX memory as AES-XTS encrypted
    with a 28-bit MAC and a TD-ownership bit per line (:data:`DEFAULT_INTEGRITY`);
    ``off`` is plain KVM, the setting the RFC itself was posted for. A given
    ``platform`` carries its own mode.
    """

    design: str = "rfc-v2"
    kernel: KernelConfig | None = None
    platform: PlatformConfig | None = None  # None: 64 MiB host in ``integrity`` mode
    vm_mem: int = 4 << 20
    backing: str = "memfd"
    seed: int = 0
    integrity: IntegrityMode = DEFAULT_INTEGRITY
    thp: ThpSettings | None = None  # /sys/kernel/mm/transparent_hugepage; None: the default
    tdp: bool = True  # kvm_intel's ept (tdp_enabled); False: the shadow MMU (E27)
