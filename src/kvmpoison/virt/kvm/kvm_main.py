"""KVM core: VMs, memslots, ``hva_to_pfn``, guest-memory access by KVM itself, MMU notifiers.

Follows ``virt/kvm/kvm_main.c`` (v5.12) and, where a VM runs a protection
variant, the RFC's changes to it (RFCv2 13/13 and "KVM: passdown struct kvm
to hva_to_pfn_slow()"): ``kvm->id`` from a wrapping counter, FOLL_ALLOW_POISONED
in ``hva_to_pfn_slow`` with a ``kvm_page_allowed`` owner check, and
``copy_from_guest``/``copy_to_guest`` through GUP and kmap.

KVM holds no page reference for an SPTE: it drops the GUP reference once the
SPTE is installed and relies on MMU notifiers to zap it when the host PTE
goes away. Where the RFC returns early without ``put_page`` (an owner check
that fails in ``hva_to_pfn_slow`` or ``copy_{from,to}_guest``, a refused
``kvm_protect_pfn``), the model leaks the reference too.
"""

from __future__ import annotations

import enum
import errno
import signal
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvmpoison.arch.x86.pgtable import pte_pfn, pte_present
from kvmpoison.arch.x86.pgtable_types import _PAGE_RW, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.arch.x86.vmx import PT_PAGE_SIZE_MASK, VMX_EPT_RWX_MASK
from kvmpoison.kernel.task import Task, force_sig_info
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.fault import vma_lookup
from kvmpoison.mm.gup import FOLL, get_user_pages
from kvmpoison.mm.memory import handle_mm_fault, pfn_valid
from kvmpoison.mm.mm_types import VM, VM_FAULT_ERROR, FaultFlag, MmStruct, Vma
from kvmpoison.mm.page import Page, PageFlag, PageHWPoison, get_page, put_page
from kvmpoison.mm.page_flags import PG
from kvmpoison.mm.pagetable import ADDRESS_BITS, TASK_SIZE, PageTables, PteStore
from kvmpoison.mm.uaccess import copy_from_user, copy_to_user
from kvmpoison.outcome import Halt, Kind, McKind, Outcome
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import BusCode, SigInfo
from kvmpoison.virt.kvm.memory_attributes import MemAttrArray
from kvmpoison.virt.kvm.private_mem import GmemVm, KvmExit

KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_FAULT = KVM_PFN_ERR_MASK
KVM_PFN_ERR_HWPOISON = KVM_PFN_ERR_MASK + 1
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2
KVM_PFN_NOSLOT = 1 << 63
KVM_NR_SHARED_RANGES = 32
# include/linux/kvm_host.h: SHRT_MAX - KVM_INTERNAL_MEM_SLOTS (x86: 3) from v5.12 (4fc096a99e01,
# the first KVM pull for 5.12); 509 up to v5.11, which the model does not follow.
KVM_USER_MEM_SLOTS = 0x7FFF - 3
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
TASK_SIZE_MAX = TASK_SIZE - PAGE_SIZE  # arch/x86/include/asm/page_64_types.h, 4-level
EPT_MAX_GFN = 1 << (ADDRESS_BITS - PAGE_SHIFT)  # a 4-level EPT maps 48-bit guest-physical addresses


def check_guest_access(gpa: int, size: int) -> None:
    """Refuse a guest access beyond the 48-bit guest-physical space as bad input.

    A 4-level EPT translates 48 bits and KVM gives the guest no MAXPHYADDR beyond them,
    so such an access is the guest's own #PF, never a VM exit the model could follow.
    """
    if gpa < 0 or size < 0 or gpa + size > EPT_MAX_GFN << PAGE_SHIFT:
        raise ValueError(f"gpa {gpa:#x}+{size:#x} is beyond the 48-bit guest-physical "
                         "address space: the guest cannot issue this access")


def vcpu_run_refused(vm: Vm) -> Outcome | None:
    """Why KVM_RUN cannot enter the guest, or None: a TD a fatal error killed
    (TDH.VP.ENTER fails with TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE), or a vCPU
    thread whose VMM is dead (its signal, or -ESRCH once the process is gone)."""
    if vm.td_fatal:
        return Outcome.machine_check(None, McKind.TD_FATAL,
                                     "TDH.VP.ENTER: TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE")
    if not vm.vcpu_task.alive:
        if vm.vcpu_task.exit_signal is not None:
            return Outcome.signal(vm.vcpu_task.exit_signal, detail="the VMM is dead")
        return Outcome.error(errno.ESRCH, "the VMM is gone")
    return None


