"""hwpoison entries, GUP, memory_failure and unpoison on the host mm (v5.12 and v6.18)."""

import errno
import signal

import numpy as np
import pytest

from helpers import PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.kconfig import RFC_BASE, KernelConfig, KernelVersion
from kvmpoison.mm.gup import FOLL, get_user_pages
from kvmpoison.mm.madvise import MADV_HWPOISON, MADV_SOFT_OFFLINE
from kvmpoison.mm.memory_failure import (
    MF_ACTION_REQUIRED,
    MF_COUNT_INCREASED,
    memory_failure,
    soft_offline_page,
    unpoison_memory,
)
from kvmpoison.mm.mmap import MAP_SHARED, PROT_NONE
from kvmpoison.mm.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from kvmpoison.mm.page import (
    Page,
    PageHWPoison,
    TestSetPageHWPoison,
    lock_page,
    page_count,
    unlock_page,
)
from kvmpoison.mm.ptdump import decode
from kvmpoison.mm.rmap import TTU, try_to_unmap
from kvmpoison.uapi.errno import EHWPOISON
from kvmpoison.uapi.siginfo import BusCode

V6_18_MF = KernelConfig(version=KernelVersion.V6_18, memory_failure=True)


def poison_and_unmap(page: Page) -> bool:
    lock_page(page)
    assert not TestSetPageHWPoison(page)
    done = try_to_unmap(page, TTU.IGNORE_MLOCK)
    unlock_page(page)
    return done


def shared_memfd(kernel, *procs, pages: int = 2):  # type: ignore[no-untyped-def]
    first = procs[0]
    fd = ok(first.memfd_create("guest"))
    ok(first.ftruncate(fd, pages * PAGE))
    addrs = []
    for p in procs:
        pfd = fd if p is first else p.install(first.task.fds[fd])
        addrs.append(ok(p.mmap(0, pages * PAGE, RW, MAP_SHARED, pfd)))
    return fd, addrs


def test_try_to_unmap_installs_hwpoison_entries_in_every_mm() -> None:
    k = boot(RFC_BASE)
    qemu, vhost = proc(k, "qemu"), proc(k, "vhost")
    _, (va, vb) = shared_memfd(k, qemu, vhost)
    ok(qemu.store(va, b"secret"))
    assert vhost.load(vb, 6).data == b"secret"
    page = k.core.pages[pte_pfn(qemu.mm.pgd.get(va))]
    assert poison_and_unmap(page)
    for p, addr in ((qemu, va), (vhost, vb)):
        dec = decode(p.mm.pgd.get(addr), k.kcfg)
        assert dec.kind == "hwpoison"
        assert {f.name: f.value for f in dec.fields}["hwpoison_pfn"] == hex(page.pfn)
    assert page_count(page) == 1  # only the page cache: upstream entries hold no reference
    out = qemu.load(va + 5, 1)
    assert out.cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert out.siginfo is not None and out.siginfo.addr == va + 5 and out.siginfo.addr_lsb == 12
    assert not qemu.task.alive and qemu.task.exit_signal == out.siginfo


def test_gup_on_a_hwpoison_entry() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 2, fill=1)
    page = k.core.pages[pte_pfn(p.mm.pgd.get(addr + PAGE))]
    assert poison_and_unmap(page)
    assert get_user_pages(p.mm, addr + PAGE, 1, FOLL(0)) == -errno.EFAULT
    assert get_user_pages(p.mm, addr + PAGE, 1, FOLL.HWPOISON) == -EHWPOISON
    pages: list[Page] = []
    assert get_user_pages(p.mm, addr, 2, FOLL(0), pages) == 1  # partial count
    attacker = proc(k)
    buf = anon(attacker, 1, 0)
    assert attacker.process_vm_readv(p, buf, addr + PAGE, 8).cell == "err:EFAULT"
    assert attacker.process_vm_readv(p, buf, addr + PAGE - 16, 32).cell == "ret:16"
    fd = ok(attacker.open_proc_mem(p, 2))
    assert attacker.pread(fd, buf, 8, addr + PAGE).cell == "err:EIO"
    assert attacker.ptrace_peekdata(p, addr + PAGE).cell == "err:EIO"
    _r, w = p.pipe()
    assert p.write(w, addr + PAGE, 8).cell == "err:EFAULT"  # kernel copy: no signal
    assert p.task.alive


