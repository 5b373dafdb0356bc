"""Pickling of hollow state dicts, and the bounded, restricted decoder that reads them back.

Hollow state dicts cross trust boundaries: a restart reads them from node-local files, a recovery
receives them from peers. The threat model is in ``docs/security.md``.

**Decoding** (:func:`safe_loads`). Bytes are never given to pickle's C unpickler: they are read by
the standard library's pure-Python unpickler (``pickle._Unpickler``, whose memo is a dict) with
every instruction that resolves a global, calls something, sets an object's state, fills a
container or preallocates replaced by a checked one. Globals resolve only from the allow-list,
whose entries are of three kinds:

- *values* (builtin types, ``numpy.ndarray``, torch dtypes): may be named, never called;
- *checked callables* (``complex``, ``slice``, ``range``, ``OrderedDict``, ``defaultdict``,
  ``deque``, ``argparse.Namespace``, ``torch.Size``, ``torch.device``, numpy's dtype, scalar and
  array rebuilders, and the enum classes added with :func:`add_safe_enums`: a member looked up by
  one plain value): called only with the argument types and sizes their pickles have (an array's
  data must match its shape, a dtype must be a plain one, ...), so what they allocate is bounded by
  the input;
- *trusted* classes and functions: the library's own (:func:`register_library_class`) and those
  added with :func:`add_safe_globals`, called with whatever arguments the bytes hold. Add only
  classes whose constructor and ``__setstate__`` do work proportional to their arguments. Adding a
  checked callable (e.g. ``numpy.dtype``) makes it trusted: its checks no longer apply. A global
  named in one of tasd's backend modules (:data:`LIBRARY_MODULES`) that is not allowed yet makes
  the decoder import that module, which registers its classes (only those modules of tasd run): a fresh
  process that has not imported ``tasd.mcore``, e.g. a restarted rank receiving its MCore part
  from a peer, still decodes it.

Bounds, all checked before the work they bound: the input is at most :data:`MAX_HOLLOW_BYTES`;
length fields never exceed the input (nothing is allocated ahead of the bytes that fill it); the
*work* (arguments handed to calls and states, keys hashed, and, when the bytes share references,
the size of the result expanded as a tree, i.e. what any tree walk over it visits; without
sharing that size is at most the number of instructions) is at most :data:`WORK_PER_BYTE` per
input byte plus :data:`WORK_BASE`; tuples, which C code hashes recursively, nest at most
:data:`MAX_DEPTH` deep; at most :data:`MAX_EQUAL_HASHES` keys of one dict or set share a hash (no
collision flooding). Decoding memory and time are therefore linear in the input (memory: at most
about 250 bytes per input byte, Python's size of an empty set). Every refusal and every malformed
input raises :class:`UnsafeCheckpointError`; nothing else escapes.

**Encoding** (:func:`dumps`, on the training thread at every save). Pickle protocol 5 with a
``reducer_override`` hook that checks each object's reduction against the same rules, so a state
dict that :func:`safe_loads` would refuse is refused at save time with
:class:`DisallowedGlobalError` naming the class, never written and then skipped by every restart.
(The work bound depends on how objects are shared and is not re-checked at save: it is generous,
and only a state dict whose containers are shared many times over could exceed it.)
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import enum
import importlib
import io
import math
import pickle
import re
import struct
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

__all__ = ["UnsafeCheckpointError", "DisallowedGlobalError", "add_safe_globals", "add_safe_enums", "get_safe_globals",
           "dumps",
           "safe_loads", "MAX_HOLLOW_BYTES", "MAX_DEPTH", "MAX_EQUAL_HASHES", "WORK_PER_BYTE", "WORK_BASE"]

#: Largest hollow state dict (pickle bytes) :func:`dumps` produces and :func:`safe_loads` accepts.
MAX_HOLLOW_BYTES = 256 << 20
#: Work units (see the module docstring) allowed per input byte, plus a constant.
WORK_PER_BYTE = 32
WORK_BASE = 1 << 20
#: Deepest nesting of tuples (and of any structure walked for sharing or hashing) in a decoded value;
#: pickle's own recursion limit keeps what dumps can produce below it.
MAX_DEPTH = 1000
#: Most keys of one dict or set that may share a hash (bounds hash-collision flooding).
MAX_EQUAL_HASHES = 64

_PROTOCOL = 5
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_TORCH_DTYPES = frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


class UnsafeCheckpointError(pickle.UnpicklingError):
    """:func:`safe_loads` refused the bytes: a global outside the allow-list, a call or state the
    allow-list does not permit with these arguments, a bound exceeded, or a malformed pickle."""


class DisallowedGlobalError(TypeError):
    """:func:`dumps` refused an object because :func:`safe_loads` would refuse its pickle. The
    message names the class or function (``module.qualname``) and how to allow it."""


# -- the allow-list ---------------------------------------------------------------------------

Check = Callable[[tuple], int]
"""Checks the arguments (or state) of a checked callable; returns the work they cost beyond their
count, raises UnsafeCheckpointError when they are not what its pickles hold."""


@dataclass(frozen=True, eq=False)
class _Rule:
    call: Check | None = None  # REDUCE: func(*args)
    new: Check | None = None  # NEWOBJ: cls.__new__(cls, *args)


_TRUSTED = _Rule()  # compared by identity: called with any arguments
_VALUE = _Rule()  # never called


def _refuse(msg: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(msg)


def _int_seq(x: Any, what: str, max_len: int = 64) -> tuple[int, ...]:
    if type(x) not in (tuple, list) or len(x) > max_len or not all(type(i) is int for i in x):
        raise _refuse(f"{what} must be a sequence of at most {max_len} integers")
    return tuple(x)


def _no_args(args: tuple) -> int:
    if args != ():
        raise _refuse("takes no arguments in its pickles")
    return 0


def _check_complex(args: tuple) -> int:
    if len(args) != 2 or not all(type(a) in (int, float) for a in args):
        raise _refuse("complex takes two real numbers")
    return 0


def _check_slice(args: tuple) -> int:
    if len(args) != 3 or not all(a is None or type(a) is int for a in args):
        raise _refuse("slice takes three integers or None")
    return 0


def _check_range(args: tuple) -> int:
    if len(args) != 3 or not all(type(a) is int for a in args):
        raise _refuse("range takes three integers")
    return 0


def _check_defaultdict(args: tuple) -> int:
    if len(args) > 1 or (args and args[0] is not None and not callable(args[0])):
        raise _refuse("defaultdict takes at most a default factory")
    return 0


def _check_deque(args: tuple) -> int:
    if args == ():
        return 0
    if (len(args) != 2 or type(args[0]) not in (tuple, list)
            or not (args[1] is None or (type(args[1]) is int and args[1] >= 0))):
        raise _refuse("deque takes (items, maxlen)")
    return len(args[0])


def _check_torch_size(args: tuple) -> int:
    if len(args) != 1:
        raise _refuse("torch.Size takes one sequence")
    return len(_int_seq(args[0], "torch.Size's argument", max_len=1 << 16))


def _check_device(args: tuple) -> int:
    if (not 1 <= len(args) <= 2 or type(args[0]) is not str or len(args[0]) > 64
            or (len(args) == 2 and not (args[1] is None or type(args[1]) is int))):
        raise _refuse("torch.device takes (type, index)")
    return 0


# numpy: plain dtypes only (bool, numbers, bytes/str/void of a fixed size, object). Structured,
# sub-array and datetime dtypes carry states numpy does not fully validate: they need trust.
_NP_DTYPE = ("numpy", "dtype")
_NP_TYPESTR = re.compile(r"b1|[iu][1248]|f(2|4|8|16)|c(8|16|32)|O8|[SUV]\d{1,9}")


def _np_dtype(x: Any, what: str, objects: bool) -> np.dtype:
    if not isinstance(x, np.dtype) or (x.hasobject and not objects):
        raise _refuse(f"{what} must be a numpy dtype" + ("" if objects else " without objects"))
    return x


def _buffer_nbytes(buf: Any) -> int:
    if type(buf) in (bytes, bytearray):
        return len(buf)
    if isinstance(buf, pickle.PickleBuffer):  # what dumps sees; the bytes decode as bytearray
        return memoryview(buf).nbytes
    raise _refuse("array data must be bytes")


def _check_np_dtype(args: tuple) -> int:
    if (len(args) != 3 or type(args[0]) is not str or _NP_TYPESTR.fullmatch(args[0]) is None
            or type(args[1]) is not bool or args[2] is not True):
        raise _refuse("numpy.dtype takes (plain type string, align, copy=True); structured, sub-array and "
                      "datetime dtypes need trust")
    return 0


def _check_np_dtype_state(dtype: np.dtype, state: Any) -> int:
    canonical = np.dtype(dtype.__reduce__()[1][0]).__reduce__()[2]  # a fresh dtype of its type string
    if (type(state) is not tuple or len(state) != len(canonical) or state[0] != canonical[0]
            or state[1] not in ("<", ">", "=", "|") or state[2:] != canonical[2:]):
        raise _refuse(f"numpy dtype state {state!r:.200} is not the state of a plain {dtype}")
    return 0


def _check_np_reconstruct(args: tuple) -> int:
    if len(args) != 3 or args[0] is not np.ndarray or args[1] != (0,) or args[2] != b"b":
        raise _refuse("numpy _reconstruct takes (ndarray, (0,), b'b')")
    return 0


def _check_np_array_state(state: Any) -> int:
    if type(state) is not tuple or len(state) != 5 or type(state[0]) is not int or type(state[3]) is not bool:
        raise _refuse("numpy array state must be (version, shape, dtype, is_fortran, data)")
    shape = _int_seq(state[1], "numpy array shape")
    dtype = _np_dtype(state[2], "numpy array dtype", objects=True)
    if any(s < 0 for s in shape):
        raise _refuse("numpy array shape has a negative dimension")
    n, data = math.prod(shape), state[4]
    if dtype.hasobject:  # numpy reads n items from the list without checking its length
        if type(data) is not list or len(data) != n:
            raise _refuse(f"numpy object array of {n} items needs a list of {n} items")
        return n
    if type(data) not in (bytes, bytearray) or len(data) != n * dtype.itemsize:
        raise _refuse(f"numpy array of shape {shape} and {dtype} needs {n * dtype.itemsize} bytes of data")
    return len(data)


def _check_np_scalar(args: tuple) -> int:
    if len(args) != 2:
        raise _refuse("numpy scalar takes (dtype, data)")
    dtype = _np_dtype(args[0], "numpy scalar dtype", objects=False)
    if type(args[1]) is not bytes or len(args[1]) != dtype.itemsize:
        raise _refuse(f"numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return len(args[1])


def _check_np_frombuffer(args: tuple) -> int:
    if len(args) != 4 or args[3] not in ("C", "F"):
        raise _refuse("numpy _frombuffer takes (data, dtype, shape, order)")
    dtype = _np_dtype(args[1], "numpy array dtype", objects=False)
    shape = _int_seq(args[2], "numpy array shape")
    nbytes = _buffer_nbytes(args[0])
    if any(s < 0 for s in shape) or math.prod(shape) * dtype.itemsize != nbytes:
        raise _refuse(f"numpy array of shape {shape} and {dtype} does not match its {nbytes} bytes")
    return 0


def _check_namespace_state(state: Any) -> int:
    if type(state) is not dict or not all(type(k) is str for k in state):
        raise _refuse("argparse.Namespace state must be a dict of attribute names")
    return len(state)


_VALUES: frozenset[tuple[str, str]] = frozenset(
    {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                              "bytes", "bytearray", "bool", "slice", "range")}
    | {("numpy", "ndarray"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
       ("collections", "deque"), ("argparse", "Namespace"), ("torch", "Size"), ("torch", "device"), ("numpy", "dtype")}
)

_RULES: dict[tuple[str, str], _Rule] = {
    ("builtins", "complex"): _Rule(call=_check_complex, new=_check_complex),
    ("builtins", "slice"): _Rule(call=_check_slice),
    ("builtins", "range"): _Rule(call=_check_range),
    ("collections", "OrderedDict"): _Rule(call=_no_args),
    ("collections", "defaultdict"): _Rule(call=_check_defaultdict),
    ("collections", "deque"): _Rule(call=_check_deque),
    ("argparse", "Namespace"): _Rule(new=_no_args),
    ("torch", "Size"): _Rule(call=_check_torch_size),
    ("torch", "device"): _Rule(call=_check_device),
    ("numpy", "dtype"): _Rule(call=_check_np_dtype),
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x names
    _RULES[(_mod, "_reconstruct")] = _Rule(call=_check_np_reconstruct)
    _RULES[(_mod, "scalar")] = _Rule(call=_check_np_scalar)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _RULES[(_mod, "_frombuffer")] = _Rule(call=_check_np_frombuffer)

#: Container types whose items pickles add with APPENDS/SETITEMS/ADDITEMS.
_TARGETS = (list, dict, set, collections.OrderedDict, collections.defaultdict, collections.deque)

_extra: set[tuple[str, str]] = set()
#: The library's own classes that land in hollow state dicts (see register_library_class).
_registered: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _qualname(obj: Any) -> tuple[str, str]:
    return obj.__module__, obj.__qualname__


def add_safe_globals(objs: Iterable[Any]) -> None:
    """Trust these classes or functions (or ``(module, qualname)`` pairs): hollow state dicts may
    name and call them with any arguments. Not collective; every rank that loads must call it."""
    with _lock:
        for obj in objs:
            _extra.add(tuple(obj) if isinstance(obj, tuple) else _qualname(obj))


def _check_enum_value(args: tuple) -> int:
    if len(args) != 1 or type(args[0]) not in (int, str, float, bool, type(None)):
        raise _refuse("an enum class takes one plain value (int, str, float, bool or None) in its pickles")
    return 0


def add_safe_enums(classes: Iterable[type]) -> None:
    """Allow members of these ``enum.Enum`` classes in hollow state dicts, as *checked callables*:
    a member pickles as a call of its class with its value, which the decoder permits only with
    one plain value (int, str, float, bool or None). Such a call looks an existing member up: it
    never creates an enum class, and no state is ever set on a member (which would change the
    process's singleton). TypeError for a class that is not an Enum. Not collective; every rank
    that loads must call it."""
    classes = list(classes)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise TypeError(f"add_safe_enums takes enum.Enum classes, got {cls!r}")
    with _lock:
        for cls in classes:
            _RULES[_qualname(cls)] = _Rule(call=_check_enum_value)


def get_safe_globals() -> set[tuple[str, str]]:
    """The current allow-list as ``(module, qualname)`` pairs (torch dtypes are always allowed)."""
    with _lock:
        return set(_VALUES) | set(_RULES) | _extra | _registered


def register_library_class(cls: type) -> type:
    """Class decorator: the library's own picklable classes (placeholders, state dicts), trusted."""
    with _lock:
        _registered.add(_qualname(cls))
    return cls


class _Policy:
    """A snapshot of the allow-list for one dumps or safe_loads call."""

    def __init__(self) -> None:
        with _lock:
            self.trusted = frozenset(_extra | _registered)

    def rule(self, key: tuple[str, str]) -> _Rule | None:
        if key in self.trusted:
            return _TRUSTED
        rule = _RULES.get(key)
        if rule is not None:
            return rule
        if key in _VALUES or (key[0] == "torch" and key[1] in _TORCH_DTYPES):
            return _VALUE
        if _import_library_module(key[0]):
            with _lock:  # the module registered its classes (and enums): take them into this snapshot
                self.trusted = frozenset(_extra | _registered)
            if key in self.trusted:
                return _TRUSTED
            return _RULES.get(key)
        return None

    def trusts_type(self, cls: type) -> bool:
        return (getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)) in self.trusted

    def check_state(self, inst: Any, state: Any) -> int:
        """Allow setting ``state`` on ``inst`` (pickle's BUILD); returns its work."""
        cls = type(inst)
        if self.trusts_type(cls) or (isinstance(inst, np.dtype) and _NP_DTYPE in self.trusted):
            return _size_of(state)
        if cls is np.ndarray:
            return _check_np_array_state(state)
        if isinstance(inst, np.dtype):
            return _check_np_dtype_state(inst, state)
        if cls is argparse.Namespace:
            return _check_namespace_state(state)
        raise _refuse(f"setting the state of a {cls.__module__}.{cls.__qualname__} is not allowed")

    def check_target(self, target: Any) -> None:
        """Allow adding items to ``target`` (APPENDS, SETITEMS, ADDITEMS)."""
        if type(target) not in _TARGETS and not self.trusts_type(type(target)):
            raise _refuse(f"cannot add items to a {type(target).__qualname__}")


