"""Hollow state dict serialization: the bounded decoder refuses hostile pickles cheaply, and dumps
refuses at save time whatever the decoder would refuse at load time."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

import tasd
from tasd import BasicTensorAwareStateDict, TensorPlaceholder
from tasd.serialization import (MAX_EQUAL_HASHES, DisallowedGlobalError, UnsafeCheckpointError, dumps,
                                get_safe_globals, safe_loads)
from tests.test_basic_state_dict import assert_same, every_kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- crafting pickles ---------------------------------------------------------------------------


def s(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return s(module) + s(name) + pickle.STACK_GLOBAL


def i32(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


PROTO = b"\x80\x05"


def peak_bytes(fn) -> tuple[object, int]:
    """(outcome, peak traced allocation in bytes) of ``fn()``; the outcome is the value or the
    exception type name."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - the type is the outcome
            out = type(e).__name__
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def decode_in_subprocess(data: bytes, timeout: float = 60) -> str:
    """safe_loads in a fresh interpreter (a crash or hang there fails the test, not the run):
    'refused', 'decoded' or the reason it did not finish."""
    code = textwrap.dedent("""
        import sys
        from tasd.serialization import safe_loads, UnsafeCheckpointError
        try:
            safe_loads(sys.stdin.buffer.read())
            print("decoded")
        except UnsafeCheckpointError:
            print("refused")
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"hung for {timeout} s"
    if out.returncode != 0:
        return f"exit code {out.returncode}: {out.stderr[-500:].decode(errors='replace')}"
    return out.stdout.decode().strip()


# -- defect 1: bounded memory and time ----------------------------------------------------------

ALLOCATING_CALLS = {
    # an allowed builtin called with a size: 28 bytes asking for 100 MB
    "bytes(n)": PROTO + glob("builtins", "bytes") + i32(100_000_000) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
    "bytearray(n)": PROTO + glob("builtins", "bytearray") + i32(100_000_000) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
    "list(range(n))": PROTO + glob("builtins", "list") + glob("builtins", "range") + i32(10_000_000) + pickle.TUPLE1
    + pickle.REDUCE + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
    "torch.Size(range(n))": PROTO + glob("torch", "Size") + glob("builtins", "range") + i32(10_000_000)
    + pickle.TUPLE1 + pickle.REDUCE + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
    # numpy's array rebuilder with a hostile shape
    "np._reconstruct(shape=n)": PROTO + glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
    + i32(100_000_000) + pickle.TUPLE1 + b"C\x01b" + pickle.TUPLE3 + pickle.REDUCE + pickle.STOP,
    # length fields larger than the input: pickle allocates before it reads
    "BYTEARRAY8 length": PROTO + pickle.BYTEARRAY8 + struct.pack("<Q", 100_000_000) + b"x" + pickle.STOP,
    "BINBYTES8 length": PROTO + pickle.BINBYTES8 + struct.pack("<Q", 100_000_000) + b"x" + pickle.STOP,
    "BINBYTES length": PROTO + pickle.BINBYTES + struct.pack("<I", 100_000_000) + b"x" + pickle.STOP,
    "FRAME length": PROTO + pickle.FRAME + struct.pack("<Q", 100_000_000) + pickle.NONE + pickle.STOP,
    # a memo index of 2**28: the C unpickler grows its memo array to it
    "LONG_BINPUT index": PROTO + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 1 << 28) + pickle.STOP,
}
# a library class handed a lazy range to expand: TensorPlaceholder(0, float32, range(n), "cpu")
ALLOCATING_CALLS["TensorPlaceholder(shape=range(n))"] = (
    PROTO + glob("tasd.state_dict", "TensorPlaceholder") + pickle.MARK + i32(0) + glob("torch", "float32")
    + glob("builtins", "range") + i32(10_000_000) + pickle.TUPLE1 + pickle.REDUCE + s("cpu") + pickle.TUPLE
    + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("case", list(ALLOCATING_CALLS))
def test_hostile_pickle_cannot_allocate(case):
    """A few bytes never make the decoder allocate more than a few MB: refused (or, for the memo
    index, decoded as the harmless value it is) with a bounded peak."""
    data = ALLOCATING_CALLS[case]
    assert len(data) < 200
    outcome, peak = peak_bytes(lambda: safe_loads(data))
    assert peak < 4 << 20, f"{case}: {len(data)} bytes made the decoder allocate {peak / 2**20:.0f} MiB"
    if case == "LONG_BINPUT index":
        assert outcome in (None, "UnsafeCheckpointError")
    else:
        assert outcome == "UnsafeCheckpointError", outcome


def doubling_tuple(levels: int) -> bytes:
    """((x, x), (x, x)) ... nested ``levels`` times through the memo: 2**levels leaves."""
    body = pickle.EMPTY_TUPLE + pickle.MEMOIZE
    for level in range(levels):
        body += pickle.BINGET + bytes([level]) + pickle.BINGET + bytes([level]) + pickle.TUPLE2 + pickle.MEMOIZE
    return body


def doubling_list(levels: int) -> bytes:
    body = pickle.EMPTY_LIST + pickle.MEMOIZE
    for level in range(levels):
        body += (pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.MARK + pickle.BINGET + bytes([2 * level])
                 + pickle.BINGET + bytes([2 * level]) + pickle.APPENDS + pickle.MEMOIZE)
    return body


HANGING_OR_CRASHING = {
    # hashing a tuple walks it as a tree: 2**60 steps
    "shared tuple as a dict key": PROTO + pickle.EMPTY_DICT + doubling_tuple(60) + pickle.NONE + pickle.SETITEM
    + pickle.STOP,
    # a million nested tuples: hashing recurses in C and overflows the stack
    "deep tuple as a set item": PROTO + pickle.EMPTY_SET + pickle.MARK + pickle.EMPTY_TUPLE
    + pickle.TUPLE1 * 1_000_000 + pickle.ADDITEMS + pickle.STOP,
    # numpy reads as many list items as the shape says, past the end of a short list
    "numpy object array with a short list": PROTO + glob("numpy._core.multiarray", "_reconstruct")
    + glob("numpy", "ndarray") + i32(0) + pickle.TUPLE1 + b"C\x01b" + pickle.TUPLE3 + pickle.REDUCE
    + pickle.MARK + i32(1) + i32(1_000_000) + pickle.TUPLE1 + glob("numpy", "dtype") + s("O8") + pickle.NEWFALSE
    + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE + pickle.NEWFALSE + pickle.EMPTY_LIST + pickle.TUPLE
    + pickle.BUILD + pickle.STOP,
}


@pytest.mark.parametrize("case", list(HANGING_OR_CRASHING))
def test_hostile_pickle_cannot_hang_or_crash(case):
    assert decode_in_subprocess(HANGING_OR_CRASHING[case]) == "refused"


def test_shared_containers_cannot_explode_later_tree_walks():
    """A list of lists sharing one list 2**40 times decodes to a small object, but every walk over
    it (insert_tensors, the hidden-tensor check) would visit 2**40 nodes: refused."""
    data = PROTO + doubling_list(40) + pickle.STOP
    outcome, peak = peak_bytes(lambda: safe_loads(data))
    assert outcome == "UnsafeCheckpointError" and peak < 4 << 20


def test_hash_flooding_is_refused():
    """Integer keys that all share one hash make dict insertion quadratic."""
    p = (1 << 61) - 1  # hash(k * p) == 0 for every k
    items = b"".join(pickle.dumps(k * p, protocol=5)[2:-1] + pickle.NONE for k in range(1, MAX_EQUAL_HASHES + 2))
    data = PROTO + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.STOP
    with pytest.raises(UnsafeCheckpointError, match="share a hash"):
        safe_loads(data)
    ok = pickle.dumps({k * p: None for k in range(1, MAX_EQUAL_HASHES)}, protocol=5)
    assert len(safe_loads(ok)) == MAX_EQUAL_HASHES - 1


@pytest.mark.parametrize("data, reason", [
    # a value-only global is never called
    (PROTO + glob("builtins", "int") + s("5") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP, "may not be called"),
    (PROTO + glob("builtins", "getattr") + pickle.STOP, "not allowed"),
    (PROTO + glob("os", "system") + pickle.STOP, "not allowed"),
    (PROTO + glob("torch", "_dynamo") + pickle.STOP, "not allowed"),  # no lazy import through torch's getattr
    # protocol 0/1 object instructions and the extension registry are not produced by dumps
    (b"(icollections\nOrderedDict\n.", "not produced"),
    (PROTO + pickle.EXT1 + b"\x01" + pickle.STOP, "not produced"),
    # state only for the types whose pickles carry one
    (PROTO + pickle.EMPTY_LIST + pickle.EMPTY_DICT + pickle.BUILD + pickle.STOP, "state of a builtins.list"),
    # items only into containers
    (PROTO + pickle.BYTEARRAY8 + struct.pack("<Q", 1) + b"x" + pickle.MARK + i32(1) + pickle.APPENDS + pickle.STOP,
     "cannot add items"),
    # numpy's global float64 descriptor must not be mutable through BUILD (copy=False)
    (PROTO + glob("numpy", "dtype") + s("f8") + pickle.NEWFALSE + pickle.NEWFALSE + pickle.TUPLE3 + pickle.REDUCE
     + pickle.STOP, "copy=True"),
    (PROTO + glob("numpy", "dtype") + s("M8") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE
     + pickle.STOP, "plain type string"),
    (PROTO + pickle.NONE + pickle.BINPERSID + pickle.STOP, "persistent"),
    (PROTO + pickle.NONE, "truncated"),
    (b"", "truncated"),
])
def test_forbidden_or_malformed_pickles_are_refused(data, reason):
    with pytest.raises(UnsafeCheckpointError, match=reason):
        safe_loads(data)


class Reduces:
    """Pickles as an arbitrary reduction, as a hostile writer would produce it."""

    def __init__(self, *rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


def test_numpy_array_and_dtype_states_are_checked():
    """The states numpy does not fully validate itself: array data length, a dtype's layout."""
    strided = np.arange(12.0).reshape(3, 4).T[::2]  # not contiguous: pickled with an explicit state
    assert np.array_equal(safe_loads(pickle.dumps(strided, protocol=5)), strided)
    rebuild = (np.arange(1).__reduce__()[0], (np.ndarray, (0,), b"b"))  # numpy's _reconstruct
    f8 = np.dtype("f8")
    for state, reason in [((1, (6,), f8, False, b"\0" * 47), "needs 48 bytes"),
                          ((1, (6,), np.dtype("O"), False, [1]), "needs a list of 6"),
                          ((1, (-1,), f8, False, b""), "negative"),
                          ((1, (2,) * 65, f8, False, b""), "at most 64")]:
        with pytest.raises(UnsafeCheckpointError, match=reason):
            safe_loads(pickle.dumps(Reduces(*rebuild, state), protocol=5))
    wrong = Reduces(np.dtype, ("f8", False, True), (3, "<", None, None, None, 1 << 20, -1, 0))
    with pytest.raises(UnsafeCheckpointError, match="not the state of a plain"):
        safe_loads(pickle.dumps(wrong, protocol=5))
    assert safe_loads(pickle.dumps(Reduces(np.dtype, ("f8", False, True), (3, ">", None, None, None, -1, -1, 0)),
                                   protocol=5)) == np.dtype(">f8")


def test_hollow_of_10000_placeholders_decodes_and_round_trips():
    sd = BasicTensorAwareStateDict({f"layer{i}": {"w": torch.empty(4, 4), "step": i} for i in range(10_000)})
    tensors = sd.pop_tensors()
    data = dumps(sd)
    back = safe_loads(data)
    assert back.is_hollow and back.state_dict["layer9999"]["w"] == TensorPlaceholder(9999, torch.float32, (4, 4))
    back.insert_tensors(tensors)
    # memory of a legitimate decode stays within a small multiple of the input
    _, peak = peak_bytes(lambda: safe_loads(data))
    assert peak < 40 * len(data), f"{peak / len(data):.0f}x the input"


# -- defect 2: dumps refuses what safe_loads refuses -------------------------------------------

class NotAllowed:
    def __init__(self, x):
        self.x = x


class Trusted:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Trusted and other.x == self.x


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_dumps_names_a_disallowed_class_and_how_to_allow_it():
    sd = BasicTensorAwareStateDict({"w": torch.ones(2), "cfg": NotAllowed(3)})
    sd.pop_tensors()
    with pytest.raises(DisallowedGlobalError) as err:
        dumps(sd)
    assert isinstance(err.value, TypeError)
    assert f"{__name__}.NotAllowed" in str(err.value) and "tasd.add_safe_globals" in str(err.value)
    for bad, name in [({"f": RunsCode()}, "system"), ({"c": collections.Counter(a=1)}, "collections.Counter"),
                      ({"l": lambda: 0}, "<lambda>"), ({"p": print}, "builtins.print"),
                      ({"d": np.dtype([("a", "i4")])}, "numpy.dtype"), ({"t": np.zeros(1, "M8[s]")}, "numpy.dtype")]:
        with pytest.raises(DisallowedGlobalError, match=name.replace(".", r"\.").replace("<", ".").replace(">", ".")):
            dumps(bad)


def test_trusted_class_round_trips():
    assert (__name__, "Trusted") not in get_safe_globals()
    with pytest.raises(DisallowedGlobalError, match="Trusted"):
        dumps({"t": Trusted(1)})
    with pytest.raises(UnsafeCheckpointError, match="Trusted"):
        safe_loads(pickle.dumps({"t": Trusted(1)}, protocol=5))
    tasd.add_safe_globals([Trusted])
    assert safe_loads(dumps({"t": Trusted([1, 2])})) == {"t": Trusted([1, 2])}


ALLOWED_VALUES = {
    "namespace": argparse.Namespace(lr=0.1, betas=[0.9, 0.99]),
    "ordered": collections.OrderedDict(a=1, b=[2]),
    "defaultdict": collections.defaultdict(list, a=[1]),
    "deque": collections.deque([1, 2], maxlen=5),
    "complex": 1 + 2j, "slice": slice(1, None, 2), "range": range(0, 10, 3), "frozenset": frozenset({1, (2, 3)}),
    "tuple keys": {(1, 2): 3, 2.5: 1, 10 ** 30: 2, -1: 0, -2: 1},
    "np int": np.arange(6).reshape(2, 3), "np strided": np.arange(12.0).reshape(3, 4).T[::2],
    "np object": np.array([1, "a", None], dtype=object), "np big-endian": np.arange(3, dtype=">i4"),
    "np bytes": np.array([b"ab", b"c"]), "np str": np.array(["x", "yz"]), "np empty": np.zeros((0, 3)),
    "np scalars": [np.float64(1.5), np.bool_(True), np.complex64(1j), np.float16(2), np.int8(-3)],
    "np rng state": np.random.RandomState(0).get_state(),
    "torch": [torch.device("cuda", 1), torch.device("cpu"), torch.Size([2, 3]), torch.bfloat16],
    "types": [int, float, dict], "bytearray": bytearray(b"xy"),
}


@pytest.mark.parametrize("name", list(ALLOWED_VALUES))
def test_what_dumps_accepts_safe_loads_decodes(name):
    value = ALLOWED_VALUES[name]
    back = safe_loads(dumps({"v": value}))["v"]
    if isinstance(value, np.ndarray):  # a strided array comes back contiguous
        assert back.dtype == value.dtype and np.array_equal(back, value)
    else:
        assert pickle.dumps(back, protocol=5) == pickle.dumps(value, protocol=5)


def test_every_kind_round_trips():
    sd = BasicTensorAwareStateDict(every_kind())
    tensors = sd.pop_tensors()
    back = safe_loads(dumps(sd))
    back.insert_tensors(tensors)
    sd.insert_tensors(tensors)
    assert_same(back.state_dict, sd.state_dict)


def test_a_fresh_process_decodes_classes_of_tasd_modules_it_has_not_imported():
    """A restarted rank that receives its part from a peer decodes it before anything imported the
    module of the part's class (tasd.mcore): the decoder imports tasd's own modules on demand,
    and only those."""
    pytest.importorskip("megatron.core")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tasd.mcore import MCoreTensorAwareStateDict

    sd, _ = MCoreTensorAwareStateDict.from_state_dict(
        {"w": ShardedTensor.from_rank_offsets("w", torch.arange(3.0)), "iteration": 7}, algo="atomic")
    sd.pop_tensors()
    code = textwrap.dedent("""
        import sys
        from tasd.serialization import safe_loads
        assert "tasd.mcore" not in sys.modules
        obj = safe_loads(sys.stdin.buffer.read())
        for name in ("tasd.cli", "tasd.adapters.megatron_cpu"):
            try:
                safe_loads(b"\\x80\\x04c" + name.encode() + b"\\nX\\n.")
            except Exception:
                pass
            assert name not in sys.modules, name
        print(type(obj).__module__, type(obj).__qualname__, obj.common_state_dict["iteration"])
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], input=dumps(sd), capture_output=True,
                         timeout=120, cwd=ROOT)
    assert out.stdout.decode().split() == ["tasd.mcore", "MCoreTensorAwareStateDict", "7"], out.stderr.decode()[-2000:]
    # Only tasd's backend modules are imported, and only ones that exist: never other tasd code.
    for module in ("tasd.no_such_module", "tasdx", "os", "tasd.cli", "tasd.adapters.megatron_cpu"):
        with pytest.raises(UnsafeCheckpointError, match=f"{module}.X is not allowed"):
            safe_loads(PROTO + glob(module, "X") + pickle.STOP)
