"""The real kernel doing bulk mm work, for ratios: shared with ``kvmpoison bench``."""

from __future__ import annotations

from kvmpoison.backends.kvm.timing import anon_bulk, memfd_punch, thp_bulk

__all__ = ["anon_bulk", "memfd_punch", "thp_bulk"]
