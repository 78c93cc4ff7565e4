"""What the running kernel offers, found by reading files only.

Nothing here changes host state: no madvise, no sysfs writes, no probe that
could take a page out of service. ``/dev/kvm`` is opened and closed again,
which creates nothing.
"""

from __future__ import annotations

import errno
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

# Registered only when the kernel is built with CONFIG_MEMORY_FAILURE: in kernel/sysctl.c
# under #ifdef CONFIG_MEMORY_FAILURE up to v6.x, later in mm/memory-failure.c, which is
# only built with it (mm/Makefile: obj-$(CONFIG_MEMORY_FAILURE) += memory-failure.o).
MEMORY_FAILURE_SYSCTL = "/proc/sys/vm/memory_failure_recovery"
# Most distribution kernels for x86-64 set it; it is what the oracle assumes without evidence.
MEMORY_FAILURE_ASSUMED = True


@dataclass(frozen=True)
class ConfigAnswer:
    """One CONFIG_* value and where it came from (``assumed`` when nothing said)."""

    value: bool
    source: str
    assumed: bool = False


def config_files(release: str) -> tuple[Path, ...]:
    return (Path("/proc/config.gz"), Path(f"/boot/config-{release}"))


def read_kernel_config(release: str) -> tuple[bytes, str] | None:
    """The running kernel's .config text and its path, if one is readable."""
    for path in config_files(release):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if path.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError):
                continue
        return raw, str(path)
    return None


def config_enabled(config: bytes, name: str) -> bool:
    """``CONFIG_NAME=y`` (or ``=m``) in a .config text."""
    lines = config.splitlines()
    return f"{name}=y".encode() in lines or f"{name}=m".encode() in lines


def memory_failure_configured(release: str, sysctl: str = MEMORY_FAILURE_SYSCTL) -> ConfigAnswer:
    """CONFIG_MEMORY_FAILURE: from the kernel config, else from its sysctl, else assumed."""
    found = read_kernel_config(release)
    if found is not None:
        raw, path = found
        return ConfigAnswer(config_enabled(raw, "CONFIG_MEMORY_FAILURE"), path)
    sysctl_dir = os.path.dirname(sysctl)
    if os.path.isdir(sysctl_dir):
        return ConfigAnswer(os.path.exists(sysctl), f"{sysctl} (present only with the option)")
    return ConfigAnswer(MEMORY_FAILURE_ASSUMED, "no kernel config and no /proc/sys/vm",
                        assumed=True)


def kvm_status(path: str = "/dev/kvm") -> str | None:
    """None when ``path`` opens read-write, else why not: missing, denied, or the errno."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return f"missing ({exc.strerror})"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"denied ({exc.strerror}: the user needs access to {path}, e.g. group kvm)"
        return f"unusable ({exc.strerror})"
    os.close(fd)
    return None
