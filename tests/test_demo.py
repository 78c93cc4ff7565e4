"""The demo shows the mechanism: the page's PTE, struct page and EPT entry, per design."""

import json

import pytest

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.cli.main import main
from kvmpoison.demo import SECRET, SECRET_GPA, Step, run_story
from kvmpoison.designs import DESIGNS
from kvmpoison.outcome import Outcome

RFC = ("rfc-v1", "rfc-v2")


@pytest.fixture(scope="module")
def stories() -> dict[str, list[Step]]:
    return {d: run_story(d) for d in DESIGNS}


def test_every_design_runs_the_same_numbered_steps(stories: dict[str, list[Step]]) -> None:
    shapes = {d: [(s.number, s.actor, s.action) for s in steps] for d, steps in stories.items()}
    first = next(iter(shapes.values()))
    assert [n for n, _, _ in first] == list(range(1, len(first) + 1))
    assert all(shape == first for shape in shapes.values())


def test_before_protection_the_vmm_maps_the_page(stories: dict[str, list[Step]]) -> None:
    for d, steps in stories.items():
        before = steps[1].page
        assert before is not None and before.gpa == SECRET_GPA
        assert before.pte.kind == "present" and not before.hwpoison
        assert before.mapcount == 1 and before.ept is None, d


@pytest.mark.parametrize("design", RFC)
def test_protection_turns_the_pte_into_a_hwpoison_entry_and_the_ept_keeps_the_frame(
        stories: dict[str, list[Step]], design: str) -> None:
    before, after = stories[design][1].page, stories[design][2].page
    assert before is not None and after is not None and after.ept is not None
    fields = {f.name: f.value for f in after.pte.fields}
    assert after.pte.kind == "hwpoison" and "SWP_HWPOISON" in fields["swp_type"]
    assert int(fields["hwpoison_pfn"], 16) == after.pfn == before.pfn
    assert after.hwpoison and "PG_hwpoison" in after.flags and after.mapcount == 0
    assert after.refcount >= 2  # page cache + the hwpoison entry's reference (patch 10)
    ept = {f.name: f.value for f in after.ept.fields}
    assert int(ept["pfn"], 16) == after.pfn and ept["present"] == "true"
    assert stories[design][-1].outcome.data == SECRET  # the guest still reads its data


def test_baseline_keeps_the_page_mapped_and_the_td_dies(stories: dict[str, list[Step]]) -> None:
    after = stories["baseline"][2].page
    assert after is not None
    assert after.pte.kind == "present" and not after.hwpoison and after.mapcount == 1
    assert stories["baseline"][-1].outcome.cell == "mce:td-fatal"


def _gup(steps: list[Step]) -> Outcome:
    return next(s for s in steps if "process_vm_readv" in s.action).outcome


def test_rfc_v2_closes_gup_and_rfc_v1_does_not(stories: dict[str, list[Step]]) -> None:
    gup = {d: _gup(steps) for d, steps in stories.items()}
    assert gup["rfc-v2"].cell == "err:EFAULT" and gup["rfc-v1"].cell == "ret:8"
    assert gup["rfc-v1"].data == bytes(8)  # TDX hands the host zeros
    plain = _gup(run_story("rfc-v1", integrity=IntegrityMode.OFF))
    assert plain.cell == "ret:8" and plain.data == SECRET[:8]  # the v1 hole, on plain KVM


def test_the_default_demo_shows_every_design(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for d in DESIGNS:
        assert f"design {d}" in out
    assert out.count("VMM PTE") == 3 * len(DESIGNS) and "SWP_HWPOISON" in out
    widest = max(len(line.rstrip()) for line in out.splitlines())
    assert widest <= 80 and "…" not in out


def test_demo_json_carries_the_page_views(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--design", "rfc-v1", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    page = doc["stories"]["rfc-v1"][2]["page"]
    assert page["pte"]["kind"] == "hwpoison" and page["PG_hwpoison"] is True
    assert page["ept"]["fields"]["pfn"] == page["pfn"] and page["mapcount"] == 0