def test_fork_copies_the_entry_mremap_marks_it_soft_dirty_mprotect_keeps_it() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=1)
    page = k.core.pages[pte_pfn(p.mm.pgd.get(addr))]
    assert poison_and_unmap(page)
    raw = p.mm.pgd.get(addr)
    child = p.fork()
    assert child.mm.pgd.get(addr) == raw
    assert child.load(addr, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    ok(p.mprotect(addr, PAGE, PROT_NONE))
    assert p.mm.pgd.get(addr) == raw
    ok(p.mprotect(addr, PAGE, RW))
    target = anon(p, 2)
    new = ok(p.mremap(addr, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, target))
    assert new == target
    assert p.mm.pgd.get(new) == raw | 0b10  # _PAGE_SWP_SOFT_DIRTY, same entry
    assert decode(raw | 0b10, k.kcfg).kind == "hwpoison"
    ok(p.munmap(new, 2 * PAGE))
    assert p.mm.pgd.get(new) == 0


def test_memory_failure_late_kill_then_action_required_on_touch() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=0x77)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert memory_failure(k.core, pfn, 0) == 0
    assert p.task.alive and not p.task.pending  # late kill: nothing sent yet
    assert k.core.num_poisoned_pages == 1 and PageHWPoison(k.core.pages[pfn])
    assert p.load(addr, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert memory_failure(k.core, pfn, 0) == 0  # v5.12: already poisoned is 0


def test_memory_failure_early_kill_sends_action_optional() -> None:
    k = boot(RFC_BASE)
    k.core.sysctl_memory_failure_early_kill = True
    p = proc(k)
    addr = anon(p, 1, fill=0x77)
    assert memory_failure(k.core, pte_pfn(p.mm.pgd.get(addr)), 0) == 0
    sig = p.task.exit_signal
    assert sig is not None and sig.signo == signal.SIGBUS
    assert sig.code == BusCode.BUS_MCEERR_AO and sig.addr == addr and sig.addr_lsb == 12


def test_already_poisoned_is_ehwpoison_from_v5_13() -> None:
    k = boot(V6_18_MF)
    p = proc(k)
    addr = anon(p, 1, fill=1)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert memory_failure(k.core, pfn, 0x20) == 0  # MF_SW_SIMULATED
    assert memory_failure(k.core, pfn, 0x20) == -EHWPOISON


def test_dirty_file_page_sets_as_eio_reported_once_per_file() -> None:
    k = boot(RFC_BASE)
    k.create_file("/f", b"\x01" * PAGE)
    p = proc(k)
    fd = ok(p.open("/f", 2))
    addr = ok(p.mmap(0, PAGE, RW, MAP_SHARED, fd))
    ok(p.store(addr, b"\x02"))  # dirty the cached page
    assert memory_failure(k.core, pte_pfn(p.mm.pgd.get(addr)), 0) == 0
    assert p.fsync(fd).cell == "err:EIO"
    assert p.fsync(fd).cell == "ret:0"
    fd2 = ok(p.open("/f", 2))
    assert p.fsync(fd2).cell == "ret:0"  # opened after the error was seen: errseq sample
    assert p.load(addr, 1).cell == "sig:SIGBUS:BUS_MCEERR_AR"


@pytest.mark.parametrize(("kcfg", "after"), [(RFC_BASE, "ret:8"), (V6_18_MF, "err:EIO")])
def test_shmem_poisoned_page_truncated_before_5_16_kept_with_eio_after(kcfg, after) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    p = proc(k)
    fd, (addr,) = shared_memfd(k, p, pages=1)
    ok(p.store(addr, b"\x09" * 8))
    ok(p.munmap(addr, PAGE))
    buf = anon(p, 1, 0)
    pfn = int(p.task.fds[fd].f_mapping.lookup(0))  # type: ignore[union-attr, arg-type]
    assert memory_failure(k.core, pfn, 0) == 0
    out = p.pread(fd, buf, 8, 0)
    assert out.cell == after
    if after == "ret:8":
        assert p.load(buf, 8).data == bytes(8)  # silently a hole of zeros


def test_unpoison_refuses_referenced_pages_and_leaves_entries() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    _fd, (addr,) = shared_memfd(k, p, pages=1)
    ok(p.store(addr, b"x"))
    page = k.core.pages[pte_pfn(p.mm.pgd.get(addr))]
    pins: list[Page] = []
    get_user_pages(p.mm, addr, 1, FOLL(0), pins)
    assert poison_and_unmap(page)
    assert unpoison_memory(k.core, page.pfn) == 0 and PageHWPoison(page)  # refused: refs
    anon_addr = anon(p, 1, fill=3)
    apage = k.core.pages[pte_pfn(p.mm.pgd.get(anon_addr))]
    assert poison_and_unmap(apage) and page_count(apage) == 0  # entry holds no ref
    assert unpoison_memory(k.core, apage.pfn) == 0 and not PageHWPoison(apage)
    assert decode(p.mm.pgd.get(anon_addr), k.kcfg).kind == "hwpoison"  # stale entry stays
    assert pins


def test_madv_hwpoison_only_with_memory_failure() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=5)
    assert p.madvise(addr, PAGE, MADV_HWPOISON).cell == "ret:0"
    assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "hwpoison"
    assert p.madvise(addr, PAGE, MADV_HWPOISON).cell == "err:EFAULT"  # GUP now fails
    k2 = boot(KernelConfig(version=KernelVersion.V6_18, memory_failure=False))
    q = proc(k2)
    addr = anon(q, 1, fill=5)
    assert q.madvise(addr, PAGE, MADV_HWPOISON).cell == "err:EINVAL"


