"""The part file format: round trip, and every kind of damage reported as unusable, never loaded."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
import xxhash

from tasd import BasicTensorAwareStateDict
from tasd.managers import CorruptCheckpointError
from tasd.managers.fileformat import CHUNK_BYTES, DIRTY_SUFFIX, PREAMBLE, PartMeta
from tasd.managers.partio import read_header, read_part, verify_part, write_part
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, stage
from tests.test_basic_state_dict import assert_same, every_kind


def write_sd(path: Path, sd_dict: dict, direct_io: bool = True) -> list[torch.Tensor]:
    sd = BasicTensorAwareStateDict(sd_dict)
    tensors = sd.pop_tensors()
    staged = stage(tensors, HostBufferPool())
    write_part(path, PartMeta(7, 1, 2, "sess", None), dumps(sd), staged.buffer, staged.layouts, direct_io=direct_io)
    return tensors


@pytest.mark.parametrize("direct_io", [True, False])
def test_round_trip_every_kind(tmp_path, direct_io):
    path = tmp_path / "p.tasd"
    original = every_kind()
    write_sd(path, original, direct_io)
    assert not Path(str(path) + DIRTY_SUFFIX).exists()
    part = read_part(path)
    assert part.header.meta == PartMeta(7, 1, 2, "sess", None)
    assert part.header.data_offset % 4096 == 0 and path.stat().st_size == part.header.file_size
    sd = part.hollow
    sd.insert_tensors(part.tensors())
    assert_same(sd.state_dict, original)
    assert verify_part(path).meta.iteration == 7


def test_multi_chunk_data_is_checked_per_chunk(tmp_path):
    path = tmp_path / "big.tasd"
    big = torch.arange((CHUNK_BYTES * 2 + 4096) // 4, dtype=torch.int32)  # three chunks, last partial
    write_sd(path, {"big": big, "tail": torch.ones(3)})
    part = read_part(path)
    assert len(part.header.chunk_xxh3) == 3
    assert torch.equal(part.tensors()[0], big)
    flip(path, part.header.data_offset + CHUNK_BYTES + 5)  # damage the middle chunk only
    with pytest.raises(CorruptCheckpointError, match="chunk 1"):
        read_part(path)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.tasd"
    write_sd(path, {"w": torch.randn(1000), "meta": {"step": 3}})
    return path


def damage_cases(path: Path):
    header = read_header(path)
    return {
        "truncated": lambda: os.truncate(path, path.stat().st_size - 100),
        "extended": lambda: open(path, "ab").write(b"\0" * 10),
        "empty": lambda: os.truncate(path, 0),
        "magic": lambda: flip(path, 0),
        "header": lambda: flip(path, PREAMBLE.size + 10),
        "hollow": lambda: flip(path, header.hollow_offset + 3),
        "data": lambda: flip(path, header.data_offset + 123),
        "last byte": lambda: flip(path, path.stat().st_size - 1),
    }


@pytest.mark.parametrize("case", ["truncated", "extended", "empty", "magic", "header", "hollow", "data", "last byte"])
def test_damaged_file_is_reported_unusable(good, case):
    damage_cases(good)[case]()
    with pytest.raises(CorruptCheckpointError, match=str(good)):
        read_part(good)
    with pytest.raises(CorruptCheckpointError):
        verify_part(good)


def rewrite_header(path: Path, edit) -> None:
    """Rewrite the JSON header as a malicious or buggy writer would: the header checksum matches
    and the hollow bytes and data keep their places, so only the edited field is wrong."""
    raw = path.read_bytes()
    magic, n, _ = PREAMBLE.unpack(raw[: PREAMBLE.size])
    header = json.loads(raw[PREAMBLE.size : PREAMBLE.size + n])
    hollow = raw[PREAMBLE.size + n : PREAMBLE.size + n + header["hollow"]["nbytes"]]
    data_offset = header["data"]["offset"]
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    prefix = PREAMBLE.pack(magic, len(text), xxhash.xxh3_64_intdigest(text)) + text + hollow
    assert len(prefix) <= data_offset
    path.write_bytes(prefix.ljust(data_offset, b"\0") + raw[data_offset:])


@pytest.mark.parametrize("edit, reason", [
    (lambda h: h.update(format_version=99), "format_version"),
    (lambda h: h["tensors"][0].__setitem__(0, "not_a_dtype"), "unknown dtype"),
    (lambda h: h["tensors"][0].__setitem__(1, [10 ** 9]), "does not fit"),
    (lambda h: h["data"].__setitem__("chunk_xxh3", []), "checksum list"),
    (lambda h: h.update(iteration="7"), "iteration"),
])
def test_inconsistent_header_is_rejected(good, edit, reason):
    rewrite_header(good, edit)
    with pytest.raises(CorruptCheckpointError, match=reason):
        read_part(good)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_forbidden_global_is_never_executed(tmp_path, monkeypatch):
    """A hollow state dict naming a global outside the allow-list is refused, and nothing runs."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.tasd"
    staged = stage([torch.ones(2)], HostBufferPool())
    payload = pickle.dumps({"x": Evil()}, protocol=5)
    write_part(path, PartMeta(1, 0, 1), payload, staged.buffer, staged.layouts)
    with pytest.raises(CorruptCheckpointError, match="posix.system|os.system|not allowed"):
        read_part(path)
    assert not (tmp_path / "pwned").exists()


def test_mutations_never_escape_as_other_errors(good):
    """Random byte edits anywhere: either the file still verifies (edit was a no-op) or it is
    reported as CorruptCheckpointError; nothing else escapes and nothing is loaded silently."""
    pristine = good.read_bytes()
    rng = random.Random(1234)
    for _ in range(60):
        data = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        good.write_bytes(bytes(data))
        try:
            part = read_part(good)
        except CorruptCheckpointError:
            continue
        assert bytes(data) == pristine, "a modified file was loaded"
        assert part.header.meta.iteration == 7


def test_write_failure_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "p.tasd"
    staged = stage([torch.ones(4)], HostBufferPool())

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_part(path, PartMeta(1, 0, 1), dumps({}), staged.buffer, staged.layouts)
    assert list(tmp_path.iterdir()) == []
