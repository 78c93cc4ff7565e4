"""The narrated run behind ``kvmpoison demo``: one VM, one VMM, one design.

A guest boots (and, under the RFC, enables protection and shares its bounce
buffers), does virtio I/O through swiotlb, and keeps a secret in private
memory. Then the VMM turns hostile and reaches for that page through the
host paths the RFC closes; last, the guest reads its secret back.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable_types import PAGE_SIZE
from kvmpoison.config import Config
from kvmpoison.machine import Machine
from kvmpoison.matrix.designs import run_design_cell
from kvmpoison.outcome import Outcome

SECRET = b"TD secret: 42 42"
SECRET_GPA = 0x30 * PAGE_SIZE
REQUEST_GPA = 0x31 * PAGE_SIZE
SUMMARY_ROWS = ("load", "store", "process_vm_readv", "proc_pid_mem_read", "pagecache_read",
                "guest_load_after_vmm_store")


@dataclass(frozen=True, slots=True)
class Step:
    actor: str
    action: str
    outcome: Outcome

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"actor": self.actor, "action": self.action,
                                "cell": self.outcome.cell, "detail": self.outcome.detail}
        if self.outcome.data is not None:
            d["data"] = self.outcome.data.decode("latin-1")
        if self.outcome.siginfo is not None:
            d["si_addr"] = f"{self.outcome.siginfo.addr:#x}"
            d["si_addr_lsb"] = self.outcome.siginfo.addr_lsb
        if self.outcome.mce is not None:
            d["mci_status"] = f"{self.outcome.mce.mci_status:#018x}"
            d["mcg_status"] = f"{self.outcome.mce.mcg_status:#x}"
        return d


def run_story(design: str, seed: int = 0) -> list[Step]:
    m = Machine(Config(design=design, seed=seed))
    g, vmm = m.guest, m.vmm
    steps = [Step("guest", line, Outcome.ok()) for line in g.log]
    steps.append(Step("guest", "store a secret in private memory", g.store(SECRET_GPA, SECRET)))
    # virtio: the guest bounces a request through swiotlb; the device answers.
    g.store(REQUEST_GPA, b"GET /index.html")
    steps.append(Step("guest", "virtio: bounce a request into swiotlb",
                      g.virtio_send(REQUEST_GPA, 15)))
    steps.append(Step("vmm", "virtio device reads the request from swiotlb",
                      vmm.device_read(g.layout.swiotlb_gpa, 15)))
    steps.append(Step("vmm", "virtio device writes its reply",
                      vmm.device_write(g.layout.swiotlb_gpa + PAGE_SIZE, b"200 OK")))
    steps.append(Step("guest", "virtio: copy the reply into private memory",
                      g.virtio_recv(REQUEST_GPA, 6)))
    # The VMM turns hostile.
    steps.append(Step("vmm", "load the guest's private page", vmm.load(SECRET_GPA, len(SECRET))))
    steps.append(Step("vmm", "store into the guest's private page", vmm.store(SECRET_GPA, b"VMM!")))
    attacker = m.process("attacker")
    buf = attacker.mmap(0, PAGE_SIZE, 3, 0x22).value or 0
    attacker.store(buf, bytes(PAGE_SIZE))
    hva = vmm.gpa_to_hva(SECRET_GPA)
    steps.append(Step("attacker", "process_vm_readv of the private page (GUP)",
                      attacker.process_vm_readv(vmm.proc, buf, hva, 8)))
    if vmm.ram_fd is not None:
        steps.append(Step("vmm", "pread the guest-RAM memfd (page cache)",
                          vmm.pread_ram(SECRET_GPA, vmm.scratch(), 8)))
    steps.append(Step("guest", "load the secret back", g.load(SECRET_GPA, len(SECRET))))
    return steps


def summary(designs: tuple[str, ...], rows: tuple[str, ...] = SUMMARY_ROWS,
            ) -> dict[tuple[str, str], str]:
    """(path, design) -> cell for a guest page the guest has made private."""
    return {(path, d): run_design_cell(d, "private", path).cell for path in rows for d in designs}