#: tasd's modules whose classes register themselves on import (:func:`register_library_class`):
#: the only modules the decoder imports on demand. A new backend adds its module here.
LIBRARY_MODULES = frozenset({"tasd", "tasd.state_dict", "tasd.basic", "tasd.mcore", "tasd.fsdp"})


def _import_library_module(module: str) -> bool:
    """Import ``module`` when it is one of :data:`LIBRARY_MODULES` (tasd's backends, whose classes
    register themselves on import); True when it is imported now. Any other module, or one that
    does not import (an extra not installed: e.g. ``tasd.mcore`` without megatron-core), gives
    False and the global stays refused: bytes from disk or a peer never make other code run."""
    if module not in LIBRARY_MODULES:
        return False
    if module in sys.modules:
        return True
    try:
        importlib.import_module(module)
    except Exception:  # a name from the bytes that is no importable module of tasd's: refused
        return False
    return True


def _disallowed_message(module: str, name: str) -> str:
    return (f"global {module}.{name} is not allowed in hollow state dicts; if you trust it, call "
            f"tasd.add_safe_globals([{module}.{name}])")


_SIZED = (tuple, list, dict, set, frozenset, str, bytes, bytearray, collections.deque)


def _size_of(x: Any) -> int:
    """Work units for handing ``x`` to a call: its length when it has one a callee could iterate."""
    if isinstance(x, _SIZED):
        return len(x)
    if type(x) is range:
        try:
            return len(x)
        except OverflowError:
            return sys.maxsize
    return 0


