"""Named designs: policies over one kernel (docs/designs.md).

A design picks the modelled kernel, how KVM protects guest memory, and which
mm hook points the RFC's patches fill in. mm, arch and hardware code are
shared by every design, and so is the hardware itself: the memory-integrity
mode is a machine setting (:attr:`kvmpoison.config.Config.integrity`), never a
design's, so that designs differ only where the RFC's patches differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.mm.core import FollowPoisoned, MmHooks
from kvmpoison.virt.kvm.kvm_main import Protection


@dataclass(frozen=True)
class Design:
    name: str
    summary: str
    kernel: KernelConfig
    protection: Protection
    hooks: Callable[[], MmHooks]
    unpoison_on_free: bool = False
    scrub_on_free: bool = False  # hardened: guest-private pages are scrubbed when freed
    # The oldest kernel the design can run: a scenario's older [machine] kernel is raised
    # to it (hardened needs PTE markers, v5.19+: the model's 6.1 or 6.18).
    kernel_floor: KernelVersion | None = None


def _rfc_hooks(follow: FollowPoisoned) -> Callable[[], MmHooks]:
    def make() -> MmHooks:
        return MmHooks(follow_poisoned=follow, shmem_getpage_fails_poisoned=True,
                       hwpoison_entry_holds_ref=True, do_swap_page_restores_unpoisoned=True)
    return make


DESIGNS: dict[str, Design] = {
    d.name: d
    for d in (
        Design("baseline", "upstream v5.12 KVM on a TDX-style host: guest memory stays "
               "mapped in the VMM", RFC_BASE, Protection.NONE, MmHooks),
        Design("rfc-v1", "RFCv1 7/7: poisoned pages, GUP flag check commented out, no owner map",
               RFC_BASE, Protection.RFC_V1, _rfc_hooks(FollowPoisoned.ALWAYS)),
        Design("rfc-v2", "RFCv2 13/13: poisoned pages, FOLL_ALLOW_POISONED, owner map, "
               "unpoison on free", RFC_BASE, Protection.RFC_V2,
               _rfc_hooks(FollowPoisoned.WITH_FLAG), unpoison_on_free=True),
        # What upstream built instead (v6.18 KVM on the same TDX-style host): private
        # memory lives in a guest_memfd the VMM never maps; conversions are attributes.
        Design("gmem", "upstream v6.18: private memory in guest_memfd, KVM_HC_MAP_GPA_RANGE "
               "and KVM_SET_MEMORY_ATTRIBUTES", KernelConfig(version=KernelVersion.V6_18),
               Protection.GMEM, MmHooks),
        # Not upstream: the RFC's mechanism with every reviewed weakness fixed, on v6.18
        # for its PTE markers (docs/hardened.md).
        Design("hardened", "design (not upstream): the RFC's unmapped private pages with "
               "their own PTE marker and page flag, owner bindings, unshare, scrub on free, "
               "defined refusals", KernelConfig(version=KernelVersion.V6_18),
               Protection.HARDENED, lambda: MmHooks(guest_private=True),
               scrub_on_free=True, kernel_floor=KernelVersion.V6_1),
    )
}


def design(name: str) -> Design:
    try:
        return DESIGNS[name]
    except KeyError:
        raise ValueError(f"unknown design {name!r} (known: {', '.join(DESIGNS)})") from None
