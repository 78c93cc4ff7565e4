"""Errors of the real-kernel backend: OSErrors that name the ioctl."""

from __future__ import annotations

import os


class KvmError(OSError):
    """A KVM ioctl failed: ``errno`` plus the ioctl's name."""

    def __init__(self, err: int, ioctl: str, detail: str = ""):
        super().__init__(err, f"{ioctl}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))
        self.ioctl = ioctl
