"""A user process: its loads and stores, and the syscalls the model offers.

Every method returns an :class:`~kvmpoison.outcome.Outcome`: ``ok``/``sig``
for a CPU access, ``ret``/``err`` for a syscall. A host panic or shutdown
anywhere below ends as that Outcome too, and halts the kernel. Each syscall
method is the kernel's syscall entry (``SYSCALL_DEFINE*``, v5.12 and 6.18)
down to the file, mm or driver function it calls; argument checks the entry
makes itself are here, in the kernel's order. KVM's ioctls arrive through
hooks virt/kvm registers on the :class:`Kernel` at boot.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from kvmpoison.arch.x86.pgtable_types import PAGE_SHIFT, PAGE_SIZE
from kvmpoison.arch.x86.poison import Ctx
from kvmpoison.drivers.char.mem import DEV_MEM, open_dev_mem
from kvmpoison.drivers.char.random import getrandom
from kvmpoison.fs.pipe import Pipe, do_pipe2
from kvmpoison.fs.proc_mem import ProcMem
from kvmpoison.fs.splice import vmsplice_to_pipe, vmsplice_to_user
from kvmpoison.kernel import futex
from kvmpoison.kernel.kernel import Kernel
from kvmpoison.kernel.mce import MCE_REENTRY_LIMIT, kill_me_maybe
from kvmpoison.kernel.ptrace import generic_ptrace_peekdata, generic_ptrace_pokedata
from kvmpoison.kernel.task import Task, force_sig_info
from kvmpoison.mm.fault import translate
from kvmpoison.mm.file import (
    O_ACCMODE,
    O_APPEND,
    O_CREAT,
    O_EXCL,
    O_RDONLY,
    O_TRUNC,
    O_WRONLY,
    File,
    Inode,
    filemap_sample_wb_err,
)
from kvmpoison.mm.filemap import RegularFile
from kvmpoison.mm.madvise import do_madvise
from kvmpoison.mm.mincore import do_mincore
from kvmpoison.mm.mlock import do_mlock, do_munlock
from kvmpoison.mm.mm_types import MmStruct
from kvmpoison.mm.mmap import MAP_ANONYMOUS, do_mmap, do_munmap
from kvmpoison.mm.mprotect import do_mprotect
from kvmpoison.mm.mremap import do_mremap
from kvmpoison.mm.process_vm_access import process_vm_rw
from kvmpoison.mm.secretmem import memfd_secret
from kvmpoison.mm.shmem import memfd_create
from kvmpoison.mm.uaccess import IovIter
from kvmpoison.mm.userfaultfd import (
    UffdCtx,
    mfill_atomic_poison,
    sys_userfaultfd,
    userfaultfd_api,
    userfaultfd_copy,
    userfaultfd_register,
)
from kvmpoison.outcome import Halt, Kind, LivelockOn, Outcome


def _ret(value: int, data: bytes | None = None) -> Outcome:
    return Outcome.error(-value) if value < 0 else Outcome.ret(value, data)


@dataclass(eq=False)
class Process:
    kernel: Kernel
    task: Task

    @classmethod
    def spawn(cls, kernel: Kernel, comm: str = "proc") -> Process:
        return cls(kernel, kernel.spawn(comm))

    @property
    def pid(self) -> int:
        return self.task.pid

    @property
    def mm(self) -> MmStruct:
        if self.task.mm is None:
            raise ProcessLookupError(f"{self.task} has no mm")
        return self.task.mm

    def _guard(self, body: Callable[[], Outcome]) -> Outcome:
        core = self.kernel.core
        if core.halted is not None:
            return core.halted
        if not self.task.alive:
            return Outcome.error(errno.ESRCH, f"{self.task} is dead")
        try:
            return body()
        except Halt as halt:
            core.halted = halt.outcome
            return halt.outcome

    # -- CPU accesses ---------------------------------------------------------------

    def _access(self, addr: int, size: int, data: bytes | None) -> Outcome:
        mm, cpu = self.mm, self.task.cpu
        parts: list[bytes] = []
        end = addr + size
        vaddr = addr
        while vaddr < end:
            n = min(PAGE_SIZE - (vaddr & (PAGE_SIZE - 1)), end - vaddr)
            for _entry in range(MCE_REENTRY_LIMIT + 1):  # the first run, then re-executions
                pfn, failed = translate(mm, cpu, vaddr, write=data is not None, user_mode=True)
                if failed is not None:
                    assert failed.siginfo is not None
                    force_sig_info(self.task, failed.siginfo)
                    return failed
                pa = (pfn << PAGE_SHIFT) | (vaddr & (PAGE_SIZE - 1))
                if data is not None:
                    mm.core.hw.write(pa, data[vaddr - addr : vaddr - addr + n], 0)
                    break
                got = mm.core.hw.load(pa, n, 0, Ctx.HOST_USER, vaddr=vaddr)
                if got.kind is Kind.OK:
                    assert got.data is not None
                    parts.append(got.data)
                    break
                stopped = self._consumed_poison(got)
                if stopped is not None:
                    return stopped
            else:
                return Outcome.livelocked(
                    LivelockOn.MCE, got.mce,
                    f"the task took the same #MC at pa {pa:#x} on {MCE_REENTRY_LIMIT + 1} "
                    "returns to user mode: memory_failure() handled nothing and sent no signal")
            vaddr += n
        return Outcome.ok(b"".join(parts) if data is None else None)

    def _consumed_poison(self, got: Outcome) -> Outcome | None:
        """What a user-mode consumption ends with; None: the task re-executes the load.

        ``do_machine_check`` (arch/x86/kernel/cpu/mce/core.c): a panic or an
        unbreakable shutdown halts the machine (``Halt``); an AR error queues
        ``kill_me_maybe`` (``kernel/mce.py``), and the task returns to user mode
        and re-executes the instruction unless that left it a signal.
        """
        if got.kind is Kind.PANIC or got.kind is Kind.SHUTDOWN:
            raise Halt(got)
        if got.kind is not Kind.MCE:
            return got  # an MC-safe copy's errno; a user load never takes that path
        assert got.mce is not None
        task = self.task
        before = len(task.pending)
        kill_me_maybe(self.kernel.core, task, got.mce.addr >> PAGE_SHIFT, got.mce.mcg_status)
        if len(task.pending) > before:
            return Outcome.signal(task.pending[before], got.mce,
                                  "#MC in user mode: kill_me_maybe() -> memory_failure()")
        return None

    def load(self, addr: int, size: int = 8) -> Outcome:
        return self._guard(lambda: self._access(addr, size, None))

    def store(self, addr: int, data: bytes) -> Outcome:
        return self._guard(lambda: self._access(addr, len(data), data))

    # -- memory syscalls --------------------------------------------------------------

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1,
             offset: int = 0) -> Outcome:
        def body() -> Outcome:
            # x86 sys_mmap checks the offset first; ksys_mmap_pgoff uses fd only
            # without MAP_ANONYMOUS (and ignores it with).
            if offset & (PAGE_SIZE - 1):
                return Outcome.error(errno.EINVAL)
            file = None
            if not flags & MAP_ANONYMOUS:
                file = self.task.fds.get(fd)
                if file is None:
                    return Outcome.error(errno.EBADF)
            return _ret(do_mmap(self.mm, addr, length, prot, flags, file, offset >> PAGE_SHIFT))
        return self._guard(body)

    def munmap(self, addr: int, length: int) -> Outcome:
        return self._guard(lambda: _ret(do_munmap(self.mm, addr, length)))

    def mprotect(self, addr: int, length: int, prot: int) -> Outcome:
        return self._guard(lambda: _ret(do_mprotect(self.mm, addr, length, prot)))

    def mremap(self, addr: int, old_len: int, new_len: int, flags: int,
               new_addr: int = 0) -> Outcome:
        return self._guard(lambda: _ret(do_mremap(self.mm, addr, old_len, new_len, flags,
                                                  new_addr)))

    def madvise(self, addr: int, length: int, advice: int) -> Outcome:
        return self._guard(lambda: _ret(do_madvise(self.mm, addr, length, advice)))

    def mlock(self, addr: int, length: int) -> Outcome:
        return self._guard(lambda: _ret(do_mlock(self.mm, addr, length)))

    def munlock(self, addr: int, length: int) -> Outcome:
        return self._guard(lambda: _ret(do_munlock(self.mm, addr, length)))

    def mincore(self, addr: int, length: int) -> Outcome:
        def body() -> Outcome:
            vec = do_mincore(self.mm, addr, length)
            return _ret(vec) if isinstance(vec, int) else Outcome.ret(0, vec.tobytes())
        return self._guard(body)

    # -- files ------------------------------------------------------------------------

    def _file(self, fd: int) -> File | None:
        return self.task.fds.get(fd)

    def open(self, path: str, flags: int) -> Outcome:
        """``do_sys_open`` on the model's one directory of regular files (v5.12, 6.18).

        ``/dev/mem`` opens the memory device (drivers/char/mem.py).
        O_CREAT creates a missing file (O_EXCL: -EEXIST for an existing one);
        O_TRUNC empties it (``handle_truncate``). No permissions, no directories.
        """
        if path == DEV_MEM:  # a character device: drivers/char/mem.c
            return Outcome.ret(self.task.alloc_fd(open_dev_mem(self.kernel.core,
                                                               self.kernel.next_ino(), flags)))
        inode = self.kernel.files.get(path)
        if inode is not None and flags & O_CREAT and flags & O_EXCL:
            return Outcome.error(errno.EEXIST)
        if inode is None:
            if not flags & O_CREAT:
                return Outcome.error(errno.ENOENT)
            inode = self.kernel.create_file(path)
        file = File(name=path, f_inode=inode, f_op=RegularFile(self.kernel.core), f_flags=flags,
                    f_wb_err=filemap_sample_wb_err(inode.mapping))
        if flags & O_TRUNC and inode.i_size:
            truncated = self._guard(lambda: _ret(file.f_op.setattr_size(file, 0)))
            if not truncated.succeeded:
                return truncated
        return Outcome.ret(self.task.alloc_fd(file))

    def install(self, file: File) -> int:
        return self.task.alloc_fd(file)

    def close(self, fd: int) -> Outcome:
        return Outcome.ret(0) if self.task.fds.pop(fd, None) is not None else \
            Outcome.error(errno.EBADF)

    def fstat(self, fd: int) -> Outcome:
        """``vfs_fstat`` -> ``generic_fillattr`` (fs/stat.c, v5.12, 6.18): 0, and the two
        fields a VMM checks as text, ``st_size=N st_blksize=N``; -EBADF for no file.
        Simplified: st_blksize is ``i_blocksize`` of a 4K-block filesystem, which every
        inode of the model is on (shmem, guest_memfd's, the regular files)."""
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        text = f"st_size={file.f_inode.i_size} st_blksize={PAGE_SIZE}"
        return Outcome.ret(0, text.encode())

    def memfd_create(self, name: str, flags: int = 0) -> Outcome:
        got = memfd_create(self.kernel.core, name, flags)
        return _ret(got) if isinstance(got, int) else Outcome.ret(self.install(got))

    def memfd_secret(self, flags: int = 0) -> Outcome:
        got = memfd_secret(self.kernel.core, flags)
        return _ret(got) if isinstance(got, int) else Outcome.ret(self.install(got))

    def guest_memfd(self, vm: object, size: int, flags: int) -> Outcome:
        """``KVM_CREATE_GUEST_MEMFD`` on ``vm``, through the hook virt/kvm registers at boot.

        Without it the VM ioctl is unknown: -ENOTTY, as ``kvm_arch_vm_ioctl`` answers.
        """
        create = self.kernel.kvm_create_guest_memfd
        if create is None:
            return Outcome.error(errno.ENOTTY, "KVM_CREATE_GUEST_MEMFD is not registered")
        got = create(vm, size, flags)
        return _ret(got) if isinstance(got, int) else Outcome.ret(self.install(got))

    def pipe(self) -> tuple[int, int]:
        r, w = do_pipe2(self.kernel.next_ino())
        return self.install(r), self.install(w)

    def _rw(self, fd: int, addr: int, count: int, pos: int | None, write: bool) -> Outcome:
        """ksys_read/write and ksys_pread64/pwrite64 + vfs_read/vfs_write (v5.12, 6.18).

        Order of checks: a negative pread/pwrite offset (-EINVAL), the fd
        (-EBADF), FMODE_PREAD (-ESPIPE), the access mode (-EBADF).
        """
        def body() -> Outcome:
            if pos is not None and pos < 0:
                return Outcome.error(errno.EINVAL)
            file = self._file(fd)
            if file is None:
                return Outcome.error(errno.EBADF)
            if pos is not None and not file.fmode_pread:
                return Outcome.error(errno.ESPIPE)
            acc = file.f_flags & O_ACCMODE
            if (write and acc == O_RDONLY) or (not write and acc == O_WRONLY):
                return Outcome.error(errno.EBADF)
            it = IovIter(self.mm, self.task.cpu, addr, count)
            at = file.f_pos if pos is None else pos
            if write and file.f_flags & O_APPEND and file.fmode_pread:
                at = file.f_inode.i_size  # IOCB_APPEND: pwrite appends too on Linux
            op = file.f_op.write_iter if write else file.f_op.read_iter
            ret = op(file, at, it)
            if ret > 0 and pos is None:
                file.f_pos = at + ret
            return _ret(ret)
        return self._guard(body)

    def read(self, fd: int, addr: int, count: int) -> Outcome:
        return self._rw(fd, addr, count, None, write=False)

    def write(self, fd: int, addr: int, count: int) -> Outcome:
        return self._rw(fd, addr, count, None, write=True)

    def pread(self, fd: int, addr: int, count: int, pos: int) -> Outcome:
        return self._rw(fd, addr, count, pos, write=False)

    def pwrite(self, fd: int, addr: int, count: int, pos: int) -> Outcome:
        return self._rw(fd, addr, count, pos, write=True)

    def lseek(self, fd: int, offset: int, whence: int) -> Outcome:
        """``ksys_lseek``: whence > SEEK_MAX is -EINVAL first; a file without FMODE_LSEEK
        (pipes, guest_memfd: the model reads it from ``fmode_pread``) is -ESPIPE; else
        ``generic_file_llseek`` for SEEK_SET/CUR/END (SEEK_DATA/HOLE: not modelled)."""
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        if not 0 <= whence <= 4:  # SEEK_MAX = SEEK_HOLE
            return Outcome.error(errno.EINVAL)
        if not file.fmode_pread:
            return Outcome.error(errno.ESPIPE)
        if whence > 2:
            return Outcome.error(errno.EINVAL, "SEEK_DATA/SEEK_HOLE are not modelled")
        base = (0, file.f_pos, file.f_inode.i_size)[whence]
        if base + offset < 0:
            return Outcome.error(errno.EINVAL)
        file.f_pos = base + offset
        return Outcome.ret(file.f_pos)

    def ftruncate(self, fd: int, size: int) -> Outcome:
        """``do_sys_ftruncate`` (v5.12, 6.18): -EINVAL for a negative length, then
        -EBADF, then -EINVAL for a file not open for writing."""
        if size < 0:
            return Outcome.error(errno.EINVAL)
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        if file.f_flags & O_ACCMODE == O_RDONLY:
            return Outcome.error(errno.EINVAL)
        return self._guard(lambda: _ret(file.f_op.setattr_size(file, size)))

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> Outcome:
        """``vfs_fallocate`` (v5.12, 6.18): argument checks, then -EBADF without
        FMODE_WRITE, then the file's own ->fallocate."""
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        if offset < 0 or length <= 0:
            return Outcome.error(errno.EINVAL)
        if file.f_flags & O_ACCMODE == O_RDONLY:
            return Outcome.error(errno.EBADF)
        return self._guard(lambda: _ret(file.f_op.fallocate(file, mode, offset, length)))

    def fsync(self, fd: int) -> Outcome:
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        return self._guard(lambda: _ret(file.f_op.fsync(file)))

    def vmsplice_to_pipe(self, fd: int, addr: int, length: int) -> Outcome:
        file = self._file(fd)
        if file is None or not isinstance(file.private_data, Pipe):
            return Outcome.error(errno.EBADF)
        pipe = file.private_data
        return self._guard(lambda: _ret(vmsplice_to_pipe(self.mm, pipe, addr, length)))

    def vmsplice_to_user(self, fd: int, addr: int, length: int) -> Outcome:
        file = self._file(fd)
        if file is None or not isinstance(file.private_data, Pipe):
            return Outcome.error(errno.EBADF)
        pipe = file.private_data
        return self._guard(lambda: _ret(vmsplice_to_user(self.mm, self.task.cpu, pipe, addr,
                                                         length)))

    def getrandom(self, addr: int, count: int, flags: int = 0) -> Outcome:
        return self._guard(lambda: _ret(getrandom(self.kernel.rng, self.mm, self.task.cpu, addr,
                                                  count, flags)))

    def futex_wait(self, addr: int, val: int, private: bool) -> Outcome:
        return self._guard(lambda: _ret(futex.futex_wait(self.mm, self.task.cpu, addr, val,
                                                         private)))

    def futex_wake(self, addr: int, nr: int, private: bool) -> Outcome:
        return self._guard(lambda: _ret(futex.futex_wake(self.mm, addr, nr, private)))

    # -- other processes ----------------------------------------------------------------

    def open_proc_mem(self, target: Process, flags: int) -> Outcome:
        if target.task.mm is None:
            return Outcome.error(errno.ESRCH)
        inode = Inode(ino=self.kernel.next_ino(), kind="proc-mem")
        file = File(name=f"/proc/{target.pid}/mem", f_inode=inode, f_op=ProcMem(target.mm),
                    f_flags=flags)
        return Outcome.ret(self.install(file))

    def process_vm_readv(self, target: Process, local: int, remote: int, length: int) -> Outcome:
        return self._guard(lambda: _ret(process_vm_rw(self.mm, self.task.cpu, target.mm, local,
                                                      remote, length, vm_write=False)))

    def process_vm_writev(self, target: Process, local: int, remote: int,
                          length: int) -> Outcome:
        return self._guard(lambda: _ret(process_vm_rw(self.mm, self.task.cpu, target.mm, local,
                                                      remote, length, vm_write=True)))

    def ptrace_peekdata(self, target: Process, addr: int) -> Outcome:
        def body() -> Outcome:
            got = generic_ptrace_peekdata(target.mm, addr)
            return _ret(got) if isinstance(got, int) else Outcome.ok(got)
        return self._guard(body)

    def ptrace_pokedata(self, target: Process, addr: int, data: bytes) -> Outcome:
        return self._guard(lambda: _ret(generic_ptrace_pokedata(target.mm, addr, data)))

    def fork(self) -> Process:
        return Process(self.kernel, self.kernel.fork(self.task))

    def exit(self) -> None:
        self.kernel.exit(self.task)

    # -- userfaultfd ------------------------------------------------------------------

    def userfaultfd(self) -> UffdCtx:
        return UffdCtx(self.mm)

    def uffdio_register(self, ctx: UffdCtx, addr: int, length: int, mode: int) -> Outcome:
        return self._guard(lambda: _ret(userfaultfd_register(ctx, addr, length, mode)))

    def uffdio_poison(self, ctx: UffdCtx, addr: int, length: int) -> Outcome:
        return self._guard(lambda: _ret(mfill_atomic_poison(ctx, addr, length)))

    def sys_userfaultfd(self, flags: int) -> Outcome:
        """``userfaultfd(2)``: a new fd, or -errno (mm/userfaultfd.py)."""
        got = sys_userfaultfd(self.mm, flags, self.kernel.next_ino())
        return _ret(got) if isinstance(got, int) else Outcome.ret(self.install(got))

    def uffd_ctx(self, fd: int) -> UffdCtx | Outcome:
        """The context behind a userfaultfd ``fd``: -EBADF for no file; ``vfs_ioctl`` of
        another file does not know the UFFDIO_* commands: -ENOTTY."""
        file = self._file(fd)
        if file is None:
            return Outcome.error(errno.EBADF)
        if not isinstance(file.private_data, UffdCtx):
            return Outcome.error(errno.ENOTTY)
        return file.private_data

    def uffd_ioctl(self, fd: int, cmd: str, start: int = 0, length: int = 0, mode: int = 0,
                   data: bytes | None = None, api: int = 0, features: int = 0) -> Outcome:
        """``userfaultfd_ioctl`` (fs/userfaultfd.c, v5.12): UFFDIO_API, UFFDIO_REGISTER,
        UFFDIO_COPY (``data``, a page at a time) and UFFDIO_ZEROPAGE; every command but
        UFFDIO_API is -EINVAL before it. COPY/ZEROPAGE's ``copy``/``zeropage`` field is
        the outcome's detail."""
        ctx = self.uffd_ctx(fd)
        if isinstance(ctx, Outcome):
            return ctx
        if cmd == "API":
            return _ret(userfaultfd_api(ctx, api, features))
        if not ctx.initialized:
            return Outcome.error(errno.EINVAL, "UFFDIO_API first")
        if cmd == "REGISTER":
            return self.uffdio_register(ctx, start, length, mode)

        def body() -> Outcome:
            ret, field = userfaultfd_copy(ctx, start, data if cmd == "COPY" else None, length,
                                          mode)
            what = "copy" if cmd == "COPY" else "zeropage"
            return Outcome.error(-ret, f"{what}={field}") if ret else \
                Outcome.ret(0, detail=f"{what}={field}")
        return self._guard(body)