class PfnMap:
    """``DEFINE_XARRAY(kvm_pfn_map)`` (virt/kvm/mem_protected.c, RFCv2 13/13) as an array
    indexed by pfn (-1: no entry); ``kvm->id`` is stored as its plain value, not
    ``xa_mk_value(id)`` (equality is all the RFC uses).

    ``fail_stores`` is fault injection (as CONFIG_FAILSLAB would do): that many
    coming ``xa_store`` calls fail with -ENOMEM, storing nothing.
    """

    NONE = -1

    def __init__(self, nr_pages: int):
        self.owner = np.full(nr_pages, self.NONE, dtype=np.int64)
        self.fail_stores = 0

    def get(self, pfn: int) -> int | None:
        value = int(self.owner[pfn])
        return None if value == self.NONE else value

    def store(self, pfns: npt.NDArray[np.int64] | int, ident: int) -> int:
        """``xa_store``: 0, or -ENOMEM when a failure is injected."""
        if self.fail_stores:
            self.fail_stores -= 1
            return -errno.ENOMEM
        self.owner[pfns] = ident
        return 0

    def erase(self, pfn: int) -> int | None:
        """``xa_erase``: the old entry, or None."""
        old = self.get(pfn)
        self.owner[pfn] = self.NONE
        return old

    def __len__(self) -> int:
        return int(np.count_nonzero(self.owner != self.NONE))


def is_error_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_MASK)


class Protection(enum.Enum):
    """Which version of "unmap guest memory using poisoned pages" a VM runs."""

    NONE = "none"  # upstream KVM: guest memory stays mapped in the VMM
    RFC_V1 = "rfc-v1"  # RFCv1 7/7 (2021-04-02)
    RFC_V2 = "rfc-v2"  # RFCv2 13/13 (2021-04-16)
    GMEM = "gmem"  # upstream's answer (6.18): private memory in guest_memfd, per-gfn attributes
    HARDENED = "hardened"  # a design, not a posting: the RFC with each weakness fixed