def test_soft_offline_takes_an_already_poisoned_page_as_retired() -> None:
    """E16: 0 and no change, though the page is still mapped by a hwpoison entry."""
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=3)
    page = k.core.pages[pte_pfn(p.mm.pgd.get(addr))]
    poison_and_unmap(page)
    refs, poisoned = page_count(page), k.core.num_poisoned_pages
    assert soft_offline_page(k.core, page.pfn, 0) == 0
    assert page_count(page) == refs and k.core.num_poisoned_pages == poisoned
    assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "hwpoison"


def test_soft_offline_poisons_a_free_page_and_refuses_an_in_use_one() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=3)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert soft_offline_page(k.core, pfn, 0) == -errno.EBUSY  # no migration in the model
    assert not PageHWPoison(k.core.pages[pfn])
    ok(p.munmap(addr, PAGE))
    assert page_count(k.core.pages[pfn]) == 0
    assert soft_offline_page(k.core, pfn, 0) == 0
    assert PageHWPoison(k.core.pages[pfn]) and k.core.num_poisoned_pages == 1


def test_madv_soft_offline_does_not_hard_poison() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=5)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    refs = page_count(k.core.pages[pfn])
    assert p.madvise(addr, PAGE, MADV_SOFT_OFFLINE).cell == "err:EBUSY"
    assert not PageHWPoison(k.core.pages[pfn]) and page_count(k.core.pages[pfn]) == refs
    assert p.load(addr, 1).data == bytes([5])


def test_memory_failure_on_poisoned_page_v5_12_returns_0_and_sends_nothing() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=1)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert memory_failure(k.core, pfn, 0) == 0
    assert memory_failure(k.core, pfn, MF_ACTION_REQUIRED, current_pid=p.pid) == 0
    assert p.task.pending == [] and p.task.alive  # nothing: the consumer re-runs the access


def test_memory_failure_on_poisoned_page_6_18_kills_the_accessing_process() -> None:
    k = boot(V6_18_MF)
    p, other = proc(k), proc(k, "other")
    anon(p, 1, fill=0)  # a lower mapping that does not hold the page
    addr = anon(p, 1, fill=1)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert memory_failure(k.core, pfn, 0) == 0  # late kill: only a hwpoison entry
    assert decode(p.mm.pgd.get(addr), k.kcfg).kind == "hwpoison"
    assert memory_failure(k.core, pfn, 0, current_pid=p.pid) == -EHWPOISON
    assert p.task.pending == []  # not action-required: no walk, no signal
    assert memory_failure(k.core, pfn, MF_ACTION_REQUIRED, current_pid=other.pid) == 0
    assert other.task.pending == []  # kill_accessing_process found no mapping of the pfn
    assert memory_failure(k.core, pfn, MF_ACTION_REQUIRED) == -errno.EFAULT  # no current mm
    assert memory_failure(k.core, pfn, MF_ACTION_REQUIRED, current_pid=p.pid) == -EHWPOISON
    (info,) = p.task.pending
    assert (info.signo, info.code, info.addr, info.addr_lsb) == \
        (signal.SIGBUS, BusCode.BUS_MCEERR_AR, addr, 12)
    assert not p.task.alive


@pytest.mark.parametrize(("kcfg", "dropped"), [(RFC_BASE, 0), (V6_18_MF, 1)])
def test_memory_failure_on_poisoned_page_count_increased(kcfg, dropped) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    p = proc(k)
    addr = anon(p, 1, fill=1)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    page = k.core.pages[pfn]
    assert memory_failure(k.core, pfn, 0) == 0
    before = page_count(page)
    page.mem._refcount[pfn] += 1  # the caller's reference (madvise_inject_error's GUP)
    memory_failure(k.core, pfn, MF_COUNT_INCREASED)
    assert page_count(page) == before + 1 - dropped  # 6.18 puts it; v5.12 leaks it


