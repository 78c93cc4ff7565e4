"""The model against the running kernel, cell by cell (``kvmpoison oracle``).

Configures the model like the running kernel (version from ``uname``, CONFIG_*
switches from its config file, see :func:`~kvmpoison.kconfig.host_kernel_config`;
never by probing), runs the live probes and the model's matrix, and compares the cells.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmpoison.backends.kvm.host import kvm_status
from kvmpoison.backends.kvm.probes import LOCAL_KVM_BACKINGS, run_probe
from kvmpoison.kconfig import KernelConfig, host_kernel_config
from kvmpoison.matrix.model import run_cell
from kvmpoison.matrix.protocol import (
    BACKINGS,
    NOT_REFEREED,
    PATHS,
    REMOTE_PATHS,
    THP_BACKINGS,
    THP_PATHS,
)
from kvmpoison.mm.huge_memory import host_thp_settings

THP_CELL_PATHS = PATHS + THP_PATHS  # every path, then the THP probes, on each THP backing


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
    kvm_problem: str | None = None  # why /dev/kvm is not usable: "missing (...)", "denied (...)"
    skipped: int = 0  # cells not compared because their backing needs /dev/kvm
    # (backing, path or "*" for the whole column, reason): the kernel gave no huge page
    not_refereed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def disagreements(self) -> list[tuple[str, str, str, str]]:
        return [c for c in self.cells if c[2] != c[3]]

    @property
    def agreed(self) -> int:
        return len(self.cells) - len(self.disagreements)


def compare(progress: Callable[[], None] | None = None) -> Comparison:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise OracleUnavailableError(f"the probes need Linux on x86-64, not {platform.system()} "
                                f"{platform.machine()}")
    host = host_kernel_config()
    release, kcfg = host.release, host.config
    problem = kvm_status()
    kvm = problem is None
    backings = BACKINGS if kvm else tuple(b for b in BACKINGS if b not in LOCAL_KVM_BACKINGS)
    result = Comparison(release, kcfg, kvm, backings, kvm_problem=problem,
                        skipped=len(PATHS) * (len(BACKINGS) - len(backings)))
    if host.assumed:
        result.notes.append("the cells that depend on an assumed switch may disagree for that "
                            "reason")
    if not kvm:
        result.notes.append(f"/dev/kvm {problem}: the guest_memfd columns were not compared")
    result.notes.append(host.describe())
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
    compare_thp(result, progress)
    result.seconds = time.perf_counter() - t0
    return result


def compare_thp(result: Comparison, progress: Callable[[], None] | None = None,
                backings: tuple[str, ...] = THP_BACKINGS) -> None:
    """The THP columns: every path and THP probe, where the kernel PMD-maps the region.

    One set-up first per column: where its check finds no PMD mapping (THP off for that
    kind of memory, and the tool never changes the sysfs switch), the column is not
    refereed, with the reason. The model's own check is reported as a note.
    """
    thp, _ = host_thp_settings()  # the model runs with the modes this kernel shows
    for backing in backings:
        first = run_probe("thp_smaps", backing, REMOTE_PATHS)
        if first.cell == NOT_REFEREED:
            result.not_refereed.append((backing, "*", first.detail))
            result.notes.append(f"not refereed: {first.detail}")
            if progress is not None:
                for _ in THP_CELL_PATHS:
                    progress()
            continue
        result.backings += (backing,)
        model_check = ""
        for path in THP_CELL_PATHS:
            live = run_probe(path, backing, REMOTE_PATHS)
            if live.cell == NOT_REFEREED:  # this one set-up got no huge page
                result.not_refereed.append((backing, path, live.detail))
            elif live.cell == "error":
                raise OracleUnavailableError(f"probe {path}/{backing} failed: {live.detail}")
            else:
                model = run_cell(result.kcfg, path, backing, thp)
                model_check = model_check or model.thp_check
                result.cells.append((path, backing, live.cell, model.cell))
            if progress is not None:
                progress()
        if model_check:
            result.notes.append(f"model: {model_check}; the cells that depend on the huge "
                                "page disagree until the model's mm maps THPs")