@dataclass(eq=False)
class Memslot:
    """``struct kvm_memory_slot``."""

    slot: int
    base_gfn: int
    npages: int
    userspace_addr: int

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def covers(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@dataclass(eq=False)
class Kvm:
    """Module-wide KVM state of one host (the RFC keeps ``kvm_pfn_map`` global)."""

    core: MmCore
    id_bits: int = 63  # the RFC's counter wraps when it goes negative; a model may shrink it
    tdp_enabled: bool = True  # module parameter ept (kvm_intel): False is shadow paging (E27)
    _next_id: int = 0
    vms: list[Vm] = field(default_factory=list)
    kvm_pfn_map: PfnMap = field(init=False)  # the RFC's global xarray: pfn -> kvm->id
    # The hardened design (virt/kvm/hardened.py): pfn -> the owning VM's binding, a
    # number never handed out twice (unlike kvm->id); shmem inode -> binding.
    NO_BINDING = -1
    hardened_owner: npt.NDArray[np.int64] = field(init=False)
    hardened_file_owner: dict[int, int] = field(default_factory=dict)
    _next_binding: int = 1
    hardened_scrubbed: int = 0  # pages scrubbed on free

    def __post_init__(self) -> None:
        self.kvm_pfn_map = PfnMap(self.core.pages.nr_pages)
        self.hardened_owner = np.full(self.core.pages.nr_pages, self.NO_BINDING, dtype=np.int64)

    def create_vm(self, vmm: Task, protection: Protection, td_keyid: int | None = None) -> Vm:
        """``kvm_create_vm``: the RFC assigns ``kvm->id = xa_mk_value(id++)``."""
        assert vmm.mm is not None
        ident = self._next_id
        self._next_id = ident + 1
        if self._next_id >= 1 << self.id_bits:
            self._next_id = 0  # "if (id < 0) id = 0"
        ept = PageTables(PteStore(), self.core.buddy, table_flags=VMX_EPT_RWX_MASK)
        vm = Vm(kvm=self, ident=ident, mm=vmm.mm, vcpu_task=vmm, protection=protection,
                ept=ept, td_keyid=td_keyid,
                gmem=GmemVm() if protection is Protection.GMEM else None)
        if protection is Protection.HARDENED:
            vm.binding = self._next_binding  # a 64-bit count that never wraps in practice
            self._next_binding += 1
            vm.hardened_shared = MemAttrArray()
        vmm.mm.mmu_notifiers.append(vm)
        self.vms.append(vm)
        return vm


@dataclass(eq=False)
class Vm:
    """``struct kvm`` (with the RFC's fields) and its vCPU thread's task."""

    kvm: Kvm
    ident: int
    mm: MmStruct
    vcpu_task: Task
    protection: Protection
    ept: PageTables
    td_keyid: int | None = None  # a TD's private KeyID when the platform has TDX
    memslots: list[Memslot] = field(default_factory=list)
    mem_protected: bool = False
    shared_ranges: list[tuple[int, int]] = field(default_factory=list)  # [gfn, gfn_end)
    dead: bool = False
    create_error: int = 0  # KVM_CREATE_VM refused the VM (-errno as positive): gmem with ept=0
    td_fatal: bool = False
    mmu_lock_faults: int = 0  # faults that took mmu_lock for gfn_is_shared (E40)
    td_pages: set[int] = field(default_factory=set)  # pfns added to the TD (TD-owned lines)
    gmem: GmemVm | None = None  # private-memory state of a 6.18 VM (design gmem)
    # The hardened design (virt/kvm/hardened.py)
    binding: int = -1  # the owner binding of this VM's private pages (never reused)
    hardened_shared: MemAttrArray | None = None  # gfn -> 1 when shared (no range cap)
    hardened_private: dict[int, int] = field(default_factory=dict)  # gfn -> pfn KVM protected
    hardened_exits: list[KvmExit] = field(default_factory=list)  # KVM_EXIT_MEMORY_FAULTs
    hardened_audit: list[tuple[str, int, str]] = field(default_factory=list)  # KVM's accesses

    @property
    def core(self) -> MmCore:
        return self.kvm.core

    def __repr__(self) -> str:
        return f"Vm(id={self.ident}, {self.protection.value}, protected={self.mem_protected})"

    # -- memslots ----------------------------------------------------------------------

    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int) -> int:
        """``KVM_SET_USER_MEMORY_REGION``: 0 or -errno.

        The argument checks of ``__kvm_set_memory_region`` (virt/kvm/kvm_main.c,
        v5.12), then: size 0 deletes the slot (``kvm_delete_memslot``: -EINVAL
        if it does not exist); an existing slot may only move (new base gfn,
        same hva and size: KVM_MR_MOVE zaps the old range), anything else is
        -EINVAL (so is any change of a READONLY or guest_memfd slot, whose flag
        this ioctl's flags 0 would toggle), and the same values again change
        nothing (no zap); a new or moved slot must not overlap another
        (-EEXIST), and on 6.18 must end
        below ``kvm_mmu_max_gfn()`` (host MAXPHYADDR; the model takes the 48 bits
        of its 4-level EPT), where v5.12 accepts any gfn. Simplified: only
        address space 0 exists (no SMM slots) and no slot flags
        (LOG_DIRTY_PAGES, READONLY).
        """
        if not (0 <= slot < 1 << 32 and 0 <= gpa < 1 << 64 and 0 <= size < 1 << 64
                and 0 <= hva < 1 << 64):
            return -errno.EINVAL  # the uapi fields are u32/u64
        if (slot & 0xFFFF) >= KVM_USER_MEM_SLOTS or slot >> 16:
            return -errno.EINVAL
        if gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1) or hva & (PAGE_SIZE - 1):
            return -errno.EINVAL
        if hva + size > TASK_SIZE_MAX or gpa + size >= 1 << 64:  # access_ok; wrap-around
            return -errno.EINVAL
        if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
            return -errno.EINVAL
        base, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        old = next((s for s in self.memslots if s.slot == slot), None)
        others = [s for s in self.memslots if s.slot != slot]
        if not npages:  # kvm_delete_memslot
            if old is None:
                return -errno.EINVAL
            self.zap_gfn_range(old.base_gfn, old.base_gfn + old.npages)
            self.memslots = others
            return 0
        if old is not None:  # modify an existing slot
            # This ioctl's flags are 0: a slot KVM_SET_USER_MEMORY_REGION2 made READONLY
            # (1 << 1) or GUEST_MEMFD (1 << 2) would toggle them, -EINVAL (6.18.y; live).
            if hva != old.userspace_addr or npages != old.npages or \
                    getattr(old, "flags", 0) & ((1 << 1) | (1 << 2)):
                return -errno.EINVAL
            if base == old.base_gfn:
                return 0  # "Nothing to change"
        if any(base < s.base_gfn + s.npages and s.base_gfn < base + npages for s in others):
            return -errno.EEXIST
        if self.core.kcfg.version.tuple >= (5, 19) and base + npages > EPT_MAX_GFN:  # 6.1 too
            return -errno.EINVAL  # 6.x kvm_arch_prepare_memory_region: beyond kvm_mmu_max_gfn()
        new = Memslot(slot, base, npages, hva)
        if self.protection is Protection.HARDENED and old is None:
            from kvmpoison.virt.kvm.hardened import kvm_hardened_bind_memslot
            ret = kvm_hardened_bind_memslot(self, new, others)
            if ret:
                return ret
        if old is not None:  # KVM_MR_MOVE: kvm_arch_flush_shadow_memslot(old)
            self.zap_gfn_range(old.base_gfn, old.base_gfn + old.npages)
        self.memslots = [*others, new]
        return 0

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot`` (``search_memslots``, v5.12): the slot covering ``gfn``."""
        for s in self.memslots:
            if s.covers(gfn):
                return s
        return None

    def gfn_to_hva(self, gfn: int) -> int | None:
        slot = self.gfn_to_memslot(gfn)
        return None if slot is None else slot.gfn_to_hva(gfn)

    # -- MMU notifier --------------------------------------------------------------------

    def invalidate_range(self, start: int, end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_start`` -> ``kvm_unmap_hva_range`` (v5.12):
        zap the SPTEs of every memslot gfn whose hva is in [start, end)."""
        for s in self.memslots:
            lo = max(start, s.userspace_addr)
            hi = min(end, s.userspace_addr + (s.npages << PAGE_SHIFT))
            if lo < hi:
                first = s.base_gfn + ((lo - s.userspace_addr) >> PAGE_SHIFT)
                last = s.base_gfn + ((hi - 1 - s.userspace_addr) >> PAGE_SHIFT) + 1
                self.zap_gfn_range(first, last)

    def release(self) -> None:
        """``kvm_destroy_vm`` -> ``kvm_arch_flush_shadow_all``: every SPTE goes."""
        self.kvm_mmu_zap_all()
        self.dead = True

    def kvm_mmu_zap_all(self) -> None:
        """``kvm_mmu_zap_all`` (arch/x86/kvm/mmu/mmu.c, v5.12), as ``kvm_arch_flush_shadow_all``.

        SPTEs exist only for gfns of memslots (deleting or moving a slot zaps
        its range), so zapping every slot's range zaps everything. Simplified:
        the EPT's table pages stay allocated (KVM frees its shadow pages).
        """
        for s in self.memslots:
            self.zap_gfn_range(s.base_gfn, s.base_gfn + s.npages)

    def zap_gfn_range(self, first: int, last: int) -> None:
        """Clear the SPTEs of gfns [first, last); gfns the 4-level EPT cannot map have none.

        A 2 MiB SPTE that the range touches at all is zapped whole (v5.12
        ``kvm_unmap_rmapp`` on the 2M rmap of each gfn; 6.x TDP MMU
        ``tdp_mmu_zap_leafs``): KVM never splits a huge SPTE on an invalidation,
        the next fault maps again at whatever level the host then allows.
        """
        last = min(last, EPT_MAX_GFN)
        if last <= first:
            return
        if self.ept.nr_pmd_leaves:
            zap_large_sptes(self.ept, first, last)
        if last - first == 1:  # the common single-page invalidation
            if self.ept.get(first << PAGE_SHIFT):
                self.ept.set(first << PAGE_SHIFT, 0)
            return
        store = self.ept.store.rows
        for chunk in self.ept.chunks(first << PAGE_SHIFT, last << PAGE_SHIFT):
            store[chunk.rows, chunk.cols] = 0

    # -- hva_to_pfn ----------------------------------------------------------------------

    def hva_to_pfn(self, hva: int, write: bool) -> int:
        """``hva_to_pfn`` -> ``hva_to_pfn_slow`` (virt/kvm/kvm_main.c, v5.12 + RFCv2 13/13).

        GUP(FOLL_HWPOISON [|FOLL_WRITE]); RFC v2 adds FOLL_ALLOW_POISONED while
        ``mem_protected`` and then returns -EHWPOISON when ``!kvm_page_allowed``
        without ``put_page``: the GUP reference leaks, and the model keeps it.
        -EHWPOISON gives KVM_PFN_ERR_HWPOISON, any other failure
        KVM_PFN_ERR_FAULT. The returned page carries a GUP reference the caller
        drops (none for a pfn without struct page). When GUP fails on a VM_IO or
        VM_PFNMAP VMA (``check_vma_flags``: -EFAULT), ``hva_to_pfn_remapped`` reads
        the pfn from the PTE (E25). Simplified: no GUP-fast first try and no async
        page faults.
        """
        v2_protected = self.protection is Protection.RFC_V2 and self.mem_protected
        flags = _HVA_TO_PFN_FOLL[write, v2_protected]
        pages: list[Page] = []
        npages = get_user_pages(self.mm, hva, 1, flags, pages)
        if npages == 1:
            page = pages[0]
            if v2_protected and not kvm_page_allowed(self, page):
                return KVM_PFN_ERR_HWPOISON  # "return -EHWPOISON;" with the reference held
            return page.pfn
        if npages == -EHWPOISON:
            return KVM_PFN_ERR_HWPOISON
        vma = vma_lookup(self.mm, hva)  # find_vma_intersection(addr, addr + 1)
        if vma is not None and vma.vm_flags & (VM.IO | VM.PFNMAP):
            return hva_to_pfn_remapped(self, vma, hva, write)
        return KVM_PFN_ERR_FAULT

    # -- KVM's own access to guest memory --------------------------------------------------

    def read_guest(self, gpa: int, size: int) -> bytes | int:
        """``kvm_read_guest`` (virt/kvm/kvm_main.c): bytes, or -errno; a gfn outside every
        memslot is -EFAULT (``kvm_is_error_hva``)."""
        return self._guest_rw(gpa, size, None)

    def write_guest(self, gpa: int, data: bytes) -> int:
        """``kvm_write_guest``: 0 or -errno (dirty logging is not modelled)."""
        got = self._guest_rw(gpa, len(data), data)
        return got if isinstance(got, int) else 0

    def _guest_rw(self, gpa: int, size: int, data: bytes | None) -> bytes | int:
        out: list[bytes] = []
        done = 0
        while done < size:
            addr = gpa + done
            n = min(PAGE_SIZE - (addr & (PAGE_SIZE - 1)), size - done)
            hva = self.gfn_to_hva(addr >> PAGE_SHIFT)
            if hva is None:
                return -errno.EFAULT
            hva += addr & (PAGE_SIZE - 1)
            chunk = None if data is None else data[done : done + n]
            if self.protection is Protection.HARDENED and self.mem_protected:
                from kvmpoison.virt.kvm.hardened import (
                    copy_guest_page_hardened,
                    gfn_is_shared_hardened,
                )
                if not gfn_is_shared_hardened(self, addr >> PAGE_SHIFT):
                    got = copy_guest_page_hardened(self, addr, hva, n, chunk)
                    if isinstance(got, int):
                        return got
                    out.append(got)
                    done += n
                    continue
            got = self._copy_guest_page(hva, n, chunk)
            if isinstance(got, int):
                return got
            out.append(got)
            done += n
        return b"".join(out)

    def _copy_guest_page(self, hva: int, n: int, data: bytes | None) -> bytes | int:
        """``__kvm_read_guest_page``/``__kvm_write_guest_page`` (virt/kvm/kvm_main.c).

        v5.12: ``__copy_{from,to}_user`` on the VMM's mapping; any bytes left
        give -EFAULT. On the RFC's kernels (v1 and v2) the read path returns
        ``copy_from_guest()``, which for a VM without ``mem_protected`` is the
        count of bytes ``__copy_from_user`` left: a positive value that
        ``kvm_read_guest`` (``if (ret < 0)``) takes as success. The model
        returns the bytes copied and zeros for the rest (the kernel leaves the
        caller's buffer as it was there).
        """
        if self.protection in (Protection.NONE, Protection.HARDENED) or not self.mem_protected:
            if data is None:
                got, left = copy_from_user(self.mm, self.vcpu_task.cpu, hva, n)
                if left and self.protection in (Protection.NONE, Protection.HARDENED):
                    return -errno.EFAULT
                return got[: n - left].ljust(n, b"\0")
            left = copy_to_user(self.mm, self.vcpu_task.cpu, hva, data)
            return -errno.EFAULT if left else b""
        return copy_guest_page_rfc(self, hva, n, data)


