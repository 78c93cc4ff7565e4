"""A shrunk violation as a scenario TOML that ``kvmpoison run`` replays and fails.

The file names the design, checks the violated invariant after every step
(``[scenario] invariants``) and expects every step's cell as the explorer saw it.
"""

from __future__ import annotations

import json
from typing import Any

from kvmpoison.explore.invariants import INVARIANTS
from kvmpoison.explore.monitor import InvariantMonitor
from kvmpoison.explore.statemachine import Recorded, machine_header
from kvmpoison.scenario.loader import load_text
from kvmpoison.scenario.runner import run_scenario


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:#x}" if v >= 0x1000 else str(v)
    return json.dumps(str(v))  # a TOML basic string for ASCII text


def reproducer_toml(design: str, name: str, problems: list[str], steps: list[Recorded],
                    found_by: str, shrunk_by: str = "hypothesis") -> str:
    inv = problems[0].partition(":")[0]
    meaning = INVARIANTS[inv].meaning if inv in INVARIANTS else \
        "the model raised an exception (a bug of the model, not of the design)"
    checked = f"[\"{inv}\"]" if inv in INVARIANTS else "[]"
    lines = [f"# {inv}: {meaning}",
             f"# Found by {found_by}; shrunk by {shrunk_by}. The last step breaks it:"]
    lines += [f"#   {p}" for p in problems]
    lines += ["# `kvmpoison run` replays it and fails naming the invariant.",
              "[scenario]", f"name = {json.dumps(name)}", f"designs = [\"{design}\"]",
              f"invariants = {checked}", "", machine_header(design)]
    for actor, op, args, cell in steps:
        lines += ["[[step]]", f"actor = \"{actor}\"", f"op = \"{op}\""]
        lines += [f"{k} = {_value(v)}" for k, v in args.items()]
        if cell != "raises":  # the step that makes the model raise has no cell
            lines.append(f"expect = {{ {design} = \"{cell}\" }}")
        lines.append("")
    return "\n".join(lines)


def replay(text: str, design: str, source: str = "<reproducer>") -> list[tuple[int, str]]:
    """The violations a reproducer's replay reports (what ``kvmpoison run`` would print)."""
    sc = load_text(text, source)
    return run_scenario(sc, design, monitor=InvariantMonitor(sc.invariants)).violations
