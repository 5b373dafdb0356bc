"""Pickling of hollow state dicts, and the restricted unpickler that reads them back.

Bytes read from disk or received from peers are never unpickled with :mod:`pickle` itself: only
globals on an allow-list can be resolved (containers, numbers, strings, torch dtypes/sizes/devices,
numpy arrays and scalars, ``argparse.Namespace`` and the library's own classes). Users extend the
list with :func:`add_safe_globals`, as with ``torch.serialization.add_safe_globals``.
"""

from __future__ import annotations

import importlib
import io
import pickle
import threading
from typing import Any, Iterable

import torch

__all__ = ["UnsafeCheckpointError", "add_safe_globals", "get_safe_globals", "dumps", "safe_loads"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The bytes name a global outside the allow-list."""


_DEFAULT: set[tuple[str, str]] = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                              "str", "bytes", "bytearray", "bool", "slice", "range")
} | {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("argparse", "Namespace"),
    ("torch", "Size"), ("torch", "device"),
} | {
    (mod, name)
    for mod in ("numpy.core.numeric", "numpy._core.numeric")
    for name in ("_frombuffer",)
} | {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}

_extra: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _qualname(obj: Any) -> tuple[str, str]:
    return obj.__module__, obj.__qualname__


def add_safe_globals(objs: Iterable[Any]) -> None:
    """Allow these classes or functions (or ``(module, qualname)`` pairs) to be unpickled."""
    with _lock:
        for obj in objs:
            _extra.add(tuple(obj) if isinstance(obj, tuple) else _qualname(obj))


#: The library's own classes that land in hollow state dicts (see register_library_class).
_registered: set[tuple[str, str]] = set()


def get_safe_globals() -> set[tuple[str, str]]:
    """The current allow-list as ``(module, qualname)`` pairs."""
    with _lock:
        return _DEFAULT | _extra | _registered


def register_library_class(cls: type) -> type:
    """Class decorator: the library's own picklable classes (placeholders, state dicts)."""
    _registered.add(_qualname(cls))
    return cls


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: set[tuple[str, str]]):
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in self._allowed:
            raise UnsafeCheckpointError(
                f"global {module}.{name} is not allowed; if you trust it, call "
                f"tasd.add_safe_globals([{module}.{name}])"
            )
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("persistent ids are not allowed")


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (a hollow state dict: no tensors inside)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def safe_loads(data: bytes | memoryview) -> Any:
    """Unpickle ``data`` resolving only allowed globals.

    Raises UnsafeCheckpointError for a forbidden global, and any error of a malformed pickle
    (``pickle.UnpicklingError``, ``EOFError``, ``ValueError`` ...) as it comes: callers wrap them.
    """
    return _RestrictedUnpickler(io.BytesIO(data), get_safe_globals()).load()

