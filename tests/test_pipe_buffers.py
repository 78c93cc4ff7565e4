"""Pipe buffers (fs/pipe.c, fs/splice.c v5.12): vmsplice queues page references, writes merge."""

from __future__ import annotations

from helpers import ANON, PAGE, RW, anon, boot, ok, proc
from kvmpoison.arch.x86.pgtable import pte_pfn
from kvmpoison.fs.pipe import Pipe
from kvmpoison.mm.mmap import MAP_FIXED
from kvmpoison.mm.page import page_count


def test_vmsplice_references_the_page_so_later_stores_are_seen() -> None:
    p = proc(boot())
    r, w = p.pipe()
    src = anon(p, 1, fill=1)
    refs = page_count(p.kernel.core.pages[pte_pfn(p.mm.pgd.get(src))])
    assert p.vmsplice_to_pipe(w, src, 8).cell == "ret:8"
    page = p.kernel.core.pages[pte_pfn(p.mm.pgd.get(src))]
    assert page_count(page) == refs + 1  # the pipe buffer holds the page
    ok(p.store(src, b"\x02" * 8))
    dst = anon(p, 1, fill=0)
    assert p.read(r, dst, 8).cell == "ret:8"
    assert p.load(dst, 8).data == b"\x02" * 8  # the bytes as they were at read time
    assert page_count(page) == refs


def test_vmsplice_to_user_keeps_a_buffer_whose_copy_faults() -> None:
    p = proc(boot())
    r, w = p.pipe()
    buf = anon(p, 1, fill=3)
    ok(p.write(w, buf, 100))
    ok(p.vmsplice_to_pipe(w, buf, 50))  # a second buffer (page reference, not merged)
    dst = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))
    assert p.vmsplice_to_user(r, dst + PAGE - 120, 150).cell == "ret:100"  # first buffer only
    pipe = p.task.fds[r].private_data
    assert isinstance(pipe, Pipe) and [b.len for b in pipe.bufs] == [50]


def test_small_writes_merge_into_the_last_buffer() -> None:
    p = proc(boot())
    r, w = p.pipe()
    buf = anon(p, 2, fill=4)
    ok(p.write(w, buf, 100))
    ok(p.write(w, buf, 5000))  # 904 merged, then one page buffer
    pipe = p.task.fds[r].private_data
    assert isinstance(pipe, Pipe) and [b.len for b in pipe.bufs] == [1004, 4096]


def test_a_full_pipe_takes_no_more_buffers() -> None:
    p = proc(boot())
    _, w = p.pipe()
    buf = anon(p, 1, fill=5)
    for _ in range(16):
        ok(p.vmsplice_to_pipe(w, buf, 10))
    assert p.write(w, buf, 10).cell == "err:EAGAIN"  # 16 buffers, none mergeable
    assert p.vmsplice_to_pipe(w, buf, 10).cell == "err:EAGAIN"
