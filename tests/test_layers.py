"""Imports point down the layers of docs/architecture.md; backends/ stands apart from the model.

backends/ (the real kernels) may use only itself and ``matrix.protocol``, the path ids and
cell notation both sides speak; the model never imports backends/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvmpoison

PACKAGE = Path(kvmpoison.__file__).parent

# Lowest first. A module may import its own layer or any layer below it, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("uapi", "kconfig", "statecopy"),
    ("outcome",),
    ("arch",),
    ("mm",),
    ("fs", "drivers"),
    ("kernel",),
    ("virt",),
    ("designs",),  # policies over one kernel; a machine is built from one
    ("guest", "vmm"),
    ("config", "machine"),
    ("matrix",),
    ("scenario",),
    ("explore",),
    ("report", "demo"),
    ("cli", "__main__"),
)
SHARED_PROTOCOL = "kvmpoison.matrix.protocol"
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(dotted: str) -> str:
    """``kvmpoison.mm.gup`` -> ``mm``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every ``kvmpoison.*`` module a file imports, with its line (function-level ones too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvmpoison")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0]
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module and node.module.startswith("kvmpoison"):
                found.append((node.lineno, node.module))
    return found


def _violations(me: str, imports: list[tuple[int, str]]) -> list[str]:
    """The imports of a module in layer ``me`` that point up (or out of backends/)."""
    bad = []
    for line, target in imports:
        other = _top(target)
        if me == "backends":
            if other != "backends" and not target.startswith(SHARED_PROTOCOL):
                bad.append(f"line {line}: {target} (backends/ imports nothing of the model)")
        elif other == "backends":
            if RANK[me] < RANK["report"]:
                bad.append(f"line {line}: {target} (only report/ and cli/ use backends/)")
        elif other and RANK[other] > RANK[me]:
            bad.append(f"line {line}: {target} ({other} is above {me})")
    return bad


def _modules() -> list[Path]:
    files = PACKAGE.rglob("*.py")
    return sorted(p for p in files if p.parent != PACKAGE or p.name != "__init__.py")


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert tops - set(RANK) - {"backends"} == set()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    package = ".".join(("kvmpoison", *rel.parent.parts))
    bad = _violations(rel.parts[0].removesuffix(".py"), _imports(path, package))
    assert bad == [], f"{rel} imports upward: {bad}"


def test_the_rule_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text("from . import swapops\n"
                   "def f() -> None:\n    from kvmpoison.virt.kvm import kvm_main\n")
    imports = _imports(src, "kvmpoison.mm")
    assert imports == [(1, "kvmpoison.mm"), (3, "kvmpoison.virt.kvm")]
    assert _violations("mm", imports) == ["line 3: kvmpoison.virt.kvm (virt is above mm)"]
    assert _violations("backends", [(1, "kvmpoison.uapi.errno")]) != []
    assert _violations("backends", [(1, "kvmpoison.matrix.protocol")]) == []
    assert _violations("matrix", [(1, "kvmpoison.backends.kvm.probes")]) != []
    assert _violations("virt", imports) == []
