"""The part file format: round trip, and every kind of damage reported as unusable, never loaded."""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import pickle
import random
import threading
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch
import xxhash
from rich.console import Console

from tasd import BasicTensorAwareStateDict
from tasd.inspect import run_inspect, scan, summarize
from tasd.managers import CorruptCheckpointError, partio
from tasd.managers.fileformat import CHUNK_BYTES, FORMAT_VERSION, PREAMBLE, PartMeta
from tasd.managers.partnames import DIRTY_SUFFIX
from tasd.managers.partio import read_header, read_part, read_raw_part, verify_part, write_part
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


# -- hostile headers: every malformed input is a CorruptCheckpointError -------------------------

def rewrite_header_text(path: Path, edit) -> None:
    """Replace the header's JSON text by ``edit(text)`` (checksum recomputed), keeping the hollow
    bytes and the data where they were (a header that parses must keep the data offset valid)."""
    raw = path.read_bytes()
    magic, n, _ = PREAMBLE.unpack(raw[: PREAMBLE.size])
    text = raw[PREAMBLE.size : PREAMBLE.size + n].decode()
    header = json.loads(text)
    hollow = raw[PREAMBLE.size + n : PREAMBLE.size + n + header["hollow"]["nbytes"]]
    data_offset = header["data"]["offset"]
    new = edit(text).encode()
    prefix = PREAMBLE.pack(magic, len(new), xxhash.xxh3_64_intdigest(new)) + new + hollow
    path.write_bytes(prefix.ljust(max(len(prefix), data_offset), b"\0") + raw[data_offset:])


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.replace('"iteration":7', '"iteration":' + "9" * 5000), "not valid JSON"),  # int digit limit
    (lambda t: t.replace('"replication":null', '"replication":' + "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    (lambda t: t.replace('"iteration":7', '"iteration":1e400'), "iteration"),
    (lambda t: t.replace('"session_id":"sess"', '"session_id":"\\ud800"'), "session_id"),
    (lambda t: t.replace('"save_id":""', '"save_id":"' + "x" * 129 + '"'), "save_id"),
    (lambda t: t.replace('"job_id":""', '"job_id":7'), "job_id"),
])
def test_crafted_header_text_is_reported_unusable(good, edit, reason):
    rewrite_header_text(good, edit)
    with pytest.raises(CorruptCheckpointError, match=reason):
        read_part(good)
    with pytest.raises(CorruptCheckpointError, match=reason):
        read_header(good)


@pytest.mark.parametrize("edit, reason", [
    (lambda h: h["tensors"][0].__setitem__(1, [10 ** 30, 0]), "malformed shape"),  # 0 bytes, but no such tensor
    (lambda h: h["tensors"][0].__setitem__(1, [1] * 65), "malformed shape"),
    (lambda h: h["tensors"][0].__setitem__(2, 10 ** 30), "malformed shape/offset"),
    (lambda h: h.update(world_size=10 ** 30), "world_size"),
    (lambda h: h.update(owner_rank=2), "owner_rank"),  # world size 2
    (lambda h: h["data"].update(chunk_bytes=1), "chunk_bytes"),
    (lambda h: h["data"].update(chunk_bytes=3 << 20), "power of two"),
    (lambda h: h["hollow"].update(nbytes=10 ** 30), "nbytes"),
    (lambda h: h.update(replication={"strategy": ["nested"]}), "replication"),
    (lambda h: h.update(save_id=None), "save_id"),
    (lambda h: h.update(format_version=1), "format_version 1"),  # format 1 files are refused
    (lambda h: h["tensors"].append(h["tensors"][0]), "overlaps or precedes"),
])
def test_out_of_bounds_header_numbers_are_rejected(good, edit, reason):
    rewrite_header(good, edit)
    with pytest.raises(CorruptCheckpointError, match=reason):
        read_part(good)