# -- encoding ---------------------------------------------------------------------------------

class _CheckingPickler(pickle.Pickler):
    """Pickles like pickle.Pickler (protocol 5) and raises DisallowedGlobalError for whatever
    safe_loads would refuse. ``reducer_override`` sees every object but builtin containers,
    numbers and strings (which need no global), once per object (the memo holds repeats)."""

    def __init__(self, file: io.BytesIO, policy: _Policy):
        super().__init__(file, protocol=_PROTOCOL)
        self._policy = policy
        self._keys: dict[int, tuple[tuple[str, str], _Rule | None]] = {}
        self._fast: dict[type, Any] = {}  # trusted class -> the callable its instances reduce to

    def _lookup(self, obj: Any, name: str | None = None) -> tuple[tuple[str, str], _Rule | None]:
        hit = self._keys.get(id(obj))
        if hit is None or name is not None:
            qualname = name or getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
            module = getattr(obj, "__module__", None) or pickle.whichmodule(obj, qualname)
            key = (module, qualname)
            hit = (key, self._policy.rule(key))
            if name is None:
                self._keys[id(obj)] = hit
        return hit

    def _require(self, obj: Any, name: str | None = None) -> _Rule:
        key, rule = self._lookup(obj, name)
        if rule is None:
            raise DisallowedGlobalError(_disallowed_message(*key))
        return rule

    def _call(self, func: Any, args: tuple, new: bool) -> None:
        rule = self._require(func)
        check = rule.new if new else rule.call
        if rule is _TRUSTED:
            return
        key = self._lookup(func)[0]
        if check is None:
            how = "constructed with NEWOBJ" if new else "called"
            raise DisallowedGlobalError(f"{key[0]}.{key[1]} may appear in hollow state dicts but is never {how} "
                                        f"by the safe decoder; if you trust it, call "
                                        f"tasd.add_safe_globals([{key[0]}.{key[1]}])")
        try:
            check(args)
        except UnsafeCheckpointError as e:
            raise DisallowedGlobalError(f"{key[0]}.{key[1]}: {e}; if you trust it with any arguments, call "
                                        f"tasd.add_safe_globals([{key[0]}.{key[1]}])") from None

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        fast = self._fast.get(cls)
        if fast is not None:  # a trusted class seen before: only check that it reduces the same way
            rv = obj.__reduce_ex__(_PROTOCOL)
            if type(rv) is tuple and len(rv) <= 5 and rv[0] is fast and (fast is not copyreg.__newobj__
                                                                         or rv[1][0] is cls):
                return rv
            return self._check_reduce(obj, rv)
        if isinstance(obj, (type, types.FunctionType)):
            self._require(obj)  # saved as a global
            return NotImplemented
        reduce = copyreg.dispatch_table.get(cls)
        rv = reduce(obj) if reduce is not None else obj.__reduce_ex__(_PROTOCOL)
        rv = self._check_reduce(obj, rv)
        if (reduce is None and type(rv) is tuple and len(rv) <= 5 and self._policy.trusts_type(cls)
                and (rv[1][0] is cls if rv[0] is copyreg.__newobj__ else self._lookup(rv[0])[1] is _TRUSTED)):
            self._fast[cls] = rv[0]
        return rv

    def _check_reduce(self, obj: Any, rv: Any) -> Any:
        if isinstance(rv, str):  # a global (torch dtypes, builtin functions)
            self._require(obj, rv)
            return rv
        func, args = rv[0], rv[1]
        if func is copyreg.__newobj__:
            self._call(args[0], args[1:], new=True)
        elif func is copyreg.__newobj_ex__:
            if self._require(args[0]) is not _TRUSTED:
                raise DisallowedGlobalError(_disallowed_message(*self._lookup(args[0])[0]))
        else:
            self._call(func, args, new=False)
        if len(rv) > 2 and rv[2] is not None:
            if len(rv) > 5 and rv[5] is not None:  # protocol 5 state setter: a call
                self._call(rv[5], (obj, rv[2]), new=False)
            else:
                self._check_state(obj, rv[2])
        if (len(rv) > 3 and rv[3] is not None) or (len(rv) > 4 and rv[4] is not None):
            try:
                self._policy.check_target(obj)
            except UnsafeCheckpointError as e:
                cls = type(obj)
                raise DisallowedGlobalError(f"{e}: {cls.__module__}.{cls.__qualname__} is not trusted; call "
                                            f"tasd.add_safe_globals([{cls.__module__}.{cls.__qualname__}])") from None
        return rv

    def _check_state(self, obj: Any, state: Any) -> None:
        try:
            self._policy.check_state(obj, state)
        except UnsafeCheckpointError as e:
            name = ".".join(_NP_DTYPE) if isinstance(obj, np.dtype) else ".".join(_qualname(type(obj)))
            raise DisallowedGlobalError(f"{e}; if you trust {name} with any state, call "
                                        f"tasd.add_safe_globals([{name}])") from None


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (a hollow state dict: no tensors inside) so that :func:`safe_loads` can read it.

    Raises DisallowedGlobalError (a TypeError) naming the class or function when the pickle would
    need a global, a call or a state that safe_loads refuses, and when the pickle exceeds
    MAX_HOLLOW_BYTES; other pickling errors propagate as pickle raises them. Not collective.
    """
    buf = io.BytesIO()
    _CheckingPickler(buf, _Policy()).dump(obj)
    if buf.tell() > MAX_HOLLOW_BYTES:
        raise DisallowedGlobalError(f"hollow state dict pickles to {buf.tell()} bytes, more than the "
                                    f"{MAX_HOLLOW_BYTES} a load accepts (MAX_HOLLOW_BYTES)")
    return buf.getvalue()


# -- decoding ---------------------------------------------------------------------------------

_LEAVES = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range, torch.dtype, torch.device,
                     type, types.BuiltinFunctionType, types.FunctionType})


def _slot_names(cls: type, _cache: dict[type, tuple[str, ...]] = {}) -> tuple[str, ...]:  # noqa: B006
    names = _cache.get(cls)
    if names is None:
        found: list[str] = []
        for klass in cls.__mro__:
            slots = klass.__dict__.get("__slots__", ())
            found.extend([slots] if isinstance(slots, str) else slots)
        names = _cache[cls] = tuple(n for n in found if n not in ("__dict__", "__weakref__"))
    return names


def _children(x: Any) -> Iterable[Any]:
    """What a walk over ``x`` visits below it: items, keys and values, instance attributes."""
    if isinstance(x, dict):
        return [v for kv in x.items() for v in kv]
    if isinstance(x, (list, tuple, set, frozenset, collections.deque)):
        return x
    if type(x) is slice:
        return (x.start, x.stop, x.step)
    if isinstance(x, np.ndarray):
        return x.ravel().tolist() if x.dtype.hasobject else ()
    if isinstance(x, (np.generic, np.dtype)):
        return ()
    found = []
    d = getattr(x, "__dict__", None)
    if type(d) is dict:
        found.append(d)
    for name in _slot_names(type(x)):
        found.append(getattr(x, name, None))
    return found


class _Done(Exception):
    """STOP: the value is complete."""


class _Decoder(pickle._Unpickler):
    """pickle's pure-Python unpickler with checked instructions (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, policy: _Policy):
        self._input = io.BytesIO(data)
        super().__init__(self._input)
        self._policy = policy
        self._size = len(data)
        self._budget = WORK_PER_BYTE * len(data) + WORK_BASE
        self._work = 0
        self._shared = False  # whether a memo or DUP reference pushed anything but a leaf
        self._resolved: dict[int, _Rule] = {}  # id of each global resolved -> its rule
        self._key_sizes: dict[int, tuple[Any, int]] = {}  # hashable keys measured: (key kept alive, size)
        self._hash_counts: dict[tuple[int, int], int] = {}
        self._depths: dict[int, tuple[tuple, int]] = {}  # tuples holding tuples: (tuple kept alive, depth)

    def load(self) -> Any:
        """Run the instructions (the whole input is in memory: frames are only checked), then
        bound the result's size as a tree when references were shared."""
        src = self._input
        self.read, self.readline, self.readinto = src.read, src.readline, src.readinto
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch = src.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise _refuse("pickle truncated (no STOP)")
                dispatch[key[0]](self)
        except _Done:
            pass
        value = self.stack.pop()
        if self._shared:  # without shared references the tree is no larger than the input
            self._charge(self.measure(value))
        return value

    def load_stop(self) -> None:
        if not self.stack:
            raise _refuse("STOP with an empty stack")
        raise _Done()

    def load_frame(self) -> None:
        (n,) = _U64.unpack(self.read(8))
        if n > self._size - self._input.tell():
            raise _refuse(f"frame of {n} bytes exceeds the pickle")

    def _get(self, i: int) -> None:
        try:
            obj = self.memo[i]
        except KeyError:
            raise _refuse(f"memo entry {i} was never stored") from None
        self.append(obj)
        if type(obj) not in _LEAVES:
            self._shared = True

    def load_get(self) -> None:
        self._get(int(self.readline()[:-1]))

    def load_binget(self) -> None:
        self._get(self.read(1)[0])

    def load_long_binget(self) -> None:
        self._get(_U32.unpack(self.read(4))[0])

    def load_dup(self) -> None:
        super().load_dup()
        if type(self.stack[-1]) not in _LEAVES:
            self._shared = True

    # -- bounds -------------------------------------------------------------------------------
    def _charge(self, units: int) -> None:
        self._work += units
        if self._work > self._budget:
            raise _refuse(f"decoding needs more than {self._budget} work units for {self._size} bytes "
                          f"(WORK_PER_BYTE={WORK_PER_BYTE}): too much sharing or too large arguments")

    def measure(self, root: Any, hashable_only: bool = False) -> int:
        """The size of ``root`` expanded as a tree (shared objects counted at each reference), in
        time linear in its distinct objects; nesting beyond MAX_DEPTH or a size beyond the budget
        is refused. A reference back to an object being walked (a cycle) counts once."""
        limit = self._budget - self._work
        memo: dict[int, int] = {}
        on_path: set[int] = set()
        stack: list[tuple[Any, Iterable[Any], list[int]]] = []

        def enter(x: Any) -> None:
            if len(stack) >= MAX_DEPTH:
                raise _refuse(f"nesting deeper than {MAX_DEPTH} levels")
            on_path.add(id(x))
            kids = (x if isinstance(x, (tuple, frozenset)) else ()) if hashable_only else _children(x)
            stack.append((x, iter(kids), [1]))

        enter(root)
        while True:
            x, it, total = stack[-1]
            for c in it:
                if type(c) in _LEAVES:
                    total[0] += 1
                    continue
                size = memo.get(id(c))
                if size is None:
                    if id(c) in on_path:
                        size = 1
                    else:
                        enter(c)
                        break
                total[0] += size
                if total[0] > limit:
                    raise _refuse(f"decoded value expands to more than {limit} nodes")
            else:
                stack.pop()
                on_path.discard(id(x))
                memo[id(x)] = size = total[0]
                if size > limit:
                    raise _refuse(f"decoded value expands to more than {limit} nodes")
                if not stack:
                    return size
                stack[-1][2][0] += size

    def _check_key(self, container: Any, key: Any) -> None:
        """Before ``key`` is hashed into ``container``: bound the hashing work and collisions."""
        t = type(key)
        if t is str or t is bytes:  # randomized hashes
            return
        if t is int and -(1 << 61) + 2 < key < (1 << 61) - 1 and key != -1:  # hash(key) == key
            return
        if t is tuple or t is frozenset:
            hit = self._key_sizes.get(id(key))
            if hit is None:
                hit = self._key_sizes[id(key)] = (key, self.measure(key, hashable_only=True))
            self._charge(hit[1])
        slot = (id(container), hash(key))
        n = self._hash_counts.get(slot, 0) + 1
        if n > MAX_EQUAL_HASHES:
            raise _refuse(f"more than {MAX_EQUAL_HASHES} keys of one container share a hash")
        self._hash_counts[slot] = n

    # -- globals and calls --------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        rule = self._policy.rule((module, name))
        if rule is None:
            raise _refuse(_disallowed_message(module, name))
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        self._resolved[id(obj)] = rule
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("persistent ids are not allowed")

    def _checked(self, func: Any, args: Any, new: bool) -> None:
        if type(args) is not tuple:
            raise _refuse("call arguments must be a tuple")
        units = 1 + len(args)
        for a in args:
            if isinstance(a, _SIZED) or type(a) is range:
                units += _size_of(a)
        rule = self._resolved.get(id(func))
        if rule is not _TRUSTED:
            check = None if rule is None else (rule.new if new else rule.call)
            if check is None:
                what = getattr(func, "__qualname__", type(func).__qualname__)
                raise _refuse(f"{what} may not be {'constructed' if new else 'called'} by a hollow state dict")
            units += check(args)
        self._charge(units)

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        self._checked(func, args, new=False)
        stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, type):
            raise _refuse("NEWOBJ needs a class")
        self._checked(cls, args, new=True)
        self.append(cls.__new__(cls, *args))
        if isinstance(self.stack[-1], tuple):  # a namedtuple
            self._built_tuple()

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, type) or type(kwargs) is not dict or self._resolved.get(id(cls)) is not _TRUSTED:
            raise _refuse("NEWOBJ_EX needs a trusted class")
        self._checked(cls, args, new=True)
        self._charge(len(kwargs))
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        self._charge(1 + self._policy.check_state(inst, state))
        if isinstance(state, dict):  # its keys are hashed again into the instance
            for k in state:
                self._check_key(inst, k)
        super().load_build()

    def _refuse_op(self) -> None:
        raise _refuse("pickle instruction not produced by tasd (protocol 0/1 objects, extensions)")

    # -- containers ---------------------------------------------------------------------------
    def load_bytearray8(self) -> None:
        (n,) = _U64.unpack(self.read(8))
        if n > self._size:  # pickle allocates before it reads
            raise _refuse(f"bytearray of {n} bytes in a pickle of {self._size}")
        out = bytearray(n)
        self.readinto(out)
        self.append(out)

    def load_append(self) -> None:
        self._policy.check_target(self.stack[-2])
        super().load_append()

    def load_appends(self) -> None:
        self._policy.check_target(self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None)
        super().load_appends()

    def load_setitem(self) -> None:
        target = self.stack[-3]
        self._policy.check_target(target)
        self._check_key(target, self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        target = self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None
        self._policy.check_target(target)
        for k in self.stack[::2]:
            self._check_key(target, k)
        super().load_setitems()

    def load_additems(self) -> None:
        target = self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None
        self._policy.check_target(target)
        for k in self.stack:
            self._check_key(target, k)
        super().load_additems()

    def load_frozenset(self) -> None:
        marker = object()
        for k in self.stack:
            self._check_key(marker, k)
        super().load_frozenset()

    def load_dict(self) -> None:
        marker = object()
        for k in self.stack[::2]:
            self._check_key(marker, k)
        super().load_dict()

    # Tuples are hashed recursively in C without a depth limit: a deep one would crash whoever
    # hashes it, so their nesting is tracked as they are built (recorded for tuples of tuples).
    def _built_tuple(self) -> None:
        t, depth = self.stack[-1], 1
        for x in t:
            if isinstance(x, tuple):
                hit = self._depths.get(id(x))
                if hit is None:
                    depth = max(depth, 2)
                elif hit[1] >= depth:
                    depth = hit[1] + 1
        if depth > 1:
            if depth > MAX_DEPTH:
                raise _refuse(f"tuples nested deeper than {MAX_DEPTH} levels")
            self._depths[id(t)] = (t, depth)

    def load_tuple(self) -> None:
        super().load_tuple()
        self._built_tuple()

    def load_tuple1(self) -> None:
        super().load_tuple1()
        self._built_tuple()

    def load_tuple2(self) -> None:
        super().load_tuple2()
        self._built_tuple()

    def load_tuple3(self) -> None:
        super().load_tuple3()
        self._built_tuple()


for _op, _fn in {
    pickle.REDUCE: _Decoder.load_reduce, pickle.NEWOBJ: _Decoder.load_newobj, pickle.NEWOBJ_EX: _Decoder.load_newobj_ex,
    pickle.BUILD: _Decoder.load_build, pickle.BYTEARRAY8: _Decoder.load_bytearray8,
    pickle.APPEND: _Decoder.load_append, pickle.APPENDS: _Decoder.load_appends,
    pickle.SETITEM: _Decoder.load_setitem, pickle.SETITEMS: _Decoder.load_setitems,
    pickle.ADDITEMS: _Decoder.load_additems, pickle.FROZENSET: _Decoder.load_frozenset, pickle.DICT: _Decoder.load_dict,
    pickle.STOP: _Decoder.load_stop, pickle.FRAME: _Decoder.load_frame, pickle.GET: _Decoder.load_get,
    pickle.BINGET: _Decoder.load_binget, pickle.LONG_BINGET: _Decoder.load_long_binget, pickle.DUP: _Decoder.load_dup,
    pickle.TUPLE: _Decoder.load_tuple, pickle.TUPLE1: _Decoder.load_tuple1, pickle.TUPLE2: _Decoder.load_tuple2,
    pickle.TUPLE3: _Decoder.load_tuple3, pickle.INST: _Decoder._refuse_op, pickle.OBJ: _Decoder._refuse_op,
    pickle.EXT1: _Decoder._refuse_op, pickle.EXT2: _Decoder._refuse_op, pickle.EXT4: _Decoder._refuse_op,
}.items():
    _Decoder.dispatch[_op[0]] = _fn


def safe_loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode a hollow state dict with bounded memory and time, resolving only allowed globals.

    Raises UnsafeCheckpointError, and nothing else, for any bytes it does not decode: a global
    outside the allow-list, a call or state it does not permit, a bound exceeded (see the module
    docstring) or a malformed pickle. Not collective; thread-safe.
    """
    if len(data) > MAX_HOLLOW_BYTES:
        raise UnsafeCheckpointError(f"hollow state dict of {len(data)} bytes exceeds MAX_HOLLOW_BYTES "
                                    f"({MAX_HOLLOW_BYTES})")
    try:
        return _Decoder(bytes(data), _Policy()).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # malformed pickles raise many types; none may escape
        raise UnsafeCheckpointError(f"malformed pickle: {type(e).__name__}: {e}"[:500]) from e
