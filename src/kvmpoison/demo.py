"""The narrated run behind ``kvmpoison demo``: one VM, one VMM, every design.

A guest boots (and, under the RFC, enables protection and shares its bounce
buffers); the VMM copies a boot image into a guest page, and the guest then
keeps a secret in that page. The demo shows the mechanism on that page: its
PTE in the VMM before and after protection (decoded by :mod:`kvmpoison.mm.ptdump`,
the same code as ``kvmpoison pte decode``), PG_hwpoison, the reference and map
counts of its struct page, and the EPT entry that still maps the frame for the
guest. Then the VMM turns hostile and reaches for the page through the host
paths the RFC closes; last, the guest reads its secret back.

Every design runs the same numbered steps on the same hardware
(:attr:`Config.integrity`), so step N means the same thing in every story.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.config import DEFAULT_INTEGRITY, Config
from kvmpoison.machine import Machine
from kvmpoison.matrix.designs import backing_pfn, run_design_cell
from kvmpoison.mm.page import PageHWPoison, page_count, page_mapcount
from kvmpoison.mm.ptdump import Decoding, decode, decode_ept
from kvmpoison.outcome import Halt, Outcome

SECRET = b"TD secret: 42 42"
BOOT_IMAGE = b"boot image page"
SECRET_GPA = 0x30 * PAGE_SIZE
REQUEST_GPA = 0x31 * PAGE_SIZE
SUMMARY_ROWS = ("load", "store", "process_vm_readv", "proc_pid_mem_read", "ptrace_peek",
                "pagecache_read", "guest_load_after_vmm_store")


@dataclass(frozen=True, slots=True)
class PageView:
    """The secret page as the host kernel and KVM hold it at one moment."""

    gpa: int
    pte: Decoding  # the VMM's PTE for the page
    pfn: int | None  # the frame backing the page (page cache, else the EPT)
    flags: tuple[str, ...]
    hwpoison: bool
    refcount: int
    mapcount: int
    ept: Decoding | None  # None: KVM maps nothing at this gpa

    def as_dict(self) -> dict[str, object]:
        return {"gpa": f"{self.gpa:#x}", "pte": self.pte.as_dict(),
                "pfn": None if self.pfn is None else f"{self.pfn:#x}",
                "flags": list(self.flags), "PG_hwpoison": self.hwpoison,
                "refcount": self.refcount, "mapcount": self.mapcount,
                "ept": None if self.ept is None else self.ept.as_dict()}


@dataclass(frozen=True, slots=True)
class Step:
    number: int
    actor: str
    action: str
    outcome: Outcome
    page: PageView | None = None  # shown after the step

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"step": self.number, "actor": self.actor, "action": self.action,
                                "cell": self.outcome.cell, "detail": self.outcome.detail}
        if self.outcome.data is not None:
            d["data"] = self.outcome.data.decode("latin-1")
        if self.outcome.siginfo is not None:
            d["si_addr"] = f"{self.outcome.siginfo.addr:#x}"
            d["si_addr_lsb"] = self.outcome.siginfo.addr_lsb
        if self.outcome.mce is not None:
            d["mci_status"] = f"{self.outcome.mce.mci_status:#018x}"
            d["mcg_status"] = f"{self.outcome.mce.mcg_status:#x}"
        if self.page is not None:
            d["page"] = self.page.as_dict()
        return d


def inspect_page(m: Machine, gpa: int) -> PageView:
    """Read the page's VMM PTE, struct page and EPT entry (no side effects)."""
    core = m.kernel.core
    mm = m.vmm.proc.task.mm
    pte = mm.pgd.get(m.vmm.gpa_to_hva(gpa)) if mm is not None else 0
    raw_ept = m.vm.ept.get(gpa)
    try:
        pfn: int | None = backing_pfn(m, gpa)
    except ValueError:
        pfn = None
    flags: tuple[str, ...] = ()
    hwpoison, refcount, mapcount = False, 0, 0
    if pfn is not None:
        page = core.pages[pfn]
        flags = tuple(core.pages.bits.names(int(core.pages.flags[pfn])))
        hwpoison, refcount, mapcount = PageHWPoison(page), page_count(page), page_mapcount(page)
    return PageView(gpa, decode(pte, core.kcfg), pfn, flags, hwpoison, refcount, mapcount,
                    decode_ept(raw_ept) if raw_ept else None)


