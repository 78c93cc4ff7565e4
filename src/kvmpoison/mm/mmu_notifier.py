"""MMU notifiers: how a secondary MMU (KVM's EPT) hears that host PTEs changed.

Follows ``include/linux/mmu_notifier.h`` (v5.12): every path that zaps, moves or
write-protects PTEs calls ``invalidate_range_start``/``_end`` around the
change; KVM zaps the SPTEs of the covered gfns. The model is single-threaded,
so one ``invalidate_range`` call after the change stands for the pair.
"""

from __future__ import annotations

from typing import Protocol


class MmuNotifier(Protocol):
    def invalidate_range(self, start: int, end: int) -> None: ...

    def release(self) -> None: ...
