"""The modelled kernel: its version and the CONFIG_* switches the model honours.

Numbers that move between releases (swap type numbers, page-flag bits, FOLL_*
values) are looked up from a :class:`KernelConfig`, never hard-coded by callers.
"""

from __future__ import annotations

import enum
import gzip
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field


class KernelVersion(enum.Enum):
    """Kernel releases the model knows.

    V5_12 is the RFC's base (kas/linux ``kvm-unmapped-poison`` sits on ~v5.12-rc);
    V6_1 is Debian bookworm's kernel, booted under QEMU as the second referee
    (``kvmpoison oracle --kernel debian-6.1``, CONFIG_MEMORY_FAILURE=y);
    V6_18 is the kernel running on this project's machines (the oracle).
    """

    V5_12 = "5.12"
    V6_1 = "6.1"
    V6_18 = "6.18"

    @classmethod
    def parse(cls, text: str) -> KernelVersion:
        """Accept ``5.12``, ``v6.18`` or a full ``uname -r`` such as ``6.18.44-fc``."""
        cleaned = text.strip().lstrip("v")
        parts = cleaned.split(".")
        if len(parts) >= 2:
            major_minor = f"{parts[0]}.{''.join(ch for ch in parts[1] if ch.isdigit())}"
            for member in cls:
                if member.value == major_minor:
                    return member
        known = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown kernel version {text!r} (known: {known})")

    @property
    def tuple(self) -> tuple[int, int]:
        return _ORDER[self._value_]

    # Keyed by the value string: hashing an Enum member runs Python code, and these
    # comparisons sit on per-page paths.
    def __ge__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return _ORDER[self._value_] >= _ORDER[other._value_]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return _ORDER[self._value_] < _ORDER[other._value_]


_ORDER = {v.value: (int(v.value.split(".")[0]), int(v.value.split(".")[1])) for v in KernelVersion}


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """CONFIG_* switches that change what the model encodes or does.

    Defaults are those of the RFC's base build for x86-64 (MEMORY_FAILURE,
    MIGRATION and DEVICE_PRIVATE on; 4-level paging).
    """

    version: KernelVersion = KernelVersion.V5_12
    memory_failure: bool = True
    migration: bool = True
    device_private: bool = True
    mem_soft_dirty: bool = True
    x86_5level: bool = False

    @property
    def has_pte_markers(self) -> bool:
        """PTE markers exist from v5.19 (CONFIG_PTE_MARKER, on in Debian 6.1); always from v6.2."""
        return self.version.tuple >= (5, 19)

    @property
    def has_swp_exclusive(self) -> bool:
        """``_PAGE_SWP_EXCLUSIVE`` (bit 3 of a swap PTE) exists from v5.19."""
        return self.version.tuple >= (5, 19)

    @property
    def has_swapin_error(self) -> bool:
        """``SWP_SWAPIN_ERROR``: a swap type of its own in v5.19-v6.1 (a PTE marker from v6.2)."""
        return (5, 19) <= self.version.tuple < (6, 2)

    @property
    def has_madv_populate(self) -> bool:
        """MADV_POPULATE_READ/WRITE exist from v5.14."""
        return self.version.tuple >= (5, 14)

    @property
    def has_guard_pages(self) -> bool:
        """MADV_GUARD_INSTALL/REMOVE exist from v6.13."""
        return self.version.tuple >= (6, 13)

    @property
    def has_uffdio_poison(self) -> bool:
        """UFFDIO_POISON exists from v6.6."""
        return self.version.tuple >= (6, 6)


RFC_BASE = KernelConfig()
"""The RFC's kernel: v5.12 with MEMORY_FAILURE, MIGRATION and DEVICE_PRIVATE."""

THIS_MACHINE = KernelConfig(version=KernelVersion.V6_18, memory_failure=False,
                            device_private=False, mem_soft_dirty=False)
"""The kernel on this project's machines as its /proc/config.gz reads (6.18: MEMORY_FAILURE,
DEVICE_PRIVATE and MEM_SOFT_DIRTY off; no LA57 on the CPU). A fixed reference for tests;
the oracle reads the running kernel itself with :func:`host_kernel_config`."""



