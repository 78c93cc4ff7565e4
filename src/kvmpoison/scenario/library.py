"""The shipped scenario library (installed with the package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped() -> dict[str, Path]:
    """Shipped scenarios by name (the file's stem), sorted."""
    root = resources.files("kvmpoison.scenario") / "library"
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def title_of(path: Path) -> str:
    """The first comment line: what the scenario is about."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
