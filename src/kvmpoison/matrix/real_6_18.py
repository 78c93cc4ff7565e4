"""The real kernel's access matrix on this project's machines (6.18, MEMORY_FAILURE off).

Measured on this project's machines with the set-up of docs/matrix.md. ``kvmpoison oracle`` measures
it live; this copy lets the model be held to it where /dev/kvm is absent.
"""

from __future__ import annotations

BACKINGS = ("anon", "anon_prot_none", "memfd_secret", "gmem_private", "gmem_shared",
            "file_beyond_eof", "uffd_poison", "madv_guard")

_COPY = ("ret:8", "err:EFAULT", "ret:8", "err:EFAULT", "ret:8", "err:EFAULT", "err:EFAULT",
         "err:EFAULT")
_STRADDLE_FILE = ("ret:32", "ret:16", "ret:32", "ret:16", "ret:32", "ret:16", "ret:16", "ret:16")
_STRADDLE_PIPE = ("ret:32", "err:EFAULT", "ret:32", "err:EFAULT", "ret:32", "err:EFAULT",
                  "err:EFAULT", "err:EFAULT")
_ODIRECT = ("ret:4096", "err:EFAULT", "err:EFAULT", "err:EFAULT", "ret:4096", "err:EFAULT",
            "err:EFAULT", "err:EFAULT")
_GUP8 = ("ret:8", "err:EFAULT", "err:EFAULT", "err:EFAULT", "ret:8", "err:EFAULT", "err:EFAULT",
         "err:EFAULT")
_FORCE8 = ("ret:8", "ret:8", "err:EIO", "err:EIO", "ret:8", "err:EIO", "err:EIO", "err:EIO")
_TOUCH = ("ok", "sig:SIGSEGV:SEGV_ACCERR", "ok", "sig:SIGBUS:BUS_ADRERR", "ok",
          "sig:SIGBUS:BUS_ADRERR", "sig:SIGBUS:BUS_ADRERR", "sig:SIGSEGV:SEGV_MAPERR")
_POPULATE = ("ret:0", "err:EINVAL", "err:EINVAL", "err:EFAULT", "ret:0", "err:EFAULT",
             "err:EHWPOISON", "err:EFAULT")

TABLE: dict[str, tuple[str, ...]] = {
    "load": _TOUCH,
    "store": _TOUCH,
    "read_pipe_to_buf": _COPY,
    "write_buf_to_pipe": _COPY,
    "pread_file_to_buf": _COPY,
    "pwrite_buf_to_file": _COPY,
    "pread_file_to_buf_straddle": _STRADDLE_FILE,
    "pwrite_buf_to_file_straddle": _STRADDLE_FILE,
    "read_pipe_to_buf_straddle": _STRADDLE_PIPE,
    "write_buf_to_pipe_straddle": _STRADDLE_PIPE,
    "odirect_pread": _ODIRECT,
    "odirect_pwrite": _ODIRECT,
    "vmsplice_buf_to_pipe": _GUP8,
    "vmsplice_pipe_to_buf": _COPY,
    "proc_self_mem_read": _FORCE8,
    "proc_self_mem_write": _FORCE8,
    "futex_wait_private": ("err:EAGAIN", "err:EFAULT", "err:EAGAIN", "err:EFAULT", "err:EAGAIN",
                           "err:EFAULT", "err:EFAULT", "err:EFAULT"),
    "futex_wait_shared": ("err:EAGAIN", "err:EFAULT", "err:EFAULT", "err:EFAULT", "err:EAGAIN",
                          "err:EFAULT", "err:EFAULT", "err:EFAULT"),
    "futex_wake_shared": ("ret:0", "err:EFAULT", "err:EFAULT", "err:EFAULT", "ret:0",
                          "err:EFAULT", "err:EFAULT", "err:EFAULT"),
    "populate_read": _POPULATE,
    "populate_write": _POPULATE,
    "mlock": ("ret:0", "err:ENOMEM", "err:ENOMEM", "err:ENOMEM", "ret:0", "err:ENOMEM",
              "err:ENOMEM", "err:ENOMEM"),
    "mincore": ("vec:1", "vec:1", "vec:1", "vec:0", "vec:1", "vec:0", "vec:0", "vec:0"),
    "getrandom": _COPY,
    "process_vm_readv": _GUP8,
    "process_vm_writev": _GUP8,
    "process_vm_readv_straddle": ("ret:32", "ret:16", "ret:16", "ret:16", "ret:32", "ret:16",
                                  "ret:16", "ret:16"),
    "proc_pid_mem_read": _FORCE8,
    "proc_pid_mem_write": _FORCE8,
    "proc_pid_mem_read_straddle": ("ret:32", "ret:32", "ret:16", "ret:16", "ret:32", "ret:16",
                                   "ret:16", "ret:16"),
    "ptrace_peek": ("ok", "ok", "err:EIO", "err:EIO", "ok", "err:EIO", "err:EIO", "err:EIO"),
    "ptrace_poke": ("ret:0", "ret:0", "err:EIO", "err:EIO", "ret:0", "err:EIO", "err:EIO",
                    "err:EIO"),
}


def cell(path: str, backing: str) -> str:
    return TABLE[path][BACKINGS.index(backing)]
