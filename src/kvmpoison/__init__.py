"""kvmpoison: an executable, bit-faithful model of "KVM: unmap guest memory using poisoned pages".

See docs/architecture.md for the layers. The public surface is
re-exported here, loaded on first use: importing the package alone (as the
command line does before it knows its command) loads neither numpy nor the
model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmpoison.config import Config
    from kvmpoison.kconfig import KernelConfig, KernelVersion
    from kvmpoison.outcome import Outcome
    from kvmpoison.uapi.siginfo import SigInfo

_EXPORTS = {"Config": "kvmpoison.config", "KernelConfig": "kvmpoison.kconfig",
            "KernelVersion": "kvmpoison.kconfig", "Outcome": "kvmpoison.outcome",
            "SigInfo": "kvmpoison.uapi.siginfo"}

__all__ = ["Config", "KernelConfig", "KernelVersion", "Outcome", "SigInfo"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmpoison' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value
