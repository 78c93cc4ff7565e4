"""One boot of the VM kernel: prepare the cache, boot, run the cells, parse the console.

This is the host side of :mod:`.guest`: it writes the job (the cells to
probe) to a file the guest reads over the read-only 9p root, boots, and
turns the framed console lines back into results.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvmpoison.backends.vmkernel import initramfs, package, qemu
from kvmpoison.backends.vmkernel.cache import KernelFiles, cache_root, cached_kernels
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.backends.vmkernel.guest import MARK_CELL, MARK_END, MARK_INFO, MARK_SCENARIO


@dataclass
class VmRun:
    """What one boot measured."""

    kernel: KernelFiles
    accel: str
    wall_seconds: float
    probe_seconds: float
    boot_seconds: float  # power-on to the runner's start (init + modules + 9p + python)
    info: dict[str, object]
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    details: dict[tuple[str, str], str] = field(default_factory=dict)
    console: str = ""
    scenarios: dict[int, dict[str, object]] = field(default_factory=dict)  # i: results | error


def prepare() -> KernelFiles:
    """The newest cached kernel (on a first run, fetched), with an up-to-date initramfs."""
    cached = cached_kernels()
    kernel = cached[-1] if cached else package.fetch()
    initramfs.ensure(kernel)
    return kernel


def source_dir() -> Path:
    """The directory whose ``kvmpoison`` package the guest imports (this very copy)."""
    return Path(__file__).resolve().parents[3]  # src/, above the package


def run_cells(cells: list[tuple[str, str]], accel: str = "auto",
              timeout: float = qemu.BOOT_TIMEOUT) -> VmRun:
    return run_job({"cells": [list(c) for c in cells]}, accel, timeout)


def run_scenarios(scenarios: list[dict[str, object]], accel: str = "auto",
                  timeout: float = qemu.BOOT_TIMEOUT, kernel: KernelFiles | None = None
                  ) -> VmRun:
    """One boot for every scenario: each ``{"vms", "steps"}`` as ``run_live`` takes them."""
    return run_job({"scenarios": scenarios}, accel, timeout, kernel)


def run_job(payload: dict[str, object], accel: str = "auto",
            timeout: float = qemu.BOOT_TIMEOUT, kernel: KernelFiles | None = None) -> VmRun:
    kernel = kernel or prepare()
    jobs = cache_root() / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=jobs, suffix=".json", delete=True) as job:
        json.dump(payload, job)
        job.flush()
        booted = qemu.boot(kernel, {"kvmpoison.src": str(source_dir()),
                                    "kvmpoison.job": job.name,
                                    "kvmpoison.python": sys.executable}, accel, timeout)
    return parse(kernel, booted)


def parse(kernel: KernelFiles, booted: qemu.Boot) -> VmRun:
    info: dict[str, object] = {}
    cells: dict[tuple[str, str], str] = {}
    details: dict[tuple[str, str], str] = {}
    scenarios: dict[int, dict[str, object]] = {}
    probe_seconds, boot_seconds = -1.0, -1.0
    for raw in booted.console.splitlines():
        line = raw.strip("\r\n")
        mark, _, body = line.partition(" ")
        if mark == "KVMPOISON-STAGE" and body.startswith("chroot "):
            boot_seconds = float(body.split()[1])
        elif mark in (MARK_INFO, MARK_CELL, MARK_END, MARK_SCENARIO):
            try:
                msg = json.loads(body)
            except json.JSONDecodeError:
                continue  # a console line broken by a kernel message: the cell counts as missing
            if mark == MARK_INFO:
                info = msg
            elif mark == MARK_SCENARIO:
                scenarios[int(msg.pop("i"))] = msg
            elif mark == MARK_CELL:
                key = (str(msg["path"]), str(msg["backing"]))
                cells[key] = str(msg["cell"])
                details[key] = str(msg.get("detail", ""))
            else:
                probe_seconds = float(msg["seconds"])
    if probe_seconds < 0:
        tail = "\n".join(booted.console.strip().splitlines()[-8:])
        raise VmKernelUnavailableError(f"the guest runner did not finish; console tail:\n{tail}")
    return VmRun(kernel, booted.accel, booted.seconds, probe_seconds, boot_seconds, info, cells,
                 details, booted.console, scenarios)
