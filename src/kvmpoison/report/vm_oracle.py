"""The model against Debian's Linux 6.1 under QEMU (``kvmpoison oracle --kernel debian-6.1``).

The second referee: a kernel with CONFIG_MEMORY_FAILURE=y, so the hwpoison
columns (MADV_HWPOISON in the guest, memory_failure() in the model) are held
to a real kernel. The model is configured from the package's /boot/config and
its version; one boot runs every live cell, then the model runs the same cells.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvmpoison.backends.vmkernel import session
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.matrix.model import run_cell
from kvmpoison.matrix.protocol import (
    HWPOISON_BACKINGS,
    HWPOISON_PATHS_FOR,
    NOT_REFEREED,
    PATHS,
    THP_BACKINGS,
    THP_PATHS,
)
from kvmpoison.mm.huge_memory import thp_settings_from_sysfs
from kvmpoison.report.oracle import Comparison

KERNELS = ("debian-6.1",)
# The guest has no /dev/kvm (no nested virtualisation) and 6.1 predates UFFDIO_POISON
# (v6.6) and MADV_GUARD_INSTALL (v6.13): those columns cannot be refereed here.
VM_BACKINGS = ("anon", "anon_prot_none", "memfd_secret", "file_beyond_eof", *HWPOISON_BACKINGS)
UNPOISON_PATHS = ("unpoison", "unpoison_load")
EVERY_BACKING_PATHS = ("load_siginfo", "pagemap", "fork_child_load", "dontneed_load")


@dataclass
class VmComparison(Comparison):
    accel: str = "tcg"
    boot_seconds: float = 0.0  # power-on to the runner's start, guest clock
    probe_seconds: float = 0.0  # the live probes, guest clock
    wall_seconds: float = 0.0  # the whole qemu run, host clock
    model_seconds: float = 0.0


def kconfig_from_text(text: str, version: KernelVersion) -> KernelConfig:
    """The switches the model honours, read from a kernel's ``.config``."""
    on = {line.split("=", 1)[0] for line in text.splitlines()
          if line.startswith("CONFIG_") and line.endswith("=y")}
    return KernelConfig(version=version, memory_failure="CONFIG_MEMORY_FAILURE" in on,
                        migration="CONFIG_MIGRATION" in on,
                        device_private="CONFIG_DEVICE_PRIVATE" in on,
                        mem_soft_dirty="CONFIG_MEM_SOFT_DIRTY" in on,
                        x86_5level="CONFIG_X86_5LEVEL" in on)


def vm_cells() -> list[tuple[str, str]]:
    """Every MATRIX path on every refereed backing, then the hwpoison probes.

    ``load_siginfo`` (si_addr, si_addr_lsb), ``pagemap``, a fork child's load and
    MADV_DONTNEED-then-load are meaningful on every backing: the others get them too.
    """
    cells = [(path, backing) for path in PATHS for backing in VM_BACKINGS]
    cells += [(path, b) for path in EVERY_BACKING_PATHS for b in VM_BACKINGS
              if b not in HWPOISON_BACKINGS]
    cells += [(path, backing) for backing in HWPOISON_BACKINGS
              for path in HWPOISON_PATHS_FOR[backing]]
    # The THP columns: the guest's runner sets ITS shmem_enabled to advise, so both run.
    cells += [(path, backing) for backing in THP_BACKINGS for path in PATHS + THP_PATHS]
    return cells


def compare_vm(kernel: str = "debian-6.1", accel: str = "auto") -> VmComparison:
    if kernel not in KERNELS:
        raise ValueError(f"unknown VM kernel {kernel!r} (known: {', '.join(KERNELS)})")
    run = session.run_cells(vm_cells(), accel)
    release = str(run.info.get("release", run.kernel.release))
    kcfg = kconfig_from_text(run.kernel.config.read_text(), KernelVersion.parse(release))
    if not kcfg.memory_failure:
        raise VmKernelUnavailableError(f"{release} has no CONFIG_MEMORY_FAILURE")
    result = VmComparison(release, kcfg, False, VM_BACKINGS + THP_BACKINGS, accel=run.accel,
                          boot_seconds=run.boot_seconds, probe_seconds=run.probe_seconds,
                          wall_seconds=run.wall_seconds, seconds=run.wall_seconds)
    result.notes.append("not refereed: gmem_private and gmem_shared (no /dev/kvm in the guest), "
                        "uffd_poison (UFFDIO_POISON is v6.6) and madv_guard "
                        "(MADV_GUARD_INSTALL is v6.13)")
    if not run.info.get("hwpoison_inject"):
        result.notes.append("hwpoison_inject did not load: the unpoison cells were not compared")
    if run.info.get("tmp_fs") != "ext4":
        result.notes.append(f"the guest's scratch is {run.info.get('tmp_fs')}, not ext4: "
                            "O_DIRECT cells may differ")
    result.notes.append(f"the guest's shmem_enabled: {run.info.get('shmem_enabled')} "
                        "(set in the guest by its runner)")
    # The model runs the THP columns with the guest's own modes (its runner reports them).
    modes = run.info.get("thp_modes")
    thp, _ = thp_settings_from_sysfs({str(k): str(v) for k, v in modes.items()}
                                     if isinstance(modes, dict) else {})
    t0 = time.perf_counter()
    model_checks: dict[str, str] = {}
    for path, backing in vm_cells():
        if path in UNPOISON_PATHS and not run.info.get("hwpoison_inject"):
            continue
        live = run.cells.get((path, backing), "missing")
        if live == NOT_REFEREED:  # the guest kernel gave no huge page: never faked
            result.not_refereed.append((backing, path, run.details.get((path, backing), "")))
            continue
        if live in ("error", "missing"):
            detail = run.details.get((path, backing), "no console line")
            result.notes.append(f"live probe {path}/{backing} failed: {detail}")
        cell = run_cell(kcfg, path, backing, thp)
        if cell.thp_check:
            model_checks.setdefault(backing, cell.thp_check)
        result.cells.append((path, backing, live, cell.cell))
    for backing in sorted({b for b, _, _ in result.not_refereed}):
        whys = [r for b, _, r in result.not_refereed if b == backing]
        result.notes.append(f"not refereed: {backing} ({len(whys)} cells): {whys[0]}")
    for check in model_checks.values():
        result.notes.append(f"model: {check}; the cells that depend on the huge page disagree "
                            "until the model's mm maps THPs")
    result.model_seconds = time.perf_counter() - t0
    return result
