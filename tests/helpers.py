"""Small builders shared by the mm tests."""

from __future__ import annotations

from typing import TypeVar

from kvmpoison.arch.x86.integrity import IntegrityMode, PlatformConfig
from kvmpoison.kconfig import RFC_BASE, KernelConfig
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.process import Process
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED
from kvmpoison.outcome import Outcome

T = TypeVar("T")

PAGE = 4096
RW = 0x3
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHARED = MAP_SHARED


def boot(kcfg: KernelConfig = RFC_BASE, mem: int = 64 << 20) -> Kernel:
    return Kernel.boot(kcfg, PlatformConfig(mem_bytes=mem, integrity=IntegrityMode.OFF))


def proc(kernel: Kernel, comm: str = "p") -> Process:
    return Process.spawn(kernel, comm)


def some(value: T | None) -> T:
    """``value``, which the test expects to be there (mypy: not None)."""
    assert value is not None
    return value


def ok(out: Outcome) -> int:
    assert out.succeeded, out
    return out.value or 0


def anon(p: Process, pages: int = 1, fill: int | None = None) -> int:
    addr = ok(p.mmap(0, pages * PAGE, RW, ANON))
    if fill is not None:
        ok(p.store(addr, bytes([fill]) * pages * PAGE))
    return addr


def cached(p: Process, fd: int | None, index: int) -> int | None:
    """The pfn the page cache of ``p``'s file ``fd`` holds at ``index``, or None."""
    assert fd is not None
    mapping = p.task.fds[fd].f_mapping
    assert mapping is not None
    return mapping.lookup(index)