# The CONFIG_* switches read from a kernel config, and the KernelConfig field each sets.
_SWITCHES = {
    "CONFIG_MEMORY_FAILURE": "memory_failure",
    "CONFIG_MIGRATION": "migration",
    "CONFIG_DEVICE_PRIVATE": "device_private",
    "CONFIG_MEM_SOFT_DIRTY": "mem_soft_dirty",
}
_CONFIG_LIMIT = 16 << 20  # a real .config is well under 1 MiB
# Registered only with CONFIG_MEMORY_FAILURE (kernel/sysctl.c under #ifdef up to 6.x, later
# mm/memory-failure.c, built only with it): its presence answers when no config is readable.
MEMORY_FAILURE_SYSCTL = "/proc/sys/vm/memory_failure_recovery"


def parse_kconfig(text: str) -> dict[str, str]:
    """``CONFIG_FOO=value`` lines of a kernel ``.config``; ``# CONFIG_FOO is not set`` gives "n"."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:-len(" is not set")]] = "n"
    return values


@dataclass(frozen=True)
class HostKernel:
    """The model of a running kernel, and where each of its switches came from."""

    release: str
    config: KernelConfig
    source: str | None  # the config file read, or None when none was found
    assumed: tuple[str, ...] = field(default=())  # switches taken from defaults, not read

    def describe(self) -> str:
        cfg = self.config
        on = ", ".join(f"{name}={'y' if getattr(cfg, attr) else 'n'}"
                       for name, attr in _SWITCHES.items())
        text = f"kernel {self.release} modelled as {cfg.version.value} ({on}; " \
               f"{'LA57' if cfg.x86_5level else '4-level'} paging)"
        if self.source is None:
            text += "; no kernel config found, assumed " + ", ".join(self.assumed)
        elif self.assumed:
            text += f"; read {self.source}, assumed " + ", ".join(self.assumed)
        else:
            text += f"; read {self.source}"
        return text


def _read_config(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_CONFIG_LIMIT)
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return raw.decode("utf-8", "replace")


def _cpu_has_la57(cpuinfo: str) -> bool | None:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "la57" in line.split()
    except OSError:
        return None
    return None


def host_kernel_config(release: str | None = None,
                       config_paths: Sequence[str] | None = None,
                       cpuinfo: str = "/proc/cpuinfo",
                       sysctl: str = MEMORY_FAILURE_SYSCTL) -> HostKernel:
    """The running kernel as the model sees it: version from ``uname -r``, switches from its config.

    Reads ``/proc/config.gz`` (CONFIG_IKCONFIG_PROC), then ``/boot/config-RELEASE``; never
    probes the kernel by changing memory state. 5-level paging is in force when the config
    allows it (CONFIG_X86_5LEVEL, or CONFIG_PGTABLE_LEVELS=5 from 6.x) and the CPU has LA57,
    as ``pgtable_l5_enabled()`` decides at boot. Without a config file, MEMORY_FAILURE is
    read from whether its sysctl exists. Whatever cannot be read keeps the
    :class:`KernelConfig` default and is listed in ``assumed``.
    """
    release = release or platform.release()
    assumed: list[str] = []
    try:
        version = KernelVersion.parse(release)
    except ValueError:
        version = max(KernelVersion, key=lambda v: v.tuple)
        assumed.append(f"version {version.value}")
    paths = config_paths if config_paths is not None else ("/proc/config.gz",
                                                            f"/boot/config-{release}")
    defaults = KernelConfig(version=version)
    for path in paths:
        if not os.path.isfile(path):
            continue
        text = _read_config(path)
        if text is None:
            continue
        values = parse_kconfig(text)
        switches = {attr: values.get(name, "n") == "y" for name, attr in _SWITCHES.items()}
        five_level_built = (values.get("CONFIG_X86_5LEVEL") == "y"
                            or values.get("CONFIG_PGTABLE_LEVELS") == "5")
        la57 = _cpu_has_la57(cpuinfo)
        if la57 is None and five_level_built:
            assumed.append("4-level paging (no CPU flags to read)")
        x86_5level = five_level_built and bool(la57)
        return HostKernel(release, KernelConfig(version=version, x86_5level=x86_5level,
                                                **switches), path, tuple(assumed))
    read: dict[str, bool] = {}
    if os.path.isdir(os.path.dirname(sysctl)):
        read["memory_failure"] = os.path.exists(sysctl)
    assumed += [f"{name}={'y' if getattr(defaults, attr) else 'n'}"
                for name, attr in _SWITCHES.items() if attr not in read]
    return HostKernel(release, KernelConfig(version=version, **read),
                      sysctl if read else None, tuple(assumed))
