import json

import pytest

from kvmpoison.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_pte_decode_rfc_vector_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "pte", "decode", "0xdffffffffdb97400", "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["kind"] == "hwpoison"
    assert doc["fields"]["swp_entry_t"] == "0x6c00000000012345"
    assert doc["fields"]["hwpoison_pfn"] == "0x12345"


def test_same_raw_value_is_migration_on_6_18(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        capsys, "pte", "decode", "0xdffffffffdb97400", "--kernel", "6.18", "--format", "json"
    )
    assert rc == 0 and json.loads(out)["kind"] == "migration"


def test_decode_present_and_protnone(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "pte", "decode", "0x8000000012345067", "--format", "json")
    fields = json.loads(out)["fields"]
    assert rc == 0 and fields["pfn"] == "0x12345"
    assert fields["flags"] == "PRESENT|RW|USER|ACCESSED|DIRTY|NX"
    rc, out, _ = run(
        capsys, "pte", "encode", "--present", "0x12345", "--flags", "PROTNONE", "--format", "json"
    )
    doc = json.loads(out)
    assert doc["kind"] == "protnone" and doc["fields"]["pfn"] == "0x12345"


@pytest.mark.parametrize(
    ("args", "kind", "field", "value"),
    [
        (["--hwpoison", "0x12345"], "hwpoison", "swp_entry_t", "0x6c00000000012345"),
        (
            ["--hwpoison", "0x12345", "--kernel", "6.18"],
            "hwpoison",
            "swp_type",
            "24 (SWP_HWPOISON)",
        ),
        (["--marker", "GUARD", "--kernel", "6.18"], "pte_marker", "marker", "GUARD"),
        (["--swap", "3", "0x777"], "swap", "swp_offset", "0x777"),
        (["--present", "0x200", "--level", "pmd"], "present", "pfn", "0x200"),
    ],
)
def test_encode_builds_and_decodes(
    capsys: pytest.CaptureFixture[str], args: list[str], kind: str, field: str, value: str
) -> None:
    rc, out, _ = run(capsys, "pte", "encode", *args, "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["kind"] == kind and doc["fields"][field] == value


def test_encode_then_decode_raw_agree(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "pte", "encode", "--hwpoison", "0xabc", "--format", "json")
    raw = json.loads(out)["raw"]
    _, out2, _ = run(capsys, "pte", "decode", raw, "--format", "json")
    assert json.loads(out2)["fields"]["hwpoison_pfn"] == "0xabc"


def test_ept_decode(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "pte", "decode", "0x12345037", "--level", "ept", "--format", "json")
    fields = json.loads(out)["fields"]
    assert rc == 0 and fields["pfn"] == "0x12345" and fields["memtype"] == "WB"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pte", "decode", "zz"], "not an integer"),
        (["pte", "decode", "0x1", "--kernel", "9.9"], "unknown kernel version"),
        (["pte", "decode", "0x10000000000000000"], "not a 64-bit value"),
        (["pte", "decode", "1", "--level", "pud"], "level must be"),
        (["pte", "encode"], "exactly one of"),
        (["pte", "encode", "--marker", "POISONED"], "no PTE markers"),
        (["pte", "encode", "--marker", "NOPE", "--kernel", "6.18"], "unknown PTE marker"),
        (["pte", "encode", "--present", "1", "--flags", "BOGUS"], "unknown PTE flag"),
        (["pte", "encode", "--swap", "40", "1"], "swap type"),
        (["pte", "encode", "--hwpoison", "1", "--no-memory-failure"], "MEMORY_FAILURE"),
        (["pte", "frobnicate"], "No such command"),
        (["demo", "--format", "yaml"], "yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc, _, err = run(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmpoison: error:")
    assert message in lines[0]
    assert "Traceback" not in err


def test_demo_json_tells_both_stories(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "demo", "--format", "json")
    doc = json.loads(out)
    assert rc == 0
    rfc = {s["action"]: s for s in doc["stories"]["rfc-v2"]}
    assert rfc["load the guest's private page"]["cell"] == "sig:SIGBUS:BUS_MCEERR_AR"
    assert rfc["load the guest's private page"]["si_addr_lsb"] == 12
    assert rfc["process_vm_readv of the private page (GUP)"]["cell"] == "err:EFAULT"
    assert rfc["pread the guest-RAM memfd (page cache)"]["cell"] == "err:EIO"
    assert rfc["load the secret back"]["data"] == "TD secret: 42 42"
    assert rfc["virtio device reads the request from swiotlb"]["data"] == "GET /index.html"
    base = doc["stories"]["baseline"]
    assert base[-1]["cell"] == "mce:td-fatal" and base[-1]["mci_status"] == "0xbd80000000000134"
    # gmem: the VMM's address of a private gfn is its shared memfd page, not the guest's data
    assert doc["summary"]["process_vm_readv"] == {"baseline": "ret:8", "rfc-v1": "ret:8",
                                                  "rfc-v2": "err:EFAULT", "gmem": "ret:8",
                                                  "hardened": "err:EFAULT"}


def test_demo_one_design_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "demo", "--design", "rfc-v1")
    assert rc == 0 and "design rfc-v1" in out and "design rfc-v2" not in out


def test_demo_rejects_unknown_design(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "demo", "--design", "nope")
    assert rc == 2 and err.startswith("kvmpoison: error: unknown design")