def zap_large_sptes(ept: PageTables, first: int, last: int) -> int:
    """Clear every 2 MiB leaf SPTE overlapping gfns [first, last); returns how many."""
    leaves = ept.pmd_leaves(first << PAGE_SHIFT, last << PAGE_SHIFT)
    for addr, _raw in leaves:
        ept.set_pmd(addr, 0)
    return len(leaves)


PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3  # enum pg_level (asm/pgtable_types.h)
_SUBPAGE = (1 << (PMD_SHIFT - PAGE_SHIFT)) - 1


def ept_spte(ept: PageTables, gpa: int) -> tuple[int, int]:
    """(raw leaf SPTE, level) the EPT maps ``gpa`` with: a 4K SPTE at PG_LEVEL_4K, a
    2M one (PT_PAGE_SIZE_MASK) at PG_LEVEL_2M; (0, PG_LEVEL_4K) when none."""
    if ept.nr_pmd_leaves:
        leaf = ept.pmd_leaf(gpa)
        if leaf & PT_PAGE_SIZE_MASK:
            return leaf, PG_LEVEL_2M
    return ept.get(gpa & ~(PAGE_SIZE - 1)), PG_LEVEL_4K


def ept_spte_4k(ept: PageTables, gpa: int) -> int:
    """The SPTE that translates the 4 KiB of ``gpa``, as a 4K leaf would read: a 2M
    SPTE's pfn plus ``gpa``'s index inside it (its PT_PAGE_SIZE_MASK is kept)."""
    raw, level = ept_spte(ept, gpa)
    if level == PG_LEVEL_2M:
        return raw + (((gpa >> PAGE_SHIFT) & _SUBPAGE) << PAGE_SHIFT)
    return raw


