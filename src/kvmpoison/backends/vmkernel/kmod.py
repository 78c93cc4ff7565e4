"""Kernel modules the guest needs, in load order, read from the modules themselves.

The package ships no modules.dep (depmod runs at install time), so the
``depends=`` field of each module's ``.modinfo`` section gives the order.
"""

from __future__ import annotations

import re
from pathlib import Path

# virtio PCI transport, 9p over virtio (the host's root), brd + ext4 (a scratch file
# system where O_DIRECT works; tmpfs has no O_DIRECT in 6.1), hwpoison_inject (unpoison).
WANTED = ("virtio_pci", "9pnet_virtio", "9p", "brd", "crc32c_generic", "ext4", "hwpoison-inject")
OPTIONAL = frozenset({"hwpoison-inject", "brd", "crc32c_generic", "ext4"})

_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def canonical(name: str) -> str:
    """Module names treat ``-`` and ``_`` alike."""
    return name.replace("-", "_")


def index(tree: Path) -> dict[str, Path]:
    """Every ``.ko`` under *tree*, by canonical module name (bounded by the tree)."""
    return {canonical(p.name.removesuffix(".ko")): p for p in tree.rglob("*.ko")}


def depends(ko: Path) -> list[str]:
    match = _DEPENDS.search(ko.read_bytes())
    if match is None or not match.group(1):
        return []
    return [canonical(d) for d in match.group(1).decode().split(",") if d]


def load_order(modules: dict[str, Path], wanted: tuple[str, ...] = WANTED) -> list[str]:
    """Dependencies first; each module once. A missing required module is an error."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        ko = modules.get(name)
        if ko is None:
            raise KeyError(name)
        for dep in depends(ko):
            visit(dep, (*chain, name))
        seen.add(name)
        order.append(name)

    for want in wanted:
        try:
            visit(canonical(want), ())
        except KeyError as exc:
            if want not in OPTIONAL:
                raise ValueError(f"the kernel package has no module {exc.args[0]!r}") from None
    return order