def test_data_offset_far_from_the_hollow_is_rejected_without_reading_it(tmp_path):
    """A header may not put the data section gigabytes after the hollow state dict (a reader
    would read all of it as padding)."""
    path = tmp_path / "far.tasd"
    write_sd(path, {"w": torch.ones(4)})
    raw = path.read_bytes()
    far = 256 << 20
    rewrite_header(path, lambda h: h["data"].update(offset=far))
    with open(path, "r+b") as f:  # a sparse file: the data where the header says
        f.truncate(far)
        f.seek(far)
        f.write(raw[read_header_offset(raw):])
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="data offset"):
            read_part(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def read_header_offset(raw: bytes) -> int:
    _, n, _ = PREAMBLE.unpack(raw[: PREAMBLE.size])
    return json.loads(raw[PREAMBLE.size : PREAMBLE.size + n])["data"]["offset"]


def test_hostile_10kb_files_cost_little_memory(good):
    """Decoding any damaged variant of a small part never costs more than a few MB."""
    pristine = good.read_bytes()
    assert len(pristine) < 16 << 10
    rng = random.Random(7)
    tracemalloc.start()
    try:
        for _ in range(30):
            data = bytearray(pristine)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            good.write_bytes(bytes(data))
            tracemalloc.reset_peak()
            try:
                read_part(good)
            except CorruptCheckpointError:
                pass
            assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


# -- special files named like parts --------------------------------------------------------------

def finishes_within(fn, seconds: float = 20.0, unblock: Path | None = None):
    """Run ``fn`` in a thread: (finished, outcome). A FIFO reader blocked in open() is released
    afterwards by opening the FIFO for writing."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
            box["out"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    finished = not th.is_alive()
    if not finished and unblock is not None:
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        th.join(seconds)
    return finished, box.get("out")


@pytest.mark.parametrize("reader", [read_header, verify_part, read_part, read_raw_part])
def test_fifo_named_like_a_part_is_reported_not_waited_on(tmp_path, reader):
    fifo = tmp_path / "iter_0000001_0_local.tasd"
    os.mkfifo(fifo)
    finished, out = finishes_within(lambda: reader(fifo), unblock=fifo)
    assert finished, f"{reader.__name__} blocked on a FIFO"
    assert isinstance(out, CorruptCheckpointError) and "FIFO" in str(out)


def test_symlinks_and_directories_named_like_parts_are_not_followed(good, tmp_path):
    link = tmp_path / "link.tasd"
    link.symlink_to(good)  # even to a good part: a link could point anywhere
    dangling = tmp_path / "dangling.tasd"
    dangling.symlink_to(tmp_path / "nothing")
    folder = tmp_path / "folder.tasd"
    folder.mkdir()
    for path, what in [(link, "symbolic link"), (dangling, "symbolic link"), (folder, "directory")]:
        for reader in (read_header, verify_part, read_part, read_raw_part):
            with pytest.raises(CorruptCheckpointError, match=what):
                reader(path)
    with pytest.raises(FileNotFoundError):
        read_part(tmp_path / "vanished.tasd")


def test_inspect_lists_special_files_as_problems(tmp_path):
    """A FIFO and a dangling symbolic link among the parts: inspect lists them, neither hangs nor
    crashes, with or without --verify."""
    rank = tmp_path / "sess" / "0"
    rank.mkdir(parents=True)
    write_sd(rank / "iter_0000007_0_local.tasd", {"w": torch.ones(4)})  # owner 0 of 2 (PartMeta(7, 1, 2))
    os.mkfifo(rank / "iter_0000009_0_local.tasd")
    (rank / "iter_0000008_0_local.tasd").symlink_to(tmp_path / "nothing")
    for verify in (False, True):
        console = Console(file=io.StringIO(), width=300)
        finished, out = finishes_within(lambda: run_inspect(str(tmp_path), verify=verify, console=console),
                                        unblock=rank / "iter_0000009_0_local.tasd")
        assert finished, "inspect blocked on a FIFO"
        assert out == 1, out
        text = " ".join(console.file.getvalue().split())
        assert "a FIFO, not a regular file" in text and "a symbolic link, not a regular file" in text


# -- tensors own their bytes -------------------------------------------------------------------

def test_loaded_tensors_own_exactly_their_bytes(tmp_path):
    path = tmp_path / "p.tasd"
    original = every_kind()
    write_sd(path, original)
    part = read_part(path)
    for t in part.tensors():
        assert t.untyped_storage().nbytes() == t.nbytes
    sd = part.hollow
    sd.insert_tensors(part.tensors())
    assert_same(sd.state_dict, original)


def test_a_kept_small_tensor_does_not_keep_its_part_alive(tmp_path):
    """Adam's ``step`` kept after a load must not keep the whole part's memory (64 MiB here)."""
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "p.tasd"
    write_sd(path, {"big": torch.ones(16 << 20), "step": torch.tensor(3.0)})
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    part = read_part(path)
    step = part.tensors()[1]
    loaded = proc.memory_info().rss
    del part
    gc.collect()
    after = proc.memory_info().rss
    assert loaded - before > 48 << 20, "the part was loaded"
    assert after - before < 16 << 20, f"{(after - before) >> 20} MiB still alive for a 4-byte tensor"
    assert step.item() == 3.0


def test_raw_part_decode_copies_tensors_out_of_the_received_buffer(tmp_path):
    path = tmp_path / "p.tasd"
    original = {"w": torch.randn(1000), "step": torch.tensor(2)}
    write_sd(path, original)
    raw = read_raw_part(path)
    buffer = weakref.ref(raw.buffer)
    part = raw.decode("a received part")
    del raw
    gc.collect()
    assert buffer() is None, "the decoded part keeps the received buffer alive"
    tensors = part.tensors()
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)
    part.hollow.insert_tensors(tensors)
    assert_same(part.hollow.state_dict, original)


@pytest.mark.parametrize("n_tensors", [1, 3, 2000])
def test_scatter_read_checks_every_chunk_and_padding(tmp_path, monkeypatch, n_tensors):
    """Small batches and chunks force pieces across batch and chunk boundaries; damage anywhere,
    padding between tensors included, is found."""
    monkeypatch.setattr(partio, "READ_BATCH_BYTES", 4096)
    monkeypatch.setattr(partio, "IOV_MAX", 7)
    path = tmp_path / "p.tasd"
    g = torch.Generator().manual_seed(n_tensors)
    tensors = {f"t{i}": torch.randn(int(torch.randint(0, 3000, (1,), generator=g)), generator=g)
               for i in range(n_tensors)}
    write_sd(path, tensors)
    part = read_part(path)
    part.hollow.insert_tensors(part.tensors())
    assert_same(part.hollow.state_dict, tensors)
    header = part.header
    gaps = [lay.offset + lay.nbytes for lay, nxt in zip(header.layouts, header.layouts[1:])
            if nxt.offset > lay.offset + lay.nbytes]
    for offset in ([gaps[0]] if gaps else []) + [header.data_nbytes - 1, header.data_nbytes // 2]:
        data = path.read_bytes()
        flip(path, header.data_offset + offset)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            read_part(path)
        path.write_bytes(data)


# -- save identity ---------------------------------------------------------------------------

def test_save_and_job_ids_are_recorded_and_validated(tmp_path):
    path = tmp_path / "p.tasd"
    staged = stage([torch.ones(2)], HostBufferPool())
    meta = PartMeta(3, 0, 1, "s", None, save_id="a" * 128, job_id="job-1")
    write_part(path, meta, dumps({}), staged.buffer, staged.layouts)
    assert read_part(path).header.meta == meta
    header = json.loads(path.read_bytes()[PREAMBLE.size:PREAMBLE.size + read_header(path).hollow_offset
                                          - PREAMBLE.size])
    assert header["format_version"] == FORMAT_VERSION == 2 and header["save_id"] == "a" * 128
    assert header["job_id"] == "job-1"
    for bad in [dict(save_id="a" * 129), dict(job_id=None), dict(session_id="s" * 256), dict(owner_rank=1),
                dict(iteration=-1), dict(iteration=1 << 63), dict(replication={"k": [1]})]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            PartMeta(**{**dict(iteration=3, owner_rank=0, world_size=1), **bad})


def test_inspect_keeps_saves_of_one_iteration_apart(tmp_path):
    """Two ranks' parts of iteration 5 from two different saves are not one recoverable checkpoint."""
    for rank, save in [(0, "save-A"), (1, "save-B")]:
        d = tmp_path / "sess" / str(rank)
        d.mkdir(parents=True)
        staged = stage([torch.ones(2)], HostBufferPool())
        write_part(d / f"iter_0000005_{rank}_local.tasd", PartMeta(5, rank, 2, "sess", None, save_id=save),
                   dumps({}), staged.buffer, staged.layouts)
    rows = summarize(scan(tmp_path))
    assert [(r["save_id"], r["recoverable"], r["missing"]) for r in rows] == [
        ("save-A", False, [1]), ("save-B", False, [0])]
    console = Console(file=io.StringIO(), width=300)
    assert run_inspect(str(tmp_path), console=console) == 1
    text = console.file.getvalue()
    assert "save-A" in text and "save-B" in text and "recoverable" not in text


def test_a_byte_view_of_a_loaded_tensor_keeps_its_storage_alive():
    import gc
    from tasd.managers.fileformat import own_storage
    from tasd.staging import TensorLayout
    for dtype, shape in ((torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.bool, (9,)), (torch.float8_e4m3fn, (4,)),
                         (torch.float32, (0,))):
        t_bytes = torch.empty(shape, dtype=dtype).nbytes
        t, view = own_storage(TensorLayout(dtype, shape, 0, t_bytes))
        assert view.nbytes == t_bytes and (view.format == "B" or not t_bytes)
        if not t_bytes:
            continue
        view[:] = bytes(i % 256 for i in range(t_bytes))
        ptr = t.data_ptr()
        del t
        gc.collect()
        torch.empty(1 << 20)  # would reuse freed memory
        assert bytes(view) == bytes(i % 256 for i in range(t_bytes)) and view.obj.owner.data_ptr() == ptr


def test_a_header_is_parsed_once_and_only_its_exact_bytes_reuse_it(tmp_path):
    a, b = tmp_path / "a.part", tmp_path / "b.part"
    write_sd(a, {"w": torch.arange(6.0), "x": torch.zeros(3)})
    write_sd(b, {"w": torch.arange(6.0) + 1, "x": torch.zeros(3)})
    shutil.copyfile(a, tmp_path / "c.part")
    first = read_header(a)
    assert read_header(tmp_path / "c.part") is first, "identical header bytes: parsed once"
    assert read_header(b) is not first  # another part (its data differs): its own header
    header = read_header(a)
    flip(tmp_path / "c.part", PREAMBLE.size + 10)  # same length, other bytes: parsed (and refused) anew
    with pytest.raises(CorruptCheckpointError, match="c.part"):
        read_header(tmp_path / "c.part")
    assert read_header(a) is header
