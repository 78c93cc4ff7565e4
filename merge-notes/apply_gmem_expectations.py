"""Re-apply branch gmem's scenario expectations to the library after a merge.

Where main and gmem both edited an expectation line, resolve the TOML
conflicts by taking main's side, then run (from the repository root):

    python3 merge-notes/apply_gmem_expectations.py [--branch gmem]

For every shipped scenario it reads the branch's version (``git show``),
takes each step's ``gmem`` expectation and the ``# gmem:`` comment, and adds
them to the working-tree file where they are missing (steps are matched by
index and must have the same actor and op). Scenarios the branch does not
know, and steps whose cell under gmem is not yet written, are listed at the
end for a human to decide. Idempotent. Delete merge-notes/ when done.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

LIB = Path("src/kvmpoison/scenario/library")


def git_show(branch: str, path: Path) -> str | None:
    got = subprocess.run(["git", "show", f"{branch}:{path}"], capture_output=True, text=True,
                         check=False)
    return got.stdout if got.returncode == 0 else None


def spans(lines: list[str]) -> list[tuple[int, int]]:
    idx = [i for i, line in enumerate(lines) if line.strip() == "[[step]]"]
    return [(s, idx[k + 1] if k + 1 < len(idx) else len(lines)) for k, s in enumerate(idx)]


def set_gmem(lines: list[str], lo: int, hi: int, key: str, value: str) -> bool:
    for i in range(lo, hi):
        m = re.match(rf"^{key}\s*=\s*(.*)$", lines[i])
        if not m:
            continue
        rhs = m.group(1).strip()
        cur = tomllib.loads(f"x = {rhs}")["x"]
        if isinstance(cur, dict):
            if "gmem" in cur:
                return False
            lines[i] = f'{key} = {rhs[:-1].rstrip()}, gmem = "{value}" }}'
        else:
            if cur == value:
                return False
            lines[i] = f'{key} = {{ "*" = {rhs}, gmem = "{value}" }}'
        return True
    for i in range(lo, hi):  # no such key yet: add one after the step's arguments
        if lines[i].startswith("op ="):
            j = i + 1
            while j < hi and lines[j].strip() and not lines[j].startswith(("#", "expect")):
                j += 1
            lines.insert(j, f'{key} = {{ gmem = "{value}" }}')
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--branch", default="gmem")
    args = ap.parse_args()
    todo: list[str] = []
    for path in sorted(LIB.glob("*.toml")):
        mine = git_show(args.branch, path)
        text = path.read_text()
        if "<<<<<<<" in text:
            todo.append(f"{path}: still has conflict markers (take main's side first)")
            continue
        if mine is None:
            todo.append(f"{path}: not on branch {args.branch}: give it gmem expectations")
            continue
        ours = tomllib.loads(mine).get("step", [])
        theirs = tomllib.loads(text).get("step", [])
        lines = text.split("\n")
        if not any(line.startswith("# gmem:") for line in lines):
            mine_lines = mine.split("\n")
            start = next((k for k, line in enumerate(mine_lines) if line.startswith("# gmem:")),
                         None)
            if start is not None:
                end = start + 1
                while end < len(mine_lines) and mine_lines[end].startswith("#"):
                    end += 1
                at = next(k for k, line in enumerate(lines) if line.startswith("[scenario]"))
                lines[at:at] = mine_lines[start:end]
        for n, (step_ours, step_theirs) in reversed(list(enumerate(zip(ours, theirs,
                                                                        strict=False), 1))):
            def call_args(step: dict[str, object]) -> dict[str, object]:
                return {k: v for k, v in step.items() if k not in ("expect", "expect_data")}

            if call_args(step_ours) != call_args(step_theirs):
                todo.append(f"{path}: step {n}'s arguments changed on main: give it its gmem "
                            "expectation by hand")
                continue
            lo, hi = spans(lines)[n - 1]
            for key in ("expect_data", "expect"):
                want = step_ours.get(key)
                value = want.get("gmem", want.get("*")) if isinstance(want, dict) else want
                if isinstance(value, str):
                    set_gmem(lines, lo, hi, key, value)
                    lo, hi = spans(lines)[n - 1]
        path.write_text("\n".join(lines))
        if len(theirs) > len(ours):
            todo.append(f"{path}: steps {len(ours) + 1}.. are new: give them gmem expectations")
    for line in todo:
        print(line)
    return 1 if todo else 0


if __name__ == "__main__":
    sys.exit(main())
