"""Scenario files: TOML in, validated :class:`Scenario` out.

A scenario has a ``[scenario]`` table (name, title, designs), a ``[machine]``
table, ``[[vm]]`` tables and an ordered list of ``[[step]]`` tables. Every
problem is reported as a :class:`ScenarioError` naming the file and the step.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvmpoison.arch.x86.integrity import IntegrityMode
from kvmpoison.config import parse_integrity
from kvmpoison.designs import DESIGNS
from kvmpoison.kconfig import KernelConfig, KernelVersion
from kvmpoison.outcome import is_cell
from kvmpoison.scenario.ops import ACTOR_KINDS, OPS, REF_ARGS, SAVES_REF, OpError, parse_ref
from kvmpoison.scenario.units import (
    MACHINE_MEMORY_MAX,
    MACHINE_MEMORY_MIN,
    VM_MEMORY_MAX,
    parse_size,
)

# The CONFIG_* switches a scenario may set in [machine], by KernelConfig field name.
CONFIG_SWITCHES = tuple(f.name for f in fields(KernelConfig) if f.type in (bool, "bool"))

class ScenarioError(Exception):
    """Bad scenario input: one clear line, naming the file and the step."""

    def __init__(self, source: str, message: str, step: int | None = None):
        where = f"{source}: step {step}" if step is not None else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class MachineSpec:
    kernel: KernelVersion | None = None
    config: dict[str, bool] = field(default_factory=dict)  # CONFIG_* overrides
    integrity: IntegrityMode | None = None
    mac_bits: int = 28
    memory: int = 64 << 20
    seed: int = 0
    kvm_id_bits: int = 63
    seam_nr: bool = True
    thp: str | None = None  # THP "enabled" mode: always, madvise or never
    tdp: bool = True  # kvm_intel's ept module parameter; false: shadow paging (E27)


@dataclass(frozen=True)
class VmDecl:
    name: str
    memory: int = 4 << 20
    backing: str = "memfd"
    share_ram_with: str | None = None
    thp: bool = False  # anonymous RAM, 2 MiB-aligned, MADV_HUGEPAGE


@dataclass(frozen=True)
class Step:
    index: int
    actor: str  # "guest:NAME", "vmm:NAME", "host", "hw"
    op: str
    args: dict[str, Any]
    expect: dict[str, str]  # design -> cell ("*" for every design)
    expect_data: dict[str, str]
    save: str | None
    designs: tuple[str, ...] | None = None  # the designs this step runs on (None: all)
    # design -> the violation this step reports there: an invariant of [scenario] invariants
    # ("I4"), or the start of its problem ("I4: pfn 0x17: refcount -1021")
    expect_violation: dict[str, str] = field(default_factory=dict)

    def runs_on(self, design: str) -> bool:
        return self.designs is None or design in self.designs

    def expected(self, design: str) -> str | None:
        return self.expect.get(design, self.expect.get("*"))

    def expected_data(self, design: str) -> str | None:
        return self.expect_data.get(design, self.expect_data.get("*"))

    def expected_violation(self, design: str) -> str | None:
        return self.expect_violation.get(design, self.expect_violation.get("*"))


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    source: str
    designs: tuple[str, ...]
    machine: MachineSpec
    vms: tuple[VmDecl, ...]
    steps: tuple[Step, ...]
    comment: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    invariants: tuple[str, ...] = ()  # checked after every step (kvmpoison.explore names them)


def _table(doc: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ScenarioError(source, f"[{key}] must be a table")
    return value


def _per_design(value: Any, what: str, source: str, index: int, cells: bool) -> dict[str, str]:
    if value is None:
        return {}
    table = {"*": value} if isinstance(value, str) else value
    if not isinstance(table, dict):
        raise ScenarioError(source, f"{what} must be a string or a table of designs", index)
    out = {}
    for design_name, text in table.items():
        if design_name != "*" and design_name not in DESIGNS:
            raise ScenarioError(source, f"{what} names unknown design {design_name!r}", index)
        if not isinstance(text, str):
            raise ScenarioError(source, f"{what}.{design_name} must be a string", index)
        if cells and not is_cell(text):
            raise ScenarioError(source, f"expectation {text!r} is not a cell (see docs/matrix.md: "
                                "ok, ret:N, err:NAME, sig:SIG:CODE, vec:B, mce:KIND, shutdown, "
                                "panic)", index)
        out[design_name] = text
    return out


def _check_data_ref(want: str, saved: set[str], source: str, index: int) -> None:
    """``expect_data`` is text, ``hex:...`` or ``$name`` of a value an earlier step saved."""
    if want.startswith("$") and want[1:] not in saved:
        raise ScenarioError(source, f"expect_data {want!r} names no value an earlier step saved",
                            index)
    if want.startswith("hex:"):
        try:
            bytes.fromhex(want[4:])
        except ValueError:
            raise ScenarioError(source, f"expect_data {want!r} is not valid hex", index) from None


def _machine_int(m: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """An integer [machine] setting from ``lo`` to ``hi``."""
    value = m.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def _machine(doc: dict[str, Any], source: str) -> MachineSpec:
    m = _table(doc, "machine", source)
    known = {"kernel", "integrity", "mac_bits", "memory", "seed", "kvm_id_bits", "seam_nr",
             "thp", "tdp", *CONFIG_SWITCHES}
    unknown = set(m) - known
    if unknown:
        raise ScenarioError(source, f"[machine] has unknown keys: {', '.join(sorted(unknown))} "
                            f"(CONFIG switches: {', '.join(CONFIG_SWITCHES)})")
    for name in CONFIG_SWITCHES:
        if name in m and not isinstance(m[name], bool):
            raise ScenarioError(source, f"[machine] {name} is a CONFIG switch: true or false")
    if "thp" in m and m["thp"] not in ("always", "madvise", "never"):
        raise ScenarioError(source, "[machine] thp must be \"always\", \"madvise\" or \"never\"")
    if not isinstance(m.get("seam_nr", True), bool):
        raise ScenarioError(source, "[machine] seam_nr must be true or false")
    if not isinstance(m.get("tdp", True), bool):
        raise ScenarioError(source, "[machine] tdp must be true or false (false: shadow paging)")
    try:
        return MachineSpec(
            kernel=KernelVersion.parse(str(m["kernel"])) if "kernel" in m else None,
            config={name: m[name] for name in CONFIG_SWITCHES if name in m},
            integrity=parse_integrity(str(m["integrity"])) if "integrity" in m else None,
            mac_bits=_machine_int(m, "mac_bits", 28, 1, 256),
            memory=parse_size(m.get("memory", 64 << 20), "machine.memory", MACHINE_MEMORY_MIN,
                              MACHINE_MEMORY_MAX),
            seed=_machine_int(m, "seed", 0, 0, (1 << 64) - 1),
            kvm_id_bits=_machine_int(m, "kvm_id_bits", 63, 1, 63),
            seam_nr=m.get("seam_nr", True),
            thp=m.get("thp"),
            tdp=m.get("tdp", True),
        )
    except ValueError as exc:
        raise ScenarioError(source, f"[machine]: {exc}") from None


def _vms(doc: dict[str, Any], source: str) -> tuple[VmDecl, ...]:
    raw = doc.get("vm", [{"name": "vm0"}])
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(source, "[[vm]] must be a non-empty array of tables")
    out = []
    for i, v in enumerate(raw):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise ScenarioError(source, f"[[vm]] #{i + 1} needs a name")
        backing = v.get("backing", "memfd")
        if backing not in ("memfd", "anon", "file"):
            raise ScenarioError(source, f"vm {v['name']!r}: backing must be memfd, anon or file")
        thp = v.get("thp", False)
        if not isinstance(thp, bool):
            raise ScenarioError(source, f"vm {v['name']!r}: thp must be true or false")
        if thp and (backing != "anon" or v.get("share_ram_with") is not None):
            raise ScenarioError(source, f"vm {v['name']!r}: thp = true needs backing = \"anon\" "
                                "(private anonymous RAM with MADV_HUGEPAGE; shmem THP is "
                                "another case)")
        try:
            memory = parse_size(v.get("memory", 4 << 20), f"vm {v['name']!r} memory",
                                hi=VM_MEMORY_MAX)
        except ValueError as exc:
            raise ScenarioError(source, str(exc)) from None
        out.append(VmDecl(v["name"], memory, backing, v.get("share_ram_with"), thp))
        if v.get("share_ram_with") is not None and v["share_ram_with"] not in \
                [d.name for d in out[:-1]]:
            raise ScenarioError(source, f"vm {v['name']!r}: share_ram_with names no earlier vm")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ScenarioError(source, "two [[vm]] tables share a name")
    return tuple(out)


def _steps(doc: dict[str, Any], source: str, vms: tuple[VmDecl, ...],
           invariants: tuple[str, ...] = ()) -> tuple[Step, ...]:
    raw = doc.get("step", [])
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(source, "a scenario needs at least one [[step]]")
    names = {v.name for v in vms}
    names |= {str(s.get("name")) for s in raw if isinstance(s, dict) and s.get("op") == "new_vm"}
    steps = []
    saved: set[str] = set()
    refs: set[str] = set()  # fds and addresses saved by guest_memfd_create and mmap
    for i, s in enumerate(raw, 1):
        if not isinstance(s, dict):
            raise ScenarioError(source, "a [[step]] must be a table", i)
        actor, op = s.get("actor"), s.get("op")
        if not isinstance(actor, str) or not isinstance(op, str):
            raise ScenarioError(source, "a step needs 'actor' and 'op' strings", i)
        kind, _, who = actor.partition(":")
        if kind not in ACTOR_KINDS:
            raise ScenarioError(source, f"unknown actor {actor!r} (guest:NAME, vmm:NAME, host, "
                                "hw)", i)
        if kind in ("guest", "vmm") and who not in names:
            raise ScenarioError(source, f"actor {actor!r} names no [[vm]]", i)
        spec = OPS.get((kind, op))
        if spec is None:
            known = ", ".join(sorted(o for k, o in OPS if k == kind))
            raise ScenarioError(source, f"unknown operation {op!r} for {kind} (known: {known})", i)
        args = {k: v for k, v in s.items()
                if k not in ("actor", "op", "expect", "expect_data", "expect_violation", "save",
                             "note", "designs")}
        missing = [a for a in spec.required if a not in args]
        if missing:
            raise ScenarioError(source, f"{op} needs {', '.join(missing)}", i)
        unknown = set(args) - set(spec.required) - set(spec.optional)
        if unknown:
            raise ScenarioError(source, f"{op} does not take {', '.join(sorted(unknown))}", i)
        for ref in ("vm", "target"):
            if ref in args and spec.refers_to_vm:
                name = str(args[ref]).removeprefix("vmm:").removeprefix("guest:")
                if name not in names and op != "new_vm":
                    raise ScenarioError(source, f"{ref} {args[ref]!r} names no [[vm]]", i)
        save = s.get("save")
        if save is not None and not (isinstance(save, str) and save.isidentifier()):
            raise ScenarioError(source, "save must be a name (letters, digits, _)", i)
        expect_data = _per_design(s.get("expect_data"), "expect_data", source, i, cells=False)
        for want in expect_data.values():
            _check_data_ref(want, saved, source, i)
        for key in REF_ARGS:
            if isinstance(args.get(key), str):
                try:
                    ref, _ = parse_ref(args[key])
                except OpError as exc:
                    raise ScenarioError(source, str(exc), i) from None
                if ref not in refs:
                    raise ScenarioError(source, f"{key} {args[key]!r} names no fd or address an "
                                        f"earlier step saved ({', '.join(SAVES_REF)} save one)",
                                        i)
        if save is not None:
            saved.add(save)
            if op in SAVES_REF:
                refs.add(save)
        only = _designs(s, source, f"step {i}'s designs") if "designs" in s else None
        breaks = _per_design(s.get("expect_violation"), "expect_violation", source, i,
                             cells=False)
        if "expect_violation" in s and not breaks:
            raise ScenarioError(source, "expect_violation names no design", i)
        for design_name, text in breaks.items():
            if text.partition(":")[0] not in invariants:
                raise ScenarioError(source, f"expect_violation {text!r} names no invariant of "
                                    f"[scenario] invariants ({', '.join(invariants) or 'none'})",
                                    i)
            if only is not None and design_name != "*" and design_name not in only:
                raise ScenarioError(source, f"expect_violation names {design_name}, which the "
                                    f"step does not run on ({', '.join(only)})", i)
        steps.append(Step(i, actor, op, args,
                          _per_design(s.get("expect"), "expect", source, i, cells=True),
                          expect_data, save, only, breaks))
    return tuple(steps)


def _designs(head: dict[str, Any], source: str, what: str = "[scenario] designs"
             ) -> tuple[str, ...]:
    """``designs = "rfc-v2"`` or ``designs = ["baseline", "rfc-v2"]``: at least one, all known.

    A step may name designs too: it then runs on those only (a step that cannot
    exist on a design, such as one on a VM the design refused to create)."""
    raw = head.get("designs", list(DESIGNS))
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(d, str) for d in names):
        raise ScenarioError(source, f"{what} must be a design name or a list of names")
    if not names:
        raise ScenarioError(source, f"{what} is empty: name at least one of "
                            f"{', '.join(DESIGNS)}")
    for d in names:
        if d not in DESIGNS:
            raise ScenarioError(source, f"unknown design {d!r} (known: {', '.join(DESIGNS)})")
    return tuple(dict.fromkeys(names))


def load_text(text: str, source: str) -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested table or array
        raise ScenarioError(source, "not valid TOML: tables or arrays nested too deeply") from None
    head = _table(doc, "scenario", source)
    designs = _designs(head, source)
    unknown = set(doc) - {"scenario", "machine", "vm", "step"}
    if unknown:
        raise ScenarioError(source, f"unknown top-level tables: {', '.join(sorted(unknown))}")
    vms = _vms(doc, source)
    invariants = head.get("invariants", [])
    if not isinstance(invariants, list) or not all(isinstance(i, str) for i in invariants):
        raise ScenarioError(source, "[scenario] invariants must be a list of names like \"I1\"")
    comment = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return Scenario(name=str(head.get("name", Path(source).stem)),
                    title=str(head.get("title", "")), source=source, designs=designs,
                    machine=_machine(doc, source), vms=vms,
                    steps=_steps(doc, source, vms, tuple(invariants)),
                    comment=comment, invariants=tuple(invariants))


# A scenario is a page or two of TOML; anything this big is not one.
SCENARIO_MAX_BYTES = 1 << 20


def read_scenario_file(path: Path) -> str:
    """The file's text: a regular file of at most SCENARIO_MAX_BYTES, in UTF-8.

    Devices and FIFOs are refused before anything is read (``/dev/zero`` never
    ends). The open is non-blocking, so a FIFO without a writer cannot hang it,
    and the read is capped.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ScenarioError(source, "not a regular file")
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(SCENARIO_MAX_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(short_path(source), f"cannot read: {exc.strerror}") from None
    if len(raw) > SCENARIO_MAX_BYTES:
        raise ScenarioError(source, f"larger than {SCENARIO_MAX_BYTES} bytes: not a scenario")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ScenarioError(source, "not a text file (UTF-8)") from None


def short_path(source: str, keep: int = 120) -> str:
    """A path for an error line: very long names are cut in the middle."""
    return source if len(source) <= keep else f"{source[:keep // 2]}...{source[-keep // 2:]}"


def load(path: Path) -> Scenario:
    return load_text(read_scenario_file(path), str(path))
