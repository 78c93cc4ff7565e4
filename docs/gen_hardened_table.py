"""Regenerate the E-case comparison table in docs/hardened.md from the model.

    python3 docs/gen_hardened_table.py          # rewrite the table in place
    python3 docs/gen_hardened_table.py --check  # exit 1 if the table is out of date

Every shipped E-case scenario (``src/kvmpoison/scenario/library/eNN-*.toml``, and
the ones :data:`NAMED` maps to an E-case) is run on rfc-v2, hardened and gmem. A
design's outcome is the cells of the steps
where the designs' expectations differ (the steps that tell designs apart),
in order; a scenario whose steps agree everywhere shows its last step. The
verdict is the scenario's own ``# hardened (VERDICT): ...`` comment line. An
E-case without a scenario gets the reason from :data:`NO_SCENARIO`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kvmpoison.scenario.loader import Scenario, load  # noqa: E402
from kvmpoison.scenario.runner import run_scenario  # noqa: E402

LIBRARY = ROOT / "src" / "kvmpoison" / "scenario" / "library"
DOC = ROOT / "docs" / "hardened.md"
BEGIN = "<!-- BEGIN E-CASE TABLE (docs/gen_hardened_table.py) -->"
END = "<!-- END E-CASE TABLE -->"
DESIGNS = ("rfc-v2", "hardened", "gmem")
VERDICT = re.compile(r"^hardened \((closed|refused|open)\): (.*)$")
NO_SCENARIO = {
    "E12": ("closed", "as E11: the hardened guest makes all of RAM private at every boot, so "
            "a kexec'd kernel inherits no share it does not know of"),
    "E32": ("open", "not modelled: host kexec/kdump; the design's flag and bindings would be "
            "lost like the RFC's"),
    "E40": ("open", "locking and cost: the explorer's business, not a scenario's; the design "
            "drops the mmu_lock scan of shared ranges (one attribute lookup)"),
    "E41": ("open", "a race: needs the explorer's interleavings"),
    "E42": ("open", "a race: needs the explorer's interleavings"),
}

# E-cases whose scenarios are named for their subject, not eNN-*.toml.
NAMED = {
    23: ("thp-protect-4k-in-2m", "thp-protect-thp-head", "thp-huge-zero-page"),
}


def _summary(sc: Scenario) -> dict[str, str]:
    runs = {d: run_scenario(sc, d) for d in DESIGNS}
    telling = [s.index for s in sc.steps
               if len({s.expected(d) for d in sc.designs if s.runs_on(d)}) > 1
               or not all(s.runs_on(d) for d in sc.designs)]
    out: dict[str, str] = {}
    for d, run in runs.items():
        cells = {r.step.index: r.outcome.cell for r in run.results}
        picked = [cells[i] for i in telling if i in cells] or \
            ([run.results[-1].outcome.cell] if run.results else [])
        out[d] = " · ".join(f"`{c}`" for c in picked) or "—"
    return out


def _verdict(sc: Scenario) -> tuple[str, str]:
    for line in sc.comment.splitlines():
        m = VERDICT.match(line.strip())
        if m:
            return m.group(1), m.group(2)
    raise SystemExit(f"{sc.source}: no '# hardened (closed|refused|open): ...' comment line")


def table() -> str:
    rows: dict[int, list[str]] = {}
    for path in sorted(LIBRARY.glob("e[0-9][0-9]-*.toml")):
        sc = load(path)
        n = int(path.name[1:3])
        verdict, why = _verdict(sc)
        s = _summary(sc)
        rows.setdefault(n, []).append(
            f"| E{n} | `{path.stem}` | {s['rfc-v2']} | {s['hardened']} | {s['gmem']} | "
            f"**{verdict}**: {why} |")
    for n, names in NAMED.items():
        for name in names:
            sc = load(LIBRARY / f"{name}.toml")
            verdict, why = _verdict(sc)
            s = _summary(sc)
            rows.setdefault(n, []).append(
                f"| E{n} | `{name}` | {s['rfc-v2']} | {s['hardened']} | {s['gmem']} | "
                f"**{verdict}**: {why} |")
    for case, (verdict, why) in NO_SCENARIO.items():
        n = int(case[1:])
        rows.setdefault(n, []).append(f"| {case} | — | — | — | — | **{verdict}**: {why} |")
    lines = ["| E-case | scenario | rfc-v2 | hardened | gmem | hardened's verdict |",
             "|---|---|---|---|---|---|"]
    for n in sorted(rows):
        lines += rows[n]
    counts = {v: sum(f"**{v}**" in line for line in lines) for v in ("closed", "refused", "open")}
    lines += ["", f"Closed: {counts['closed']}; refused with a defined outcome but not "
              f"supported: {counts['refused']}; open: {counts['open']} (rows, not E-cases: "
              "E13 has two scenarios, E23 three)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the table is out of date")
    args = ap.parse_args()
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if args.check:
        if new != doc:
            print("docs/hardened.md's E-case table is out of date: run "
                  "python3 docs/gen_hardened_table.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