# hva_to_pfn's GUP flags by (write, v2 mem_protected): FOLL_HWPOISON [| FOLL_WRITE]
# [| FOLL_ALLOW_POISONED], built once (IntFlag arithmetic is slow on this path).
_HVA_TO_PFN_FOLL = {(w, p): FOLL.HWPOISON | (FOLL.WRITE if w else FOLL(0))
                    | (FOLL.ALLOW_POISONED if p else FOLL(0))
                    for w in (False, True) for p in (False, True)}


def hva_to_pfn_remapped(vm: Vm, vma: Vma, hva: int, write: bool) -> int:
    """``hva_to_pfn_remapped`` (virt/kvm/kvm_main.c, v5.12): the pfn of a VM_IO/VM_PFNMAP
    mapping, read from the PTE with ``follow_pte``.

    A missing PTE gets one ``fixup_user_fault`` (``handle_mm_fault``) and a second
    ``follow_pte``; a write to a read-only PTE is KVM_PFN_ERR_RO_FAULT. Then
    ``kvm_get_pfn``: a reference only for a pfn that is not reserved
    (``kvm_is_reserved_pfn``): a pfn without struct page gets none.
    """
    pte = vm.mm.pgd.get(hva)
    if not pte_present(pte):
        flags = FaultFlag.WRITE if write else FaultFlag(0)
        if handle_mm_fault(vma, hva, flags | FaultFlag.REMOTE) & VM_FAULT_ERROR:
            return KVM_PFN_ERR_FAULT  # fixup_user_fault: -EFAULT (a PFNMAP VMA has no ->fault)
        pte = vm.mm.pgd.get(hva)
        if not pte_present(pte):
            return KVM_PFN_ERR_FAULT
    if write and not pte & _PAGE_RW:
        return KVM_PFN_ERR_RO_FAULT
    pfn = pte_pfn(pte)
    if not kvm_is_reserved_pfn(vm, pfn):
        get_page(vm.core.pages[pfn])  # kvm_get_pfn
    return pfn


