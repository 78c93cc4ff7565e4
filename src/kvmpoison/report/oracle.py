"""The model against the running kernel, cell by cell (``kvmpoison oracle``).

Configures the model like the running kernel (version from ``uname``,
CONFIG_MEMORY_FAILURE from the kernel config, else by probing MADV_HWPOISON),
runs the live probes and the model's matrix, and compares the cells.
"""

from __future__ import annotations

import ctypes
import gzip
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmpoison.backends.kvm.probes import LOCAL_KVM_BACKINGS, run_probe
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.matrix.model import run_cell
from kvmpoison.matrix.protocol import BACKINGS, PATHS, REMOTE_PATHS


class OracleUnavailableError(Exception):
    """This machine cannot run the probes (exit status 2)."""


@dataclass
class Comparison:
    kernel: str
    kcfg: KernelConfig
    kvm_available: bool
    backings: tuple[str, ...]
    # (path, backing, live cell, model cell)
    cells: list[tuple[str, str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def disagreements(self) -> list[tuple[str, str, str, str]]:
        return [c for c in self.cells if c[2] != c[3]]

    @property
    def agreed(self) -> int:
        return len(self.cells) - len(self.disagreements)


def memory_failure_configured(release: str) -> bool:
    """CONFIG_MEMORY_FAILURE of the running kernel."""
    for path in ("/proc/config.gz", f"/boot/config-{release}"):
        if os.path.exists(path):
            with open(path, "rb") as fh:
                raw = fh.read()
            if path.endswith(".gz"):
                raw = gzip.decompress(raw)
            return b"\nCONFIG_MEMORY_FAILURE=y" in b"\n" + raw
    return _probe_madv_hwpoison()


def _probe_madv_hwpoison() -> bool:
    """Without a config: MADV_HWPOISON is EINVAL exactly when MEMORY_FAILURE is off."""
    from kvmpoison.backends.kvm.libc import MAP_ANONYMOUS, MAP_PRIVATE, libc, mmap

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child poisons its own page, then leaves
        addr = mmap(None, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS)
        ctypes.memset(addr, 1, 4096)
        ret = libc.madvise(addr, 4096, 100)
        os._exit(1 if ret < 0 and ctypes.get_errno() == 22 else 0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def compare(progress: Callable[[], None] | None = None) -> Comparison:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise OracleUnavailableError(f"the probes need Linux on x86-64, not {platform.system()} "
                                f"{platform.machine()}")
    release = platform.release()
    try:
        version = KernelVersion.parse(release)
    except ValueError:
        version = KernelVersion.V6_18
    kcfg = KernelConfig(version=version, memory_failure=memory_failure_configured(release))
    kvm = kvm_usable()
    backings = BACKINGS if kvm else tuple(b for b in BACKINGS if b not in LOCAL_KVM_BACKINGS)
    result = Comparison(release, kcfg, kvm, backings)
    if not kvm:
        result.notes.append("/dev/kvm is not usable: the guest_memfd columns were not compared")
    if version.value not in release:
        result.notes.append(f"kernel {release} is modelled as {version.value}")
    t0 = time.perf_counter()
    for path in PATHS:
        for backing in backings:
            live = run_probe(path, backing, REMOTE_PATHS)
            if live.cell == "error":
                raise OracleUnavailableError(f"probe {path}/{backing} failed: {live.detail}")
            model = run_cell(kcfg, path, backing).cell
            result.cells.append((path, backing, live.cell, model))
            if progress is not None:
                progress()
    result.seconds = time.perf_counter() - t0
    return result
