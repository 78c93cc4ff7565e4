"""The host kernel: mm core, tasks, a file namespace, fork/exit and signal delivery.

One :class:`Kernel` per modelled machine. Syscalls are the methods of
:class:`kvmpoison.kernel.process.Process`, which drives a user process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

from kvmpoison.arch.x86.integrity import PlatformConfig
from kvmpoison.fs.pipe import Pipe, free_pipe_info
from kvmpoison.kconfig import KernelConfig
from kvmpoison.kernel.task import Task, force_sig_info
from kvmpoison.mm.core import MmCore
from kvmpoison.mm.file import AddressSpace, File, Inode
from kvmpoison.mm.memory_failure import wire_memory_failure
from kvmpoison.mm.mmap import dup_mmap, exit_mmap
from kvmpoison.outcome import Outcome
from kvmpoison.uapi.siginfo import SigInfo

GuestMemfdCreate = Callable[[object, int, int], "File | int"]
"""(vm, size, flags) -> a guest_memfd file or -errno."""


class ForkError(Exception):
    """fork(2) returned -errno (``copy_process`` failed; no child exists)."""

    def __init__(self, err: int):
        super().__init__(f"fork: -{err}")
        self.errno = err


@dataclass(eq=False)
class Kernel:
    """The host kernel.

    Higher layers plug their syscalls and ioctls in at boot, as mm's hook
    points do, so kernel/ never imports virt/: ``kvm_create_guest_memfd`` is
    set by ``virt.kvm.guest_memfd.kvm_gmem_init``.
    """

    core: MmCore
    seed: int = 0
    tasks: dict[int, Task] = field(default_factory=dict)
    files: dict[str, Inode] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    _pids: count[int] = field(default_factory=lambda: count(100))
    _inos: count[int] = field(default_factory=lambda: count(1))
    kvm_create_guest_memfd: GuestMemfdCreate | None = None

    @classmethod
    def boot(cls, kcfg: KernelConfig, platform: PlatformConfig, seed: int = 0) -> Kernel:
        core = MmCore.boot(kcfg, platform)
        kernel = cls(core=core, seed=seed, rng=random.Random(seed))
        core.send_signal = kernel.send_signal
        wire_memory_failure(core)
        return kernel

    @property
    def halted(self) -> Outcome | None:
        """Set once the host panicked or shut down."""
        return self.core.halted

    @property
    def kcfg(self) -> KernelConfig:
        return self.core.kcfg

    def next_ino(self) -> int:
        return next(self._inos)

    # -- processes ---------------------------------------------------------------

    def spawn(self, comm: str) -> Task:
        pid = next(self._pids)
        mm = self.core.mm_alloc(owner_pid=pid)
        task = Task(pid=pid, comm=comm, mm=mm, cpu=self.core.cpus[pid % len(self.core.cpus)])
        self.tasks[pid] = task
        return task

    def fork(self, parent: Task) -> Task:
        """``copy_process`` with a copied mm (no CLONE_VM)."""
        assert parent.mm is not None
        child = self.spawn(parent.comm)
        assert child.mm is not None
        ret = dup_mmap(child.mm, parent.mm)
        if ret:  # copy_process: bad_fork_cleanup_mm, the child never runs
            self.exit(child)
            raise ForkError(-ret)
        child.fds = dict(parent.fds)
        child.parent = parent
        child.handled = parent.handled  # signal handlers survive fork
        return child

    def exit(self, task: Task) -> None:
        """``do_exit`` for a single-threaded task: ``exit_mmap``, close every fd, mark dead."""
        if task.mm is not None:
            exit_mmap(task.mm)
            task.mm = None
        files = list(task.fds.values())
        task.fds.clear()
        task.alive = False
        # pipe_release: a pipe no other task still has open goes (the model counts no f_count).
        for pipe in {id(f.private_data): f.private_data for f in files
                     if isinstance(f.private_data, Pipe)}.values():
            if not any(f.private_data is pipe for t in self.tasks.values()
                       for f in t.fds.values()):
                free_pipe_info(pipe)

    def send_signal(self, pid: int, info: SigInfo) -> None:
        """Deliver ``info`` to ``pid`` (mm's signal hook: memory_failure's kill_proc)."""
        task = self.tasks.get(pid)
        if task is not None:
            force_sig_info(task, info)

    # -- a tiny file namespace -----------------------------------------------------

    def create_file(self, path: str, data: bytes = b"") -> Inode:
        """A regular file on the block filesystem, with ``data`` already on disk."""
        inode = Inode(ino=self.next_ino(), kind="file", i_size=len(data))
        inode.mapping = AddressSpace(inode, self.core.pages)
        for i in range(0, len(data), 4096):
            inode.disk[i // 4096] = data[i : i + 4096].ljust(4096, b"\0")
        self.files[path] = inode
        return inode