def run_story(design: str, seed: int = 0,
              integrity: IntegrityMode = DEFAULT_INTEGRITY) -> list[Step]:
    """The same numbered steps on every design."""
    m = Machine(Config(design=design, seed=seed, integrity=integrity))
    g, vmm = m.guest, m.vmm
    steps: list[Step] = []

    def step(actor: str, action: str, out: Outcome, page: bool = False) -> None:
        steps.append(Step(len(steps) + 1, actor, action, out,
                          inspect_page(m, SECRET_GPA) if page else None))

    step("guest", "boot; share kvmclock and swiotlb (the RFC: enable protection first)",
         Outcome.ok(detail="; ".join(g.log)))
    step("vmm", "copy a boot image into guest page 0x30 (before protection)",
         vmm.store(SECRET_GPA, BOOT_IMAGE), page=True)
    step("guest", "store a secret in page 0x30: the first touch faults it into the EPT",
         _guarded(m, lambda: g.store(SECRET_GPA, SECRET)), page=True)
    g.store(REQUEST_GPA, b"GET /index.html")
    step("guest", "virtio: bounce a request into swiotlb",
         _guarded(m, lambda: g.virtio_send(REQUEST_GPA, 15)))
    step("vmm", "virtio device reads the request from swiotlb",
         vmm.device_read(g.layout.swiotlb_gpa, 15))
    step("vmm", "virtio device writes its reply",
         vmm.device_write(g.layout.swiotlb_gpa + PAGE_SIZE, b"200 OK"))
    step("guest", "virtio: copy the reply into private memory",
         _guarded(m, lambda: g.virtio_recv(REQUEST_GPA, 6)))
    # The VMM turns hostile.
    step("vmm", "load the guest's private page", vmm.load(SECRET_GPA, len(SECRET)))
    step("vmm", "store into the guest's private page", vmm.store(SECRET_GPA, b"VMM!"))
    attacker = m.process("attacker")
    buf = attacker.mmap(0, PAGE_SIZE, 3, 0x22).value or 0
    attacker.store(buf, bytes(PAGE_SIZE))
    out = attacker.process_vm_readv(vmm.proc, buf, vmm.gpa_to_hva(SECRET_GPA), 8)
    step("attacker", "process_vm_readv of the private page (GUP)",
         _with_copy(out, attacker.load(buf, 8)))
    scratch = vmm.scratch()
    out = (vmm.pread_ram(SECRET_GPA, scratch, 8) if vmm.ram_fd is not None
           else Outcome.error(9, "anonymous guest RAM has no page cache"))
    step("vmm", "pread the guest-RAM memfd (page cache)",
         _with_copy(out, vmm.proc.load(scratch, 8)))
    step("guest", "load the secret back", _guarded(m, lambda: g.load(SECRET_GPA, len(SECRET))),
         page=True)
    return steps


def _with_copy(out: Outcome, copied: Outcome) -> Outcome:
    """A call that moved bytes into a buffer, shown with those bytes."""
    if out.cell.startswith("ret:") and out.value and copied.data is not None:
        return dataclasses.replace(out, data=copied.data[: out.value])
    return out


def _guarded(m: Machine, run: Callable[[], Outcome]) -> Outcome:
    """A guest step; a machine that is already down (shutdown, panic) stays down."""
    core = m.kernel.core
    if core.halted is not None:
        return core.halted
    try:
        return run()
    except Halt as halt:
        core.halted = halt.outcome
        return halt.outcome


def summary(designs: tuple[str, ...], rows: tuple[str, ...] = SUMMARY_ROWS,
            integrity: IntegrityMode = DEFAULT_INTEGRITY) -> dict[tuple[str, str], str]:
    """(path, design) -> cell for a guest page the guest has made private."""
    def config(d: str) -> Config:
        return Config(design=d, integrity=integrity)

    return {(path, d): run_design_cell(d, "private", path, config).cell
            for path in rows for d in designs}