@pytest.mark.parametrize(("kcfg", "killed"), [(RFC_BASE, False), (V6_18_MF, True)])
def test_madv_hwpoison_kills_its_caller_early_from_6_x(kcfg, killed) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    p = proc(k)
    addr = anon(p, 1, fill=5)  # dirty
    assert p.madvise(addr, PAGE, MADV_HWPOISON).cell == "ret:0"
    sigs = [(i.signo, i.code, i.addr) for i in p.task.pending]
    assert sigs == ([(signal.SIGBUS, BusCode.BUS_MCEERR_AR, addr)] if killed else [])
    assert p.task.alive is not killed


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18_MF])
def test_free_page_taken_off_buddy_with_a_reference_and_given_back_by_unpoison(kcfg) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    page = k.core.buddy.alloc_pages(0)
    assert page is not None
    pfn = page.pfn
    k.core.pages._refcount[pfn] = 0
    k.core.buddy.free_pages_bulk(np.array([pfn], dtype=np.int64))
    free = k.core.buddy.nr_free
    assert memory_failure(k.core, pfn, 0x20) == 0  # MF_SW_SIMULATED: unpoison stays allowed
    assert page_count(page) == 1 and k.core.buddy.nr_free == free - 1  # page_ref_inc
    assert unpoison_memory(k.core, pfn) == 0
    assert not PageHWPoison(page) and page_count(page) == 0 and k.core.buddy.nr_free == free


@pytest.mark.parametrize(("kcfg", "ret"), [(RFC_BASE, 0), (V6_18_MF, -16)])
def test_pinned_page_cache_page_is_still_referenced_from_5_16(kcfg, ret) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    p = proc(k)
    _fd, (addr,) = shared_memfd(k, p, pages=1)
    ok(p.store(addr, b"\x01"))
    pins: list[Page] = []
    assert get_user_pages(p.mm, addr, 1, FOLL(0), pins) == 1  # an extra reference
    pfn = pte_pfn(p.mm.pgd.get(addr))
    assert memory_failure(k.core, pfn, 0) == ret  # 6.18: has_extra_refcount -> -EBUSY


def test_user_consumption_of_a_dirty_page_gets_one_sigbus() -> None:
    k = boot(RFC_BASE)
    p = proc(k)
    addr = anon(p, 1, fill=1)
    pfn = pte_pfn(p.mm.pgd.get(addr))
    k.core.hw.inject_dram_error(pfn << 12)
    assert p.load(addr, 8).cell == "sig:SIGBUS:BUS_MCEERR_AR"
    assert len(p.task.pending) == 1  # memory_failure's kill_proc; kill_me_maybe adds nothing


@pytest.mark.parametrize("kcfg", [RFC_BASE, V6_18_MF])
def test_user_consumption_of_a_clean_file_page_refaults_from_disk(kcfg) -> None:  # type: ignore[no-untyped-def]
    k = boot(kcfg)
    k.create_file("/f", b"\x05" * PAGE)
    p = proc(k)
    fd = ok(p.open("/f", 0))
    addr = ok(p.mmap(0, PAGE, 0x1, MAP_SHARED, fd))
    assert p.load(addr, 1).data == b"\x05"
    k.core.hw.inject_dram_error(pte_pfn(p.mm.pgd.get(addr)) << 12)
    out = p.load(addr, 1)  # the clean page is dropped; the re-run reads the file again
    assert out.data == b"\x05" and p.task.pending == [] and p.task.alive


@pytest.mark.parametrize(("kernel", "first"), [("5.12", "err:EIO"), ("6.1", "err:EIO"),
                                               ("6.18", "ret:0")])
def test_ext4_punch_hole_reports_the_poisoned_dirty_page_once_before_6_14(
        kernel: str, first: str) -> None:
    """Seen live in Debian's 6.1 (run --live --kernel debian-6.1): after memory_failure of a
    dirty page of an ext4 file, a punch-hole fails with -EIO while another page is dirty
    (ext4_punch_hole's filemap_write_and_wait_range -> filemap_check_errors, until v6.14)."""
    from kvmpoison.scenario.loader import load_text
    from kvmpoison.scenario.runner import run_scenario

    def step(op: str, **f: object) -> str:
        actor = "host" if op == "memory_failure" else "vmm:vm0"
        body = "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                       for k, v in f.items())
        return f'[[step]]\nactor = "{actor}"\nop = "{op}"\n{body}'

    text = (f'[scenario]\ndesigns = "baseline"\n[machine]\nintegrity = "off"\n'
            f'kernel = "{kernel}"\nmemory_failure = true\n[[vm]]\nname = "vm0"\n'
            'backing = "file"\n'
            + step("store", gpa=0x30000, data="poisoned") + step("store", gpa=0x31000, data="dirty")
            + step("memory_failure", vm="vm0", gpa=0x30000)
            + step("punch_hole", gpa=0x30000) + step("punch_hole", gpa=0x30000)
            + step("load", gpa=0x30000))
    run = run_scenario(load_text(text, "t.toml"), "baseline")
    cells = [r.outcome.cell for r in run.results]
    # the second punch succeeds: filemap_check_errors cleared AS_EIO
    assert cells == ["ok", "ok", "ret:0", first, "ret:0", "sig:SIGBUS:BUS_MCEERR_AR"]