def kvm_is_reserved_pfn(vm: Vm, pfn: int) -> bool:
    """``kvm_is_reserved_pfn`` (virt/kvm/kvm_main.c, v5.12): a pfn without struct page
    (``!pfn_valid``), or a PageReserved page other than the zero page, is not
    reference-counted by KVM. ZONE_DEVICE is not modelled."""
    if pfn_valid(vm.core, pfn):
        return bool(PageFlag(vm.core.pages[pfn], PG.reserved)) and pfn != vm.core.zero_pfn
    return True


def kvm_pfn_to_refcounted_page(vm: Vm, pfn: int) -> Page | None:
    """The struct page KVM holds a reference on for ``pfn``, or None for a reserved pfn
    (``kvm_release_pfn_clean`` then puts nothing: virt/kvm/kvm_main.c, v5.12)."""
    return None if kvm_is_reserved_pfn(vm, pfn) else vm.core.pages[pfn]


def kvm_page_allowed(vm: Vm, page: Page) -> bool:
    """``kvm_page_allowed`` (virt/kvm/mem_protected.c, RFCv2 13/13): a poisoned page is
    usable only by the VM whose ``kvm->id`` ``kvm_pfn_map`` holds for it."""
    if not PageHWPoison(page):
        return True
    return vm.kvm.kvm_pfn_map.get(page.pfn) == vm.ident


