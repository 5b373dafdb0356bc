"""The one tree walk of the library: nested dicts, lists and tuples with tensor leaves.

``map_tensors(obj, fn)`` rebuilds the containers of ``obj`` in walk order (dict insertion order,
list/tuple index order), replacing each tensor leaf ``t`` found at key path ``path`` by
``fn(path, t)``. Leaves that are not containers and not tensors are kept as they are, after a check
that they do not hide a tensor (a tensor inside another object could not be staged, and would be
pickled with its data into the hollow state dict).
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from typing import Any, Callable

import torch

KeyPath = tuple

# Leaf types that cannot contain a tensor: skipped by the hidden-tensor check.
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.Size,
           torch.device, range, slice)


def format_path(path: KeyPath) -> str:
    """A key path as a readable string, e.g. ``optimizer.state[3].exp_avg``."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += ("." if out else "") + str(key)
    return out or "<root>"


class _TensorFinder(pickle.Pickler):
    """Pickles into a sink only to find tensors hidden inside arbitrary objects."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            raise _HiddenTensor()
        if (isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType))
                and getattr(obj, "__module__", None) != "builtins"):
            return (str, ())  # do not resolve globals: local classes must not end the search
        return NotImplemented


class _HiddenTensor(Exception):
    pass


def check_no_hidden_tensor(path: KeyPath, leaf: Any) -> None:
    """Raise TypeError naming ``path`` when the non-container ``leaf`` holds a tensor."""
    if isinstance(leaf, _ATOMIC):
        return
    try:
        _TensorFinder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(leaf)
    except _HiddenTensor:
        raise TypeError(
            f"state dict entry {format_path(path)!r} ({type(leaf).__name__}) holds a tensor inside an "
            "object; put tensors directly in dicts, lists or tuples so they can be staged"
        ) from None
    except Exception:
        # Unpicklable leaves are reported when the hollow state dict is serialized.
        return


def _is_sequence(obj: Any) -> bool:
    """Lists, tuples and namedtuples are walked; other subclasses (torch.Size ...) are leaves."""
    return type(obj) in (list, tuple) or (isinstance(obj, tuple) and hasattr(type(obj), "_fields"))


def _rebuild_sequence(obj: tuple | list, items: list) -> tuple | list:
    if type(obj) is list:
        return items
    if type(obj) is tuple:
        return tuple(items)
    return type(obj)._make(items)  # namedtuple


def _rebuild_dict(obj: dict, items: list) -> dict:
    if isinstance(obj, collections.defaultdict):
        return collections.defaultdict(obj.default_factory, items)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict(items)
    return dict(items)


def map_leaves(obj: Any, predicate: Callable[[Any], bool], fn: Callable[[KeyPath, Any], Any], *,
               on_other: Callable[[KeyPath, Any], None] | None = None, path: KeyPath = ()) -> Any:
    """Return ``obj`` rebuilt with every leaf selected by ``predicate`` replaced by ``fn(path, leaf)``.

    Dicts keep their type when it is ``dict``, ``OrderedDict`` or ``defaultdict`` (other mappings
    are rebuilt as plain dicts); lists, tuples and namedtuples keep their type; other sequence
    subclasses such as ``torch.Size`` are leaves. Leaves that are neither selected nor containers
    are passed to ``on_other`` (which may raise) and kept as they are.
    """
    if predicate(obj):
        return fn(path, obj)
    if isinstance(obj, dict):
        return _rebuild_dict(obj, [(k, map_leaves(v, predicate, fn, on_other=on_other, path=path + (k,)))
                                   for k, v in obj.items()])
    if _is_sequence(obj):
        return _rebuild_sequence(obj, [map_leaves(v, predicate, fn, on_other=on_other, path=path + (i,))
                                       for i, v in enumerate(obj)])
    if on_other is not None:
        on_other(path, obj)
    return obj


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor)


def map_tensors(obj: Any, fn: Callable[[KeyPath, torch.Tensor], Any]) -> Any:
    """:func:`map_leaves` over tensor leaves; other leaves are checked by
    :func:`check_no_hidden_tensor` (raises TypeError naming the key path)."""
    return map_leaves(obj, _is_tensor, fn, on_other=check_no_hidden_tensor)


def find_unpicklable(obj: Any) -> str | None:
    """Key path of the first leaf of ``obj`` that cannot be pickled, or None."""
    found: list[str] = []

    def probe(path: KeyPath, leaf: Any) -> None:
        if found:
            return
        try:
            pickle.dumps(leaf, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            found.append(format_path(path))

    map_leaves(obj, lambda _: False, lambda p, x: x, on_other=probe)
    return found[0] if found else None
