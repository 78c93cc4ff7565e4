"""Fetch Debian's Linux 6.1 package with the system's package tool and unpack what the VM needs.

``apt-cache`` names the newest ``linux-image-6.1.0-N-amd64-unsigned`` with a
candidate version, ``apt-get download`` fetches it into the cache (no root
needed, nothing installed), and ``dpkg-deb -x`` unpacks it. Only vmlinuz,
/boot/config and the modules of :mod:`.kmod` are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmpoison.backends.vmkernel import kmod
from kvmpoison.backends.vmkernel.cache import KernelFiles, cache_root
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError

PACKAGE_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64-unsigned$")
APT_TIMEOUT = 600  # a 70 MB download on a slow mirror
TOOL_TIMEOUT = 120


def _tool(argv: list[str], timeout: int, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise VmKernelUnavailableError(
            f"{argv[0]} is missing: the Debian 6.1 kernel is fetched with apt "
            "(a Debian or Ubuntu system with Debian bookworm in its sources)")
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise VmKernelUnavailableError(f"{' '.join(argv)} took over {timeout} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise VmKernelUnavailableError(f"{' '.join(argv)} failed: {last}")
    return done.stdout


def newest_package() -> tuple[str, str]:
    """(package name, candidate version) of the newest 6.1 amd64 unsigned image."""
    found = _tool(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64"
                   r"-unsigned$"], TOOL_TIMEOUT)
    names = sorted((n for n in (line.split(" ", 1)[0] for line in found.splitlines())
                    if PACKAGE_RE.match(n)), key=lambda n: int(PACKAGE_RE.match(n)[1]),  # type: ignore[index]
                   reverse=True)
    for name in names:
        policy = _tool(["apt-cache", "policy", name], TOOL_TIMEOUT)
        cand = re.search(r"Candidate:\s*(\S+)", policy)
        if cand and cand.group(1) != "(none)":
            return name, cand.group(1)
    raise VmKernelUnavailableError(
        "apt knows no linux-image-6.1.0-*-amd64-unsigned package: add Debian bookworm "
        "(or bookworm-security) to the apt sources and run apt-get update")


def fetch() -> KernelFiles:
    """The newest cached kernel, else download, unpack and return a fresh one (no initramfs)."""
    name, version = newest_package()
    dest = KernelFiles(cache_root() / f"{name}_{version}")
    if dest.unpacked():
        return dest
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix="fetch-") as tmp:
        work = Path(tmp)
        _tool(["apt-get", "download", f"{name}={version}"], APT_TIMEOUT, cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise VmKernelUnavailableError(f"apt-get download {name} left {len(debs)} .deb files")
        tree = work / "tree"
        _tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], TOOL_TIMEOUT)
        unpack(tree, dest)
    return dest


def unpack(tree: Path, dest: KernelFiles) -> None:
    """Copy vmlinuz, the config and the needed modules out of an unpacked package tree."""
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    configs = sorted((tree / "boot").glob("config-*"))
    if len(vmlinuz) != 1 or len(configs) != 1:
        raise VmKernelUnavailableError(f"unexpected package layout under {tree / 'boot'}")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    modules = kmod.index(tree / "lib" / "modules" / release)
    order = kmod.load_order(modules)
    staging = dest.root.with_name(f"{dest.root.name}.{os.getpid()}.part")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "modules").mkdir(parents=True)
    shutil.copyfile(vmlinuz[0], staging / "vmlinuz")
    shutil.copyfile(configs[0], staging / "config")
    for name in order:
        shutil.copyfile(modules[name], staging / "modules" / f"{name}.ko")
    (staging / "modules" / "order").write_text("\n".join(order) + "\n")
    (staging / "release").write_text(release + "\n")
    if dest.unpacked():  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(dest.root, ignore_errors=True)
    staging.rename(dest.root)
