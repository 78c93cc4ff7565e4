"""``statecopy.deepcopy`` (what ``Machine.copy()`` uses) makes the copy ``copy.deepcopy``
makes: the same state, object for object, for every design and machine shape; values are
shared, and anything it does not know goes to ``copy.deepcopy``."""

import copy
import dataclasses
import enum
import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvmpoison import statecopy
from kvmpoison.config import Config
from kvmpoison.machine import Machine, VmSpec
from kvmpoison.mm.mmap import MAP_ANONYMOUS, MAP_PRIVATE
from test_machine_copy import _graph
from test_share_bulk import assert_same_state

PAGE = 4096


def reference_copy(m: Machine, monkeypatch: pytest.MonkeyPatch) -> Machine:
    """The copy ``copy.deepcopy`` makes, all the way down (the registry too)."""
    monkeypatch.setattr("kvmpoison.mm.page.statecopy.deepcopy", copy.deepcopy)
    memo: dict[int, object] = {}
    twin = random.Random(0)
    twin.setstate(m.kernel.rng.getstate())
    memo[id(m.kernel.rng)] = twin
    ref = copy.deepcopy(m, memo)
    monkeypatch.undo()
    return ref


def busy(m: Machine) -> Machine:
    """Every layer used: guest memory and EPT, a process's PTEs and TLB, fds, a fork."""
    assert m.guest.store(0x40000, b"private").succeeded
    p = m.process("helper")
    addr = p.mmap(0, 4 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS).value
    assert addr is not None and p.store(addr, b"anon").succeeded
    assert p.load(addr, 4).data == b"anon"
    p.pipe()
    child = p.fork()
    assert child.store(addr, b"cow").succeeded
    return m


def booted(design: str) -> Callable[[], Machine]:
    return lambda: busy(Machine(Config(design=design, vm_mem=4 << 20)))


MACHINES: dict[str, Callable[[], Machine]] = {
    **{d: booted(d) for d in ("baseline", "rfc-v1", "rfc-v2", "gmem", "hardened")},
    "file": lambda: busy(Machine(Config(design="baseline", vm_mem=4 << 20, backing="file"))),
    "thp": lambda: Machine(Config(design="baseline"), [VmSpec(memory=4 << 20, backing="anon",
                                                              thp=True)]),
    "two VMs, one file": lambda: Machine(Config(design="rfc-v2"), [
        VmSpec(memory=4 << 20), VmSpec(name="vm1", memory=4 << 20, share_ram_with="vm0")]),
    "forked VMM": lambda: Machine(Config(design="rfc-v1"), [
        VmSpec(memory=4 << 20), VmSpec(name="vm1", memory=4 << 20, fork_of="vm0")]),
}


@pytest.mark.parametrize("shape", MACHINES)
def test_the_copy_is_the_one_deepcopy_makes(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = MACHINES[shape]()
    c = m.copy()
    assert_same_state(c, reference_copy(m, monkeypatch))
    mine, _ = _graph(m)
    theirs, _ = _graph(c)
    assert [type(v).__name__ for k, v in theirs.items() if k in mine] == []  # nothing shared


def _frozen_fields_holding_containers(root: object) -> set[tuple[str, str]]:
    """(class, field) of every frozen dataclass reachable from ``root`` whose field holds a
    dict, list, set or array: what a copy shares instead of copying."""
    found: set[tuple[str, str]] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (int, str, bytes, float, type(None), type)):
            continue
        seen.add(id(obj))
        if dataclasses.is_dataclass(obj) and type(obj).__dataclass_params__.frozen:  # type: ignore[union-attr]
            found |= {(type(obj).__name__, f.name) for f in dataclasses.fields(obj)
                      if isinstance(getattr(obj, f.name), (dict, list, set, np.ndarray))}
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, functools.partial):
            stack += [obj.args, obj.keywords]
        elif hasattr(obj, "__self__"):
            stack.append(obj.__self__)
        else:
            stack += list(vars(obj).values()) if hasattr(obj, "__dict__") else []
            stack += [getattr(obj, n) for c in type(obj).__mro__
                      for n in getattr(c, "__slots__", ()) if hasattr(obj, n)]
    return found


def test_shared_frozen_dataclasses_hold_only_a_table_built_once() -> None:
    """A copy shares frozen dataclasses; the one that holds a container is the page-flag
    table, which ``PageFlagBits.for_config`` builds and nothing changes afterwards."""
    found: set[tuple[str, str]] = set()
    for make in MACHINES.values():
        found |= _frozen_fields_holding_containers(make())
    assert found == {("PageFlagBits", "bit")}


def test_the_comparison_sees_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    m = MACHINES["rfc-v2"]()
    c = m.copy()
    c.kernel.core.cpus[0].tlb.fill(7, 0x1000, 1)
    with pytest.raises(AssertionError):
        assert_same_state(c, reference_copy(m, monkeypatch))


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Value:
    items: tuple[int, ...]


class Plain:
    def __init__(self) -> None:
        self.n = 1
        self.items: list[Any] = [1, "a", Colour.RED]
        self.me = self


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a: list[int] = [1]


class Custom:
    def __init__(self) -> None:
        self.items = [1]
        self.copied_with_state = False

    def __getstate__(self) -> dict[str, Any]:
        return {"items": self.items, "copied_with_state": True}


def test_values_are_shared_and_containers_copied() -> None:
    v = Value((1, 2))
    arr = np.arange(4)
    x: dict[str, Any] = {"v": v, "e": Colour.RED, "s": "str", "t": (1, 2), "n": np.uint64(3),
                         "a": arr, "l": [[1], {2}], "f": frozenset({1})}
    y: dict[str, Any] = statecopy.deepcopy(x, {})
    assert y == {**x, "a": y["a"]} and np.array_equal(y["a"], arr)
    for key in ("v", "e", "s", "t", "n", "f"):
        assert y[key] is x[key], key
    for key in ("a", "l"):
        assert y[key] is not x[key], key
    assert y["l"][0] is not x["l"][0] and y["l"][1] is not x["l"][1]
    y["a"][0] = 9
    assert arr[0] == 0


def test_objects_keep_their_cycles_and_sharing() -> None:
    p = Plain()
    shared = [p, p, (p, 1)]
    c: list[Any] = statecopy.deepcopy(shared, {})
    assert c[0] is c[1] is c[2][0] and c[0] is not p
    assert c[0].me is c[0] and c[0].items == p.items and c[0].items is not p.items
    s = Slotted()
    cs = statecopy.deepcopy(s, {})
    assert cs.a == [1] and cs.a is not s.a and not hasattr(cs, "b")


def test_bound_methods_and_partials_follow_their_objects() -> None:
    p = Plain()
    holder = {"m": p.__class__.__init__.__get__(p), "f": functools.partial(max, p.items), "p": p}
    c: dict[str, Any] = statecopy.deepcopy(holder, {})
    assert c["m"].__self__ is c["p"]
    assert c["f"].func is max and c["f"].args[0] is c["p"].items


def test_other_types_go_to_copy_deepcopy() -> None:
    x = Custom()
    y = statecopy.deepcopy(x, {})
    assert y.copied_with_state and y.items == [1] and y.items is not x.items
    counter = itertools.count(5)
    assert next(statecopy.deepcopy(counter, {})) == 5 and next(counter) == 5
