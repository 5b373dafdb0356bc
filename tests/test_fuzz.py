"""Bounded fuzzing of everything that decodes untrusted bytes: the part reader (files, and prefixes
received from peers) and the hollow state dict decoder.

Properties: only the documented errors come out (CorruptCheckpointError from the part reader,
UnsafeCheckpointError from safe_loads), nothing is loaded that differs from what was written, and
the memory a decode allocates stays within a small multiple of its input plus a constant (Python
objects are large: the worst case is about 230 times the input, for a pickle of empty sets).

The in-suite run is small, deterministic and takes a few seconds per test. For a longer, random
run set TASD_FUZZ_EXAMPLES (examples per test), e.g.::

    TASD_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import collections
import os
import pickle
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasd import BasicTensorAwareStateDict
from tasd.managers import CorruptCheckpointError
from tasd.managers.fileformat import PartMeta, RawPart, encode_prefix, parse_prefix, verify_data
from tasd.managers.partio import read_header, read_part, verify_part
from tasd.serialization import UnsafeCheckpointError, dumps, safe_loads
from tasd.staging import HostBufferPool, stage

EXAMPLES = int(os.environ.get("TASD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 120, deadline=None, database=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

def memory_bound(n: int) -> int:
    """Peak traced allocation allowed for decoding ``n`` bytes."""
    return 300 * n + (4 << 20)


def sample_state() -> BasicTensorAwareStateDict:
    g = torch.Generator().manual_seed(0)
    return BasicTensorAwareStateDict({
        "w": torch.randn(300, generator=g), "b": torch.zeros(7, dtype=torch.int8), "step": torch.tensor(3),
        "meta": {"lr": 0.1, "name": "x", "pair": (1, 2), "np": np.arange(3), "od": collections.OrderedDict(a=1),
                 "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "set": {1, 2}},
    })


def part_bytes() -> tuple[bytes, bytes, torch.Tensor]:
    """(whole part file, prefix, data buffer) of the sample state."""
    sd = sample_state()
    staged = stage(sd.pop_tensors(), HostBufferPool(pin=False))
    prefix = encode_prefix(PartMeta(4, 0, 2, "fuzz", None, save_id="s1", job_id="j"), dumps(sd), staged.layouts,
                           staged.buffer)
    buffer = staged.buffer.clone()
    return prefix + buffer.numpy().tobytes(), prefix, buffer


def hollow_bytes() -> bytes:
    sd = sample_state()
    sd.pop_tensors()
    return dumps(sd)


PART, PREFIX, DATA = part_bytes()
HOLLOW = hollow_bytes()


def mutated(base: bytes):
    """Byte flips, overwritten runs, truncation, extension and splices of ``base``."""
    n = len(base)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        flips.map(lambda fs: _apply(base, fs)),
        st.integers(0, n - 1).map(lambda k: base[:k]),
        st.binary(min_size=1, max_size=64).map(lambda extra: base + extra),
        st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=32)).map(
            lambda t: base[:min(t[0], t[1])] + t[2] + base[max(t[0], t[1]):]),
        st.tuples(flips, st.integers(1, n)).map(lambda t: _apply(base, t[0])[:t[1]]),
    )


def _apply(base: bytes, flips) -> bytes:
    out = bytearray(base)
    for i, b in flips:
        out[i] = b
    return bytes(out)


def bounded(fn, n: int, allowed: tuple[type[BaseException], ...]):
    """Run ``fn``; only ``allowed`` errors may come out, and its traced peak must respect the
    memory bound for ``n`` input bytes. Returns the value, or None when refused."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            return fn()
        except allowed:
            return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= memory_bound(n), f"decoding {n} bytes allocated {peak} bytes"
        assert time.perf_counter() - t0 < 10, "decoding a small input took more than 10 s"


