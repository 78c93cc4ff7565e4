"""Boot the cached kernel under ``qemu-system-x86_64`` and collect its serial console.

TCG by default. KVM acceleration is used only where hardware-assisted KVM
(kvm_intel or kvm_amd) is loaded and /dev/kvm opens: a paravirtual KVM such
as kvm_pvm emulates a non-PVM guest instruction by instruction, slower than
TCG. The whole run is bounded by one timeout; qemu is killed when it passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmpoison.backends.vmkernel.cache import KernelFiles
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.backends.vmkernel.initramfs import MOUNT_TAG

QEMU = "qemu-system-x86_64"
MEMORY_MB = 1024
BOOT_TIMEOUT = 900  # TCG: a full matrix takes a few minutes; a hang must not last forever


@dataclass(frozen=True)
class Boot:
    console: str
    seconds: float
    accel: str


def hardware_kvm() -> bool:
    """/dev/kvm opens and a hardware-assisted KVM module (not a paravirtual one) is loaded."""
    if not any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return False
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def pick_accel(accel: str) -> str:
    if accel not in ("auto", "tcg", "kvm"):
        raise ValueError(f"unknown accelerator {accel!r} (known: auto, tcg, kvm)")
    if accel == "auto":
        return "kvm" if hardware_kvm() else "tcg"
    return accel


def command(kernel: KernelFiles, cmdline: str, accel: str) -> list[str]:
    argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-m", str(MEMORY_MB), "-smp", "1",
            "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initramfs),
            "-append", cmdline,
            "-virtfs", f"local,path=/,mount_tag={MOUNT_TAG},security_model=none,"
                       "readonly=on,multidevs=remap"]
    return argv


def boot(kernel: KernelFiles, params: dict[str, str], accel: str = "auto",
         timeout: float = BOOT_TIMEOUT) -> Boot:
    """Run the guest to its poweroff; return everything it printed on ttyS0."""
    if shutil.which(QEMU) is None:
        raise VmKernelUnavailableError(f"{QEMU} is missing: install qemu-system-x86 "
                                       "(apt-get install qemu-system-x86)")
    for key, value in params.items():
        if not value or any(ch.isspace() for ch in value):
            raise VmKernelUnavailableError(f"kernel parameter {key}={value!r} must be one word "
                                           "(a path without spaces)")
    chosen = pick_accel(accel)
    words = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "secretmem.enable=1"]
    words += [f"{k}={v}" for k, v in params.items()]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command(kernel, " ".join(words), chosen), capture_output=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode(errors="replace")[-400:]
        raise VmKernelUnavailableError(f"the {Path(QEMU).name} guest did not finish in "
                                       f"{timeout:.0f} s; console tail: {tail!r}") from None
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise VmKernelUnavailableError(f"{QEMU} failed: {err[-1] if err else done.returncode}")
    return Boot(done.stdout.decode(errors="replace"), seconds, chosen)
