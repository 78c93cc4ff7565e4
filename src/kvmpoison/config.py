"""The top-level configuration a machine is built from."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmpoison.arch.x86.integrity import PlatformConfig
from kvmpoison.kconfig import RFC_BASE, KernelConfig


@dataclass(frozen=True, slots=True)
class Config:
    """Kernel build, platform (memory, integrity) and seed: same config, same run."""

    kernel: KernelConfig = RFC_BASE
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    seed: int = 0
