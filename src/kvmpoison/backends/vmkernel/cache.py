"""Where the VM kernel's files live: ``$XDG_CACHE_HOME`` (or ~/.cache)/kvmpoison/debian-6.1/.

Only the first run downloads and builds; later runs find everything here.
One directory per kernel package version, so an update never mixes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FLAVOUR = "debian-6.1"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmpoison" / FLAVOUR


@dataclass(frozen=True)
class KernelFiles:
    """The extracted kernel of one package version, and the initramfs built for it."""

    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.cpio"

    @property
    def initramfs_key(self) -> Path:
        """What the initramfs was built from: a changed init script or busybox rebuilds it."""
        return self.root / "initramfs.key"

    @property
    def release_file(self) -> Path:
        return self.root / "release"

    @property
    def release(self) -> str:
        return self.release_file.read_text().strip()

    def unpacked(self) -> bool:
        return all(p.exists() for p in (self.vmlinuz, self.config, self.modules,
                                        self.release_file))


def cached_kernels() -> list[KernelFiles]:
    """Unpacked kernels in the cache, newest package name last."""
    root = cache_root()
    if not root.is_dir():
        return []
    found = [KernelFiles(p) for p in sorted(root.iterdir(), key=_abi_key)
             if p.is_dir() and not p.name.endswith(".part")]
    return [k for k in found if k.unpacked()]


def _abi_key(path: Path) -> tuple[int, str]:
    # linux-image-6.1.0-57-amd64-unsigned_6.1.192-3: order by the ABI number 57.
    parts = path.name.split("-")
    abi = parts[3] if len(parts) > 3 and parts[3].isdigit() else "0"
    return int(abi), path.name
