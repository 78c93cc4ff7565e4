"""guest_memfd (6.18) on a poisoned folio: fallocate succeeds, a user fault is VM_FAULT_HWPOISON."""

from kvmpoison.config import Config
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.machine import Machine
from kvmpoison.mm.filemap import FALLOC_FL_KEEP_SIZE
from kvmpoison.mm.mmap import MAP_SHARED
from kvmpoison.mm.page import SetPageHWPoison
from kvmpoison.virt.kvm.guest_memfd import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

PAGE = 4096


def test_poisoned_guest_memfd_folio() -> None:
    m = Machine(Config(design="baseline", kernel=KernelConfig(version=KernelVersion.V6_18)))
    p = m.process("vmm")
    fd = p.guest_memfd(object(), PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).value
    assert fd is not None
    assert p.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, PAGE).cell == "ret:0"
    mapping = p.task.fds[fd].f_inode.mapping
    assert mapping is not None
    pfn = mapping.lookup(0)
    assert pfn is not None
    SetPageHWPoison(m.kernel.core.pages[pfn])
    assert p.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, PAGE).cell == "ret:0"  # no hwpoison check
    addr = p.mmap(0, PAGE, 3, MAP_SHARED, fd).value
    assert addr is not None
    # __do_fault (6.x) sees PageHWPoison after ->fault; the folio is clean (guest_memfd
    # ignores dirty flags) and unreferenced, so mapping_evict_folio drops it and the
    # retried fault gets a fresh, zeroed folio instead of VM_FAULT_HWPOISON.
    out = p.load(addr, 8)
    assert out.cell == "ok" and out.data == bytes(8)
    assert mapping.lookup(0) not in (None, pfn)
