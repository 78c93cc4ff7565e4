"""Deep copies of the model's state: what ``copy.deepcopy`` makes, made cheaper.

``Machine.copy()`` copies a graph of a few hundred objects (processes, VMAs, page-table
nodes, KVM's VMs, dicts and lists of ints) and the arrays they hold. The standard
``copy.deepcopy`` builds each object through the pickle protocol (``__reduce_ex__``, a
state dict, ``__dict__.update``) and runs its dispatch for every int and str it meets.
:func:`deepcopy` gives the same copy for the types the model uses:

- values are shared, not copied: ints, strs, bytes, ``None``, enum members, numpy
  scalars, functions and classes (as ``copy.deepcopy`` does), and instances of frozen
  dataclasses (configs, specs, reports: the model never changes one in place);
- dicts, lists, sets and tuples are rebuilt element by element, values taken as they are;
- numpy arrays are copied whole (``ndarray.copy``), bound methods and ``functools.partial``
  are rebound to the copies of what they hold;
- an instance of a plain class (no ``__reduce__``, ``__getstate__`` or ``__setstate__`` of
  its own) is made with ``cls.__new__`` and given copies of its attributes;
- a class's own ``__deepcopy__`` is called as ``copy.deepcopy`` would; anything else goes
  to ``copy.deepcopy`` itself, with the same memo.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

Memo = dict[int, Any]
_T = TypeVar("_T")
_Handler = Callable[[Any, Memo], Any]

# Types whose instances a copy shares (filled in as types are met).
_SHARED: set[type] = {int, float, complex, bool, str, bytes, type(None), range, type,
                      types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
                      type(Ellipsis), type(NotImplemented)}
_HANDLERS: dict[type, _Handler] = {}


def deepcopy(x: _T, memo: Memo) -> _T:
    """A copy of ``x`` sharing no mutable state with it; ``memo`` maps the ids of objects
    copied so far to their copies (as ``copy.deepcopy``'s memo)."""
    cls = type(x)
    if cls in _SHARED:
        return x
    done = memo.get(id(x))
    if done is not None:
        return done  # type: ignore[no-any-return]
    handler = _HANDLERS.get(cls)
    if handler is None:
        handler = _classify(cls)
        if handler is _share:
            return x
    return handler(x, memo)  # type: ignore[no-any-return]


def _share(x: object, memo: Memo) -> object:
    return x


def _copy_dict(x: dict[Any, Any], memo: Memo) -> dict[Any, Any]:
    y: dict[Any, Any] = {}
    memo[id(x)] = y
    shared = _SHARED
    for k, v in x.items():
        y[k if type(k) in shared else deepcopy(k, memo)] = \
            v if type(v) in shared else deepcopy(v, memo)
    return y


def _copy_list(x: list[Any], memo: Memo) -> list[Any]:
    y: list[Any] = []
    memo[id(x)] = y
    shared = _SHARED
    y.extend(v if type(v) in shared else deepcopy(v, memo) for v in x)
    return y


def _copy_tuple(x: tuple[Any, ...], memo: Memo) -> tuple[Any, ...]:
    shared = _SHARED
    items = [v if type(v) in shared else deepcopy(v, memo) for v in x]
    # A tuple of a tuple that holds it: copy.deepcopy's rule, the copy made first wins.
    done = memo.get(id(x))
    if done is not None:
        return done  # type: ignore[no-any-return]
    if all(a is b for a, b in zip(items, x, strict=True)):
        return x
    y = tuple(items)
    memo[id(x)] = y
    return y


def _copy_set(x: set[Any], memo: Memo) -> set[Any]:
    shared = _SHARED
    y = {v if type(v) in shared else deepcopy(v, memo) for v in x}
    memo[id(x)] = y
    return y


def _copy_frozenset(x: frozenset[Any], memo: Memo) -> frozenset[Any]:
    shared = _SHARED
    if all(type(v) in shared for v in x):
        return x
    y = frozenset(deepcopy(v, memo) for v in x)
    memo[id(x)] = y
    return y


def _copy_array(x: np.ndarray[Any, Any], memo: Memo) -> np.ndarray[Any, Any]:
    if x.dtype.hasobject:
        return copy.deepcopy(x, memo)
    y = x.copy()
    memo[id(x)] = y
    return y


def _copy_method(x: types.MethodType, memo: Memo) -> types.MethodType:
    y = types.MethodType(x.__func__, deepcopy(x.__self__, memo))
    memo[id(x)] = y
    return y


def _copy_partial(x: functools.partial[Any], memo: Memo) -> functools.partial[Any]:
    if type(x) is not functools.partial or x.__dict__:
        return copy.deepcopy(x, memo)
    y = functools.partial(deepcopy(x.func, memo), *deepcopy(x.args, memo),
                          **deepcopy(x.keywords, memo))
    memo[id(x)] = y
    return y


def _own_deepcopy(x: Any, memo: Memo) -> Any:
    y = x.__deepcopy__(memo)
    if y is not x:
        memo[id(x)] = y
    return y


def _stdlib(x: object, memo: Memo) -> object:
    return copy.deepcopy(x, memo)


def _plain_object(slots: tuple[str, ...]) -> _Handler:
    """The copy of an instance of a plain class: ``__dict__`` and ``slots`` copied."""

    def copy_object(x: Any, memo: Memo) -> Any:
        cls: Any = type(x)
        y = cls.__new__(cls)
        memo[id(x)] = y
        shared = _SHARED
        d = getattr(x, "__dict__", None)
        if d is not None:
            state = y.__dict__
            for k, v in d.items():
                state[k] = v if type(v) in shared else deepcopy(v, memo)
        for name in slots:
            try:
                v = getattr(x, name)
            except AttributeError:
                continue
            setattr(y, name, v if type(v) in shared else deepcopy(v, memo))
        return y

    return copy_object


_BUILTIN: dict[type, _Handler] = {
    dict: _copy_dict, list: _copy_list, tuple: _copy_tuple, set: _copy_set,
    frozenset: _copy_frozenset, np.ndarray: _copy_array, types.MethodType: _copy_method,
    functools.partial: _copy_partial,
}


def _is_plain(cls: type) -> bool:
    """Instances built by ``__new__`` and a state of attributes, nothing customised."""
    if cls.__module__ == "builtins" or not isinstance(cls.__new__, types.BuiltinMethodType):
        return False
    base = object.__reduce_ex__
    return (cls.__reduce_ex__ is base and cls.__reduce__ is object.__reduce__  # type: ignore[comparison-overlap]
            and cls.__getstate__ is object.__getstate__  # type: ignore[comparison-overlap]
            and not hasattr(cls, "__setstate__") and not hasattr(cls, "__copy__")
            and not any(issubclass(cls, b) for b in (dict, list, set, tuple, np.ndarray)))


def _slots(cls: type) -> tuple[str, ...]:
    names = []
    for klass in cls.__mro__:
        s = klass.__dict__.get("__slots__", ())
        names += [s] if isinstance(s, str) else [n for n in s if n not in ("__dict__",
                                                                           "__weakref__")]
    return tuple(names)


def _classify(cls: type) -> _Handler:
    """How instances of ``cls`` are copied (decided once per type)."""
    handler: _Handler
    if (issubclass(cls, (enum.Enum, np.generic))
            or (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen)):  # type: ignore[attr-defined]
        _SHARED.add(cls)
        handler = _share
    elif cls in _BUILTIN:
        handler = _BUILTIN[cls]
    elif hasattr(cls, "__deepcopy__"):
        handler = _own_deepcopy
    elif _is_plain(cls):
        handler = _plain_object(_slots(cls))
    else:
        handler = _stdlib
    _HANDLERS[cls] = handler
    return handler
