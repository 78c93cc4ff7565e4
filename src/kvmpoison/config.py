"""The top-level configuration a machine is built from."""

from __future__ import annotations

from dataclasses import dataclass

from kvmpoison.arch.x86.integrity import PlatformConfig
from kvmpoison.kconfig import KernelConfig


@dataclass(frozen=True, slots=True)
class Config:
    """Design, kernel build, platform (memory, integrity), VM size and seed.

    ``kernel=None`` takes the design's kernel (v5.12 for the RFC's designs);
    ``platform=None`` a 64 MiB host with the design's integrity mode.
    """

    design: str = "rfc-v2"
    kernel: KernelConfig | None = None
    platform: PlatformConfig | None = None  # None: 64 MiB with the design's integrity mode
    vm_mem: int = 4 << 20
    backing: str = "memfd"
    seed: int = 0