# -- the part reader ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def part_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=mutated(PART))
def test_part_files(part_dir, data):
    path = part_dir / "iter_0000004_0_local.tasd"
    path.write_bytes(data)
    for reader in (read_header, verify_part):
        bounded(lambda: reader(path), len(data), (CorruptCheckpointError,))
    part = bounded(lambda: read_part(path), len(data), (CorruptCheckpointError,))
    if part is not None:  # every byte of a part is covered by a checksum or checked to be zero
        assert data == PART, "a modified file was loaded"
        part.hollow.insert_tensors(part.tensors())


@FUZZ
@given(prefix=mutated(PREFIX), data_nbytes=st.sampled_from([DATA.numel(), 0, DATA.numel() - 1, DATA.numel() + 64]))
def test_received_prefixes(prefix, data_nbytes):
    """A peer sends any prefix and announces any data size: parse_prefix, verify_data and decode
    either refuse with CorruptCheckpointError or give back exactly the part."""
    buffer = torch.zeros(data_nbytes, dtype=torch.uint8)
    buffer[: min(data_nbytes, DATA.numel())] = DATA[: min(data_nbytes, DATA.numel())]

    def receive():
        header, hollow = parse_prefix(prefix, data_nbytes, "a fuzzed peer")
        verify_data(header, buffer, "a fuzzed peer")
        return RawPart(header, prefix, hollow, buffer).decode("a fuzzed peer")

    part = bounded(receive, len(prefix) + data_nbytes, (CorruptCheckpointError,))
    if part is not None:
        part.hollow.insert_tensors(part.tensors())
        assert torch.equal(part.tensors()[0], sample_state().state_dict["w"])


# -- the hollow decoder -------------------------------------------------------------------------

@FUZZ
@given(data=mutated(HOLLOW))
def test_mutated_hollow_pickles(data):
    bounded(lambda: safe_loads(data), len(data), (UnsafeCheckpointError,))


OPCODES = [bytes([c]) for c in sorted({op.code.encode("latin-1")[0] for op in __import__("pickletools").opcodes})]
ARGS = st.one_of(st.just(b""), st.binary(min_size=1, max_size=9),
                 st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff" * 8, b"builtins\nbytes\n"]))


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(OPCODES), ARGS), max_size=40),
       names=st.lists(st.sampled_from([("builtins", "bytes"), ("builtins", "list"), ("builtins", "range"),
                                       ("collections", "deque"), ("torch", "Size"), ("numpy", "dtype"),
                                       ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                                       ("tasd.state_dict", "TensorPlaceholder"), ("os", "system")]), max_size=3))
def test_random_small_pickles(ops, names):
    """Random opcode sequences with random arguments, with a few real globals pushed first."""
    head = b"\x80\x05" + b"".join(
        b"\x8c" + bytes([len(m)]) + m.encode() + b"\x8c" + bytes([len(n)]) + n.encode() + b"\x93" for m, n in names)
    data = head + b"".join(op + arg for op, arg in ops) + b"."
    bounded(lambda: safe_loads(data), len(data), (UnsafeCheckpointError,))


# -- what dumps accepts, safe_loads decodes -------------------------------------------------------

ATOMS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                  st.binary(max_size=8), st.complex_numbers(allow_nan=False),
                  st.sampled_from([torch.float16, torch.int64, torch.device("cpu"), torch.Size([1, 2]), int, dict,
                                   slice(1, 5, 2), range(3), np.float32(1.5), np.int64(-2)]),
                  st.lists(st.integers(-5, 5), max_size=6).map(lambda xs: np.array(xs, dtype=np.int16)))
VALUES = st.recursive(
    ATOMS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=4),
                            st.frozensets(st.integers(), max_size=4),
                            st.lists(inner, max_size=3).map(collections.deque),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3).map(collections.OrderedDict)),
    max_leaves=20)


@FUZZ
@given(value=VALUES)
def test_what_dumps_accepts_safe_loads_decodes(value):
    data = dumps(value)
    back = safe_loads(data)
    assert pickle.dumps(back, protocol=5) == pickle.dumps(value, protocol=5) or _same_arrays(back, value)


def _same_arrays(a, b) -> bool:
    """Equal up to numpy arrays, which compare element-wise."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same_arrays(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, collections.deque)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_arrays(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)
