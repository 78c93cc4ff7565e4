"""Regenerate the function index at the end of docs/architecture.md from the source.

    python3 docs/gen_function_index.py          # rewrite the index in place
    python3 docs/gen_function_index.py --check  # exit 1 if the index is out of date

For every module of the kernel-shaped layers it lists the kernel source files its
docstring says it follows, and its public functions and methods (kernel names are
kept verbatim, so ``__swp_entry`` and ``do_swap_page`` appear as in the kernel).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "kvmpoison"
DOC = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- BEGIN FUNCTION INDEX (docs/gen_function_index.py) -->"
END = "<!-- END FUNCTION INDEX -->"
LAYERS = ("arch", "mm", "fs", "kernel", "drivers", "virt", "uapi")
KERNEL_FILE = re.compile(
    r"(?<![\w/.])((?:arch|mm|fs|kernel|virt|include|drivers|lib|block|ipc)/[\w/.-]+\.[ch])\b")


def _kernel_name(name: str) -> bool:
    """Public names, and the kernel's own ``__name`` helpers (not Python dunders)."""
    return not name.startswith("_") or (name.startswith("__") and not name.endswith("__"))


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
               for d in fn.decorator_list)


def module_entry(path: Path) -> tuple[str, list[str], list[str]] | None:
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and _kernel_name(node.name):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            names += [f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, ast.FunctionDef) and _kernel_name(m.name)
                      and not _is_property(m)]
    if not names:
        return None
    text = " ".join(ast.get_docstring(n) or "" for n in ast.walk(tree)
                    if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef))
    files = sorted(set(KERNEL_FILE.findall(text)))
    return str(path.relative_to(SRC)), files, names


def index() -> str:
    lines = [BEGIN, ""]
    for layer in LAYERS:
        entries = [e for p in sorted((SRC / layer).rglob("*.py"))
                   if (e := module_entry(p)) is not None]
        if not entries:
            continue
        lines += [f"### {layer}/", "", "| module | follows | functions |", "|---|---|---|"]
        for module, files, names in entries:
            follows = ", ".join(f"`{f}`" for f in files) or "(model only)"
            lines.append(f"| `{module}` | {follows} | {', '.join(f'`{n}`' for n in names)} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether it is up to date")
    args = ap.parse_args()
    doc = DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = head + index() + tail
    if args.check:
        if new != doc:
            print(f"{DOC}: the function index is out of date; run {sys.argv[0]}")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
