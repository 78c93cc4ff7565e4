"""generic_perform_write with a user buffer that runs into an unmapped page (v5.12 vs 6.18)."""

from __future__ import annotations

import pytest

from helpers import ANON, PAGE, RW, boot, ok, proc
from kvmpoison.kconfig import RFC_BASE, THIS_MACHINE, KernelConfig
from kvmpoison.mm.file import O_RDWR
from kvmpoison.mm.mmap import MAP_FIXED


@pytest.mark.parametrize("kind", ["memfd", "file"])
@pytest.mark.parametrize(("kcfg", "cell", "size"), [(RFC_BASE, "err:EFAULT", 0),
                                                    (THIS_MACHINE, "ret:100", 100)])
def test_write_straddling_an_unmapped_page(kind: str, kcfg: KernelConfig, cell: str,
                                           size: int) -> None:
    k = boot(kcfg)
    p = proc(k)
    if kind == "memfd":
        fd = ok(p.memfd_create("m"))
    else:
        k.create_file("/f")
        fd = ok(p.open("/f", O_RDWR))
    buf = ok(p.mmap(0x4000_0000, PAGE, RW, ANON | MAP_FIXED))  # nothing mapped above it
    ok(p.store(buf + PAGE - 100, b"w" * 100))
    assert p.write(fd, buf + PAGE - 100, 200).cell == cell
    assert p.task.fds[fd].f_inode.i_size == size