def copy_guest_page_rfc(vm: Vm, hva: int, n: int, data: bytes | None) -> bytes | int:
    """``copy_from_guest``/``copy_to_guest`` (virt/kvm/kvm_main.c, RFC v1 7/7 and v2 13/13).

    Per page: ``get_user_pages_unlocked`` (v2: FOLL_ALLOW_POISONED [|FOLL_WRITE];
    v1: 0 or FOLL_WRITE, its GUP follows hwpoison entries anyway), v2's
    ``kvm_page_allowed`` check (-EFAULT, returned before ``put_page``: the
    reference leaks), ``kmap_atomic`` + ``memcpy``, ``put_page``. A poisoned
    line under ``memcpy`` is a kernel-mode consumption: a panic.
    """
    flags = FOLL.ALLOW_POISONED if vm.protection is Protection.RFC_V2 else FOLL(0)
    if data is not None:
        flags |= FOLL.WRITE
    pages: list[Page] = []
    if get_user_pages(vm.mm, hva & ~(PAGE_SIZE - 1), 1, flags, pages) != 1:
        return -errno.EFAULT
    page = pages[0]
    if vm.protection is Protection.RFC_V2 and not kvm_page_allowed(vm, page):
        return -errno.EFAULT  # "return -EFAULT;" before put_page(): the reference leaks
    try:
        return copy_through_direct_map(vm, page.pfn, hva, n, data)
    finally:
        put_page(page)


def copy_through_direct_map(vm: Vm, pfn: int, hva: int, n: int, data: bytes | None) -> bytes:
    """``kmap_atomic`` + ``memcpy`` of the pinned page ``pfn`` at ``hva``'s offset through
    the direct map (as host kernel, KeyID 0): writes ``data`` (returns b"") or reads ``n``
    bytes; a poisoned line is a kernel-mode consumption, raised as a Halt (a panic)."""
    pa = (pfn << PAGE_SHIFT) | (hva & (PAGE_SIZE - 1))
    hw = vm.core.hw
    if data is not None:
        hw.write(pa, data, 0)
        return b""
    got = hw.load(pa, n, 0, Ctx.HOST_KERNEL)
    if got.kind is not Kind.OK:
        raise Halt(got)
    assert got.data is not None
    return got.data


def kvm_send_hwpoison_signal(vm: Vm, hva: int) -> SigInfo:
    """``kvm_send_hwpoison_signal`` (arch/x86/kvm/mmu/mmu.c, v5.12):
    ``send_sig_mceerr(BUS_MCEERR_AR, hva, PAGE_SHIFT, current)`` to the vCPU thread.

    Simplified: delivered with force semantics (the model has no blocked or
    ignored signals; QEMU handles SIGBUS anyway).
    """
    info = SigInfo(signal.SIGBUS, BusCode.BUS_MCEERR_AR, hva & ~(PAGE_SIZE - 1), PAGE_SHIFT)
    force_sig_info(vm.vcpu_task, info)
    return info
