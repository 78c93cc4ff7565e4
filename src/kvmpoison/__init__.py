"""kvmpoison: an executable, bit-faithful model of "KVM: unmap guest memory using poisoned pages".

See docs/architecture.md for the layers. The public surface is
re-exported here.
"""

from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.outcome import Outcome
from kvmpoison.uapi.siginfo import SigInfo

__all__ = ["Config", "KernelConfig", "KernelVersion", "Outcome", "SigInfo"]
__version__ = "0.1.0"
