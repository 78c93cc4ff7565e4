"""The docs in the repository: examples that run, references that resolve, nothing outside."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpoison.explore import scenario_monitor
from kvmpoison.outcome import Kind, McKind
from kvmpoison.scenario.loader import load_text
from kvmpoison.scenario.ops import OPS
from kvmpoison.scenario.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCENARIOS_MD = DOCS / "scenarios.md"
LINK = re.compile(r"\]\(([^)]+)\)")


def toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(toml_blocks(SCENARIOS_MD))))
def test_every_scenario_example_runs_and_meets_its_expectations(index: int) -> None:
    text = toml_blocks(SCENARIOS_MD)[index]
    sc = load_text(text, f"docs/scenarios.md example {index + 1}")
    for design in sc.designs:
        run = run_scenario(sc, design, monitor=scenario_monitor(sc))
        failed = [(r.step.index, r.outcome.cell, r.expected) for r in run.results if not r.ok]
        assert not failed, (design, failed)
        assert not run.violations, (design, run.violations)


def test_every_op_is_documented() -> None:
    text = SCENARIOS_MD.read_text()
    missing = sorted({op for _, op in OPS if f"`{op}`" not in text})
    assert not missing, f"docs/scenarios.md does not describe: {', '.join(missing)}"


def test_every_op_kind_has_an_example() -> None:
    """Each op outside the matrix paths appears in at least one example as ``op = "..."``."""
    from kvmpoison.matrix import protocol

    examples = "".join(toml_blocks(SCENARIOS_MD))
    missing = sorted({op for _, op in OPS
                      if op not in protocol.PATHS and f'op = "{op}"' not in examples})
    assert not missing, f"no example in docs/scenarios.md for: {', '.join(missing)}"


def test_matrix_legend_covers_every_cell_kind() -> None:
    legend = (DOCS / "matrix.md").read_text().split("## Cell notation", 1)[1]
    kinds = {k.value for k in Kind} - {"mce"}
    for word in sorted(kinds) + [f"mce:{m.value}" for m in McKind] + ["livelock:mce"]:
        assert f"| `{word}" in legend, word


def shipped_markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", shipped_markdown(), ids=lambda p: p.name)
def test_links_stay_inside_the_repository(path: Path) -> None:
    text = path.read_text()
    assert "../shared" not in text and "shared/design" not in text
    assert not re.search(r"https?://", text), "no links to outside sites"
    for target in LINK.findall(text):
        target = target.split("#", 1)[0]
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), target
        assert resolved.exists(), target


def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("architecture", "matrix", "scenarios", "designs", "fidelity"):
        assert f"(docs/{name}.md)" in readme, name


def test_readme_first_lines_are_what_ci_runs() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[1] == "python3 -m pip install -e '.[dev]' && kvmpoison demo"
    assert lines[2] == "python3 -m pytest"


def test_the_function_index_is_current() -> None:
    """docs/architecture.md's index of modelled kernel functions matches the code."""
    script = ROOT / "docs" / "gen_function_index.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
