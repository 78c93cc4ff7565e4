"""The access-matrix protocol of docs/matrix.md: path ids, backing ids, set-up.

Only names and the set-up's constants live here, so the model runner and
the real-kernel probes describe the same experiment.
"""

from __future__ import annotations

LOCAL_PATHS = (
    "load", "store", "read_pipe_to_buf", "write_buf_to_pipe", "pread_file_to_buf",
    "pwrite_buf_to_file", "pread_file_to_buf_straddle", "pwrite_buf_to_file_straddle",
    "read_pipe_to_buf_straddle", "write_buf_to_pipe_straddle", "odirect_pread",
    "odirect_pwrite", "vmsplice_buf_to_pipe", "vmsplice_pipe_to_buf", "proc_self_mem_read",
    "proc_self_mem_write", "futex_wait_private", "futex_wait_shared", "futex_wake_shared",
    "populate_read", "populate_write", "mlock", "mincore", "getrandom",
)
REMOTE_PATHS = (
    "process_vm_readv", "process_vm_writev", "process_vm_readv_straddle", "proc_pid_mem_read",
    "proc_pid_mem_write", "proc_pid_mem_read_straddle", "ptrace_peek", "ptrace_poke",
)
PATHS = LOCAL_PATHS + REMOTE_PATHS

BACKINGS = ("anon", "anon_prot_none", "memfd_secret", "gmem_private", "gmem_shared",
            "file_beyond_eof", "uffd_poison", "madv_guard")

# Backings whose T is hardware-poisoned (MADV_HWPOISON live, memory_failure() in the model).
# Live, they run ONLY inside the VM guest of ``backends.vmkernel``: poisoning takes a
# physical page out of service, which must never happen on the host.
HWPOISON_BACKINGS = ("hwpoison_anon", "hwpoison_shmem", "hwpoison_file")
# Probes of what happens to a poisoned T next: each does one step, then loads T
# (``unpoison`` alone reports the write to hwpoison_inject's unpoison-pfn).
HWPOISON_PATHS = ("load_siginfo", "pagemap", "hwpoison_again", "fork_child_load",
                  "dontneed_load", "punch_hole_load", "truncate_load", "file_pread", "unpoison",
                  "unpoison_load")
# load_siginfo is a load whose cell adds si_addr (relative to T) and si_addr_lsb.
# pagemap is T's /proc/self/pagemap entry: present, none, or swap with its swap type
# number (SWP_HWPOISON's number is the build's: 26 in Debian's 6.1) and offset.
# hwpoison_again is a second MADV_HWPOISON of T.
# file_pread reads the poisoned page through its file (the page cache), not through T.
# punch-hole, truncate and file_pread need a file: the anonymous column has no such cell.
HWPOISON_PATHS_FOR = {
    "hwpoison_anon": ("load_siginfo", "pagemap", "hwpoison_again", "fork_child_load",
                      "dontneed_load", "unpoison", "unpoison_load"),
    "hwpoison_shmem": HWPOISON_PATHS,
    "hwpoison_file": HWPOISON_PATHS,  # a regular file (ext4 in the VM guest), MAP_SHARED
}
UNPOISON_PFN = "/sys/kernel/debug/hwpoison/unpoison-pfn"

PAGE0_FILL = 0x11  # page 0: ordinary private anonymous memory
T_FILL = 0x22  # what T holds where the backing lets the owner write it
FILE_FILL = 0x33  # the regular file used by pread/pwrite/O_DIRECT
TRANSFER = 8  # bytes moved from the start of T
STRADDLE = 32  # bytes moved by straddle paths, starting 16 bytes before T
STRADDLE_BEFORE = 16
ODIRECT = 4096
FUTEX_MISMATCH = 0x5A5A5A5A  # never what T holds, so FUTEX_WAIT returns at once


def siginfo_cell(cell: str, addr: int, lsb: int | None, t: int) -> str:
    """``sig:SIGBUS:BUS_MCEERR_AR`` + ``:addr=T+0x0:lsb=12`` (lsb only where it is set)."""
    off = addr - t
    where = f"T+{off:#x}" if off >= 0 else f"T-{-off:#x}"
    return f"{cell}:addr={where}" + (f":lsb={lsb}" if lsb else "")


PM_SWAP_TYPE_BITS = 5  # MAX_SWAPFILES_SHIFT: pagemap's frame is type | offset << 5


def pagemap_cell(present: bool, swap: bool, swap_type: int, offset: int, pfn: int) -> str:
    if present:
        return "pagemap:present"
    if not swap:
        return "pagemap:none"
    where = "pfn" if pfn and offset == pfn else f"{offset:#x}"
    return f"pagemap:swap:type={swap_type}:offset={where}"


