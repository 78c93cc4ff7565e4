"""The guest's initramfs: a static busybox, the modules, and an init that chroots into the host.

The init script loads the modules, mounts the host's root read-only over 9p
(mount tag ``hostroot``), gives it fresh /proc, /sys, /dev, debugfs and an
ext4 scratch directory on a RAM disk (O_DIRECT needs a block file system) at
``SCRATCH`` inside the fresh /dev, so no host directory (the sources may live
in /tmp) is hidden; the runner's TMPDIR points there. It then runs the
host's own python (the interpreter running kvmpoison) on the runner named on
the kernel command line, and powers off. Everything it prints goes to the serial console.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from kvmpoison.backends.vmkernel.cache import KernelFiles
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError

CPIO_TIMEOUT = 60
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
RAMDISK_KB = 65536
MOUNT_TAG = "hostroot"
SCRATCH = "/dev/kvmpoison-tmp"  # in the guest's own devtmpfs: writable, hides nothing

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "KVMPOISON-STAGE init $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/order); do
    args=""
    [ "$m" = brd ] && args="rd_nr=1 rd_size=@RAMDISK_KB@"
    insmod /lib/modules/$m.ko $args || echo "KVMPOISON-INSMOD-FAILED $m"
done
src=""; job=""; python=python3
for word in $(cat /proc/cmdline); do
    case "$word" in
        kvmpoison.src=*) src="${word#kvmpoison.src=}" ;;
        kvmpoison.job=*) job="${word#kvmpoison.job=}" ;;
        kvmpoison.python=*) python="${word#kvmpoison.python=}" ;;
    esac
done
# The runner needs only the probes: a bare package object skips kvmpoison/__init__.py
# (the model and numpy), a third of the runner's start-up under TCG.
BOOTSTRAP='import runpy, sys, types
pkg = types.ModuleType("kvmpoison")
pkg.__path__ = [sys.argv[1] + "/kvmpoison"]
sys.modules["kvmpoison"] = pkg
sys.argv = sys.argv[1:]
runpy.run_module("kvmpoison.backends.vmkernel.guest", run_name="__main__", alter_sys=True)'
mkdir -p /host
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 @MOUNT_TAG@ /host; then
    mount -t proc proc /host/proc
    mount -t sysfs sysfs /host/sys
    mount -t devtmpfs devtmpfs /host/dev
    mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
    mkdir -p /host@SCRATCH@
    if [ -b /dev/ram0 ] && chroot /host /sbin/mke2fs -q -F -t ext4 /dev/ram0 \
            && mount -t ext4 /dev/ram0 /host@SCRATCH@; then
        :
    else
        echo "KVMPOISON-STAGE no-ext4 (tmpfs scratch: O_DIRECT cells will differ)"
        mount -t tmpfs tmpfs /host@SCRATCH@
    fi
    echo "KVMPOISON-STAGE chroot $(cut -d' ' -f1 /proc/uptime)"
    chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=@SCRATCH@ \
        TMPDIR=@SCRATCH@ \
        PYTHONDONTWRITEBYTECODE=1 KVMPOISON_IN_VM_GUEST=1 \
        "$python" -c "$BOOTSTRAP" "$src" "$job"
    rc=$?
    echo "KVMPOISON-STAGE done $(cut -d' ' -f1 /proc/uptime) rc=$rc"
else
    echo "KVMPOISON-FATAL cannot mount the host root over 9p"
fi
sync
poweroff -f
"""


def find_busybox() -> Path:
    """A statically linked busybox (busybox-static), which runs without the host's libc."""
    for cand in BUSYBOX_CANDIDATES:
        path = Path(cand)
        if path.is_file() and is_static_elf(path.read_bytes()[:65536]):
            return path
    raise VmKernelUnavailableError("no static busybox: install busybox-static "
                                   "(apt-get install busybox-static)")


def is_static_elf(head: bytes) -> bool:
    """An ELF64 file with no PT_INTERP program header (no dynamic loader)."""
    if head[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            return False
        p_type, = struct.unpack_from("<I", head, off)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def init_script() -> str:
    return (INIT.replace("@RAMDISK_KB@", str(RAMDISK_KB)).replace("@MOUNT_TAG@", MOUNT_TAG)
            .replace("@SCRATCH@", SCRATCH))


def key(kernel: KernelFiles, busybox: Path) -> str:
    digest = hashlib.sha256(init_script().encode())
    digest.update(busybox.read_bytes())
    for ko in sorted(kernel.modules.iterdir()):
        digest.update(ko.name.encode())
    return digest.hexdigest()


def ensure(kernel: KernelFiles) -> Path:
    """The kernel's initramfs, rebuilt when the init script, busybox or the modules changed."""
    busybox = find_busybox()
    want = key(kernel, busybox)
    if kernel.initramfs.exists() and kernel.initramfs_key.exists() and \
            kernel.initramfs_key.read_text().strip() == want:
        return kernel.initramfs
    build(kernel)
    kernel.initramfs_key.write_text(want + "\n")
    return kernel.initramfs


def build(kernel: KernelFiles) -> Path:
    """Write ``initramfs.cpio`` (newc) next to the kernel; return its path."""
    busybox = find_busybox()
    if shutil.which("cpio") is None:
        raise VmKernelUnavailableError("cpio is missing: install it (apt-get install cpio)")
    with tempfile.TemporaryDirectory(prefix="kvmpoison-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        for ko in kernel.modules.iterdir():
            shutil.copyfile(ko, root / "lib" / "modules" / ko.name)
        (root / "init").write_text(init_script())
        (root / "init").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        out = kernel.initramfs.with_suffix(f".{os.getpid()}.part")  # concurrent runs
        with open(out, "wb") as fh:
            try:
                done = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                      input="\n".join(names).encode(), stdout=fh,
                                      stderr=subprocess.PIPE, timeout=CPIO_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                raise VmKernelUnavailableError("cpio took too long") from None
        if done.returncode != 0:
            raise VmKernelUnavailableError(f"cpio failed: {done.stderr.decode().strip()}")
        out.rename(kernel.initramfs)
    return kernel.initramfs
