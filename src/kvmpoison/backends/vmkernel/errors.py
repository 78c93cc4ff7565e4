"""The one error of the VM kernel backend: something this machine lacks."""

from __future__ import annotations


class VmKernelUnavailableError(Exception):
    """The VM kernel cannot be fetched, built or booted here; the message says what to install."""