def is_straddle(path: str) -> bool:
    return path.endswith("_straddle")


def transfer_size(path: str) -> int:
    if is_straddle(path):
        return STRADDLE
    return ODIRECT if path.startswith("odirect") else TRANSFER


# -- transparent huge pages (docs/matrix.md, "THP backings") ---------------------------------
#
# T is the first 4 KiB page of a 2 MiB-aligned region that MADV_HUGEPAGE and a touch made
# PMD-mapped; page 0 is the ordinary anonymous page just below it. anon_thp: private
# anonymous. shmem_thp: a 2 MiB memfd (shmem), MAP_SHARED. The set-up checks that the region
# really is PMD-mapped (smaps AnonHugePages / ShmemPmdMapped of the region = 2048 kB); where
# it is not, the column is "not refereed" with the reason, never faked.
THP_BACKINGS = ("anon_thp", "shmem_thp")
HPAGE_PMD_SIZE = 2 << 20  # x86-64: one PMD maps 2 MiB (HPAGE_PMD_ORDER 9)
HPAGE_PMD_KB = HPAGE_PMD_SIZE >> 10
THP_ONE_OFFSET = 1 << 20  # "one 4 KiB page inside the THP": the page 1 MiB into the region
THP_PROT_ONE = 0x1  # PROT_READ: thp_mprotect_one's new protection of that page
# Probes of the THP itself; every cell but mincore's is the region's smaps counters.
THP_PATHS = (
    "thp_smaps",  # the counters right after the set-up
    "thp_mprotect_one",  # mprotect(PROT_READ) of the one page, then the counters
    "thp_dontneed_one",  # MADV_DONTNEED of the one page, then the counters
    "thp_munmap_one",  # munmap of the one page, then the counters
    "thp_mincore",  # mincore() over the 2 MiB: a run-length vector cell
    "thp_mincore_after_dontneed",  # the same after MADV_DONTNEED of the one page
    "thp_fork_child_load",  # fork; the child loads T: its cell, then the child's counters
    "thp_fork_child_store",  # fork; the child stores to T: its cell, then the child's counters
    "thp_fork_parent_after_child_store",  # the parent's counters after the child's store
)
NOT_REFEREED = "not refereed"  # a live probe's answer where the set-up check failed (+ reason)
SMAPS_FIELDS = ("Rss", "AnonHugePages", "ShmemPmdMapped")


def smaps_cell(rss_kb: int, anon_huge_kb: int, shmem_pmd_kb: int) -> str:
    """``smaps:Rss=2048:AnonHugePages=2048:ShmemPmdMapped=0``: kB, summed over every VMA of
    the 2 MiB region (as /proc/PID/smaps prints them per VMA)."""
    return f"smaps:Rss={rss_kb}:AnonHugePages={anon_huge_kb}:ShmemPmdMapped={shmem_pmd_kb}"


def vec_runs_cell(vec: bytes) -> str:
    """mincore's vector over many pages, run-length coded: ``vec:1*512``, ``vec:1*256,0*1,1*255``
    (bit 0 of each byte; the other bits are reserved)."""
    runs: list[list[int]] = []
    for b in vec:
        bit = b & 1
        if runs and runs[-1][0] == bit:
            runs[-1][1] += 1
        else:
            runs.append([bit, 1])
    return "vec:" + ",".join(f"{bit}*{n}" for bit, n in runs)


def child_cell(access: str, counters: str) -> str:
    """A fork probe's cell: the child's access cell, ``;``, the child's counters after it."""
    return f"{access};{counters}"


def thp_mode(text: str) -> str:
    """The selected mode of a THP sysfs file: ``always [madvise] never`` -> ``madvise``."""
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        raise ValueError(f"not a THP sysfs mode line: {text.strip()!r}")
    return text[start + 1:end]

# userfaultfd messages in a scenario's read(2) of a uffd: ``struct uffd_msg`` is 32 bytes and
# a page fault's address (bytes 16-23) is an address of the VMM, which differs between the
# model and the live child. Both sides compare it as an offset into the VM's guest RAM.
UFFD_MSG_SIZE = 32


def uffd_msgs_relative(data: bytes, ram: list[tuple[int, int]]) -> bytes:
    """``data`` (whole uffd_msgs) with each page-fault address inside one of ``ram``'s
    (start, size) ranges rewritten as its offset from that range's start."""
    out = bytearray(data)
    for i in range(0, len(out) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
        if out[i] != 0x12:  # UFFD_EVENT_PAGEFAULT
            continue
        addr = int.from_bytes(out[i + 16 : i + 24], "little")
        for start, size in ram:
            if start <= addr < start + size:
                out[i + 16 : i + 24] = (addr - start).to_bytes(8, "little")
                break
    return bytes(out)
