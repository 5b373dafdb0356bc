"""The tasd part file: one checkpoint part (one owner rank's state at one iteration) per file.

Layout (all integers little-endian)::

    offset 0      preamble, 24 bytes: magic b"TASDPART", u64 header length H, u64 xxh3_64 of header
    offset 24     header: H bytes of UTF-8 JSON (below)
    24 + H        hollow state dict: restricted pickle (tasd.serialization), hollow.nbytes bytes
    data.offset   tensor bytes, contiguous (the staging buffer itself), data.offset % 4096 == 0
    end           == data.offset + data.nbytes exactly

Header JSON::

    {"format_version": 1, "iteration": int, "owner_rank": int, "world_size": int,
     "session_id": str, "replication": {...} | null,
     "hollow": {"nbytes": int, "xxh3": "16 hex"},
     "data": {"offset": int, "nbytes": int, "chunk_bytes": int, "chunk_xxh3": ["16 hex", ...]},
     "tensors": [[dtype, [shape...], offset, nbytes], ...]}   # offsets within the data section

Tensor ``i`` of the hollow state dict's placeholders is ``tensors[i]``. Writers write
``<name>.dirty``, fsync it, rename it to ``<name>`` and fsync the directory, so a file with its final
name is complete. Readers check the preamble, header checksum and every field before use, the hollow
bytes and each data chunk against their checksums, and never run code from the file.

This module is the format: encoding a part to bytes and validating bytes (from a file or a peer).
Reading and writing files is :mod:`tasd.managers.partio`.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import xxhash

from tasd import device
from tasd.serialization import safe_loads
from tasd.staging import TensorLayout
from tasd.managers.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

MAGIC = b"TASDPART"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sQQ")
DATA_ALIGNMENT = device.HOST_ALIGNMENT
CHUNK_BYTES = 64 << 20  # checksum and I/O granularity
MAX_HEADER_BYTES = 1 << 30
DIRTY_SUFFIX = ".dirty"

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
_ITEMSIZE: dict[torch.dtype, int] = {d: d.itemsize for d in _DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hex(h: int) -> str:
    return f"{h:016x}"


def checksum(view: memoryview) -> int:
    return xxhash.xxh3_64_intdigest(view)


def _align(n: int, a: int = DATA_ALIGNMENT) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class PartMeta:
    """What a part's header records besides its layout."""

    iteration: int
    owner_rank: int
    world_size: int
    session_id: str = ""
    replication: dict | None = None


@dataclass
class PartHeader:
    """A validated header; ``layouts[i]`` locates tensor ``i`` inside the data section."""

    meta: PartMeta
    hollow_offset: int
    hollow_nbytes: int
    hollow_xxh3: int
    data_offset: int
    data_nbytes: int
    chunk_bytes: int
    chunk_xxh3: list[int]
    layouts: list[TensorLayout] = field(default_factory=list)

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_nbytes


def as_bytes(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.numpy()).cast("B") if buffer.numel() else memoryview(b"")


# torch initializes its numpy bridge on the first .numpy() call, once, under a C++ static guard. If
# a background thread (the replica exchange) made that first call while a writer process is forked,
# the child would wait on the guard forever: initialize it at import, before any thread starts.
torch.empty(1, dtype=torch.uint8).numpy()


def chunks(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]


def encode_header(meta: PartMeta, hollow: bytes, layouts: Sequence[TensorLayout], data_nbytes: int,
                   chunk_sums: Sequence[int]) -> tuple[bytes, int]:
    """(preamble + header + hollow bytes, data offset). Checksum fields are fixed-width, so the
    length does not depend on their values."""
    # The tensor table is the large part (one entry per tensor): encode it once.
    tensors = json.dumps([[dtype_name(l.dtype), list(l.shape), l.offset, l.nbytes] for l in layouts],
                         separators=(",", ":"))
    hollow_sum = _hex(xxhash.xxh3_64_intdigest(hollow))
    sums = [_hex(s) for s in chunk_sums]

    def build(data_offset: int) -> bytes:
        header = {
            "format_version": FORMAT_VERSION,
            "iteration": meta.iteration, "owner_rank": meta.owner_rank, "world_size": meta.world_size,
            "session_id": meta.session_id, "replication": meta.replication,
            "hollow": {"nbytes": len(hollow), "xxh3": hollow_sum},
            "data": {"offset": data_offset, "nbytes": data_nbytes, "chunk_bytes": CHUNK_BYTES, "chunk_xxh3": sums},
        }
        return (json.dumps(header, separators=(",", ":"))[:-1] + ',"tensors":' + tensors + "}").encode()

    # The data offset is part of the header, whose length depends on the offset's digits: iterate.
    data_offset = 0
    while True:
        text = build(data_offset)
        needed = _align(PREAMBLE.size + len(text) + len(hollow))
        if needed == data_offset:
            break
        data_offset = needed
    pre = PREAMBLE.pack(MAGIC, len(text), xxhash.xxh3_64_intdigest(text))
    return pre + text + hollow, data_offset


def chunk_checksums(data: memoryview) -> list[int]:
    """xxh3-64 of each CHUNK_BYTES chunk of ``data`` (the data section's checksums)."""
    return [checksum(data[o:o + n]) for o, n in chunks(len(data), CHUNK_BYTES)]


def encode_prefix(meta: PartMeta, hollow: bytes, layouts: Sequence[TensorLayout], buffer: torch.Tensor) -> bytes:
    """Everything of a part before its data section (preamble, header with the data's checksums,
    hollow bytes, zero padding): with ``buffer`` it is the whole part, to send or write as is."""
    data = as_bytes(buffer)
    prefix, data_offset = encode_header(meta, hollow, layouts, len(data), chunk_checksums(data))
    return prefix.ljust(data_offset, b"\0")


def corrupt(path: Path | str, reason: str) -> CorruptCheckpointError:
    """``path`` is a file, or a string saying where bytes came from (e.g. a received part)."""
    where = f"checkpoint file {path}" if isinstance(path, Path) else path
    return CorruptCheckpointError(f"{where} is unusable: {reason}")


def _int(obj: dict, key: str, path: Path, minimum: int = 0) -> int:
    v = obj.get(key)
    if type(v) is not int or v < minimum:
        raise corrupt(path, f"header field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _hexint(v: Any, what: str, path: Path) -> int:
    if not isinstance(v, str) or len(v) != 16:
        raise corrupt(path, f"{what} is not a 16-digit hex checksum")
    try:
        return int(v, 16)
    except ValueError:
        raise corrupt(path, f"{what} is not a 16-digit hex checksum") from None


def _parse_header(path: Path, raw: bytes, file_size: int) -> PartHeader:
    try:
        h = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise corrupt(path, "header is not a JSON object")
    if h.get("format_version") != FORMAT_VERSION:
        raise corrupt(path, f"unsupported format_version {h.get('format_version')!r} (this reader: {FORMAT_VERSION})")
    session = h.get("session_id")
    repl = h.get("replication")
    if not isinstance(session, str) or not (repl is None or isinstance(repl, dict)):
        raise corrupt(path, "header fields session_id/replication have wrong types")
    meta = PartMeta(_int(h, "iteration", path), _int(h, "owner_rank", path), _int(h, "world_size", path, 1),
                    session, repl)
    hollow, data = h.get("hollow"), h.get("data")
    if not isinstance(hollow, dict) or not isinstance(data, dict):
        raise corrupt(path, "header lacks the hollow/data sections")
    hollow_offset = PREAMBLE.size + len(raw)
    hollow_nbytes = _int(hollow, "nbytes", path)
    data_offset, data_nbytes = _int(data, "offset", path), _int(data, "nbytes", path)
    chunk_bytes = _int(data, "chunk_bytes", path, 1)
    sums = data.get("chunk_xxh3")
    if data_offset % DATA_ALIGNMENT or data_offset < hollow_offset + hollow_nbytes:
        raise corrupt(path, f"data offset {data_offset} is misaligned or overlaps the header")
    if data_offset + data_nbytes != file_size:
        raise corrupt(path, f"file has {file_size} bytes, header says {data_offset + data_nbytes} (truncated?)")
    if not isinstance(sums, list) or len(sums) != math.ceil(data_nbytes / chunk_bytes):
        raise corrupt(path, "chunk checksum list does not match the data size")
    tensors = h.get("tensors")
    if not isinstance(tensors, list):
        raise corrupt(path, "header field 'tensors' is not a list")
    layouts = []
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[1], list)):
            raise corrupt(path, f"tensor entry {i} is malformed")
        name, shape, offset, nbytes = entry
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise corrupt(path, f"tensor entry {i} has unknown dtype {name!r}")
        if not all(type(s) is int and s >= 0 for s in shape) or type(offset) is not int or type(nbytes) is not int:
            raise corrupt(path, f"tensor entry {i} has a malformed shape/offset/size")
        itemsize = _ITEMSIZE[dtype]
        if nbytes != math.prod(shape) * itemsize or offset < 0 or offset % itemsize or offset + nbytes > data_nbytes:
            raise corrupt(path, f"tensor entry {i} ({name} {shape}) does not fit the data section")
        layouts.append(TensorLayout(dtype, tuple(shape), offset, nbytes))
    return PartHeader(meta, hollow_offset, hollow_nbytes, _hexint(hollow.get("xxh3"), "hollow checksum", path),
                      data_offset, data_nbytes, chunk_bytes,
                      [_hexint(s, f"chunk checksum {i}", path) for i, s in enumerate(sums)], layouts)


def parse_preamble(pre: bytes, size: int, path: Path | str) -> tuple[int, int]:
    """(header length, header checksum) from the 24-byte preamble of a part of ``size`` bytes."""
    if size < PREAMBLE.size or len(pre) < PREAMBLE.size:
        raise corrupt(path, f"only {size} bytes, shorter than the preamble")
    magic, header_len, header_sum = PREAMBLE.unpack(pre[: PREAMBLE.size])
    if magic != MAGIC:
        raise corrupt(path, "bad magic (not a tasd part file)")
    if header_len > min(MAX_HEADER_BYTES, size - PREAMBLE.size):
        raise corrupt(path, f"header length {header_len} exceeds the file")
    return header_len, header_sum


def check_header_bytes(raw: bytes, header_sum: int, path: Path | str, size: int) -> PartHeader:
    if xxhash.xxh3_64_intdigest(raw) != header_sum:
        raise corrupt(path, "header checksum mismatch")
    return _parse_header(path, raw, size)


def check_hollow(raw: bytes, header: PartHeader, path: Path | str) -> bytes:
    """``raw`` is everything from the hollow offset to the data offset: return the hollow bytes
    after checking their checksum and that the padding after them is zero."""
    hollow, padding = raw[: header.hollow_nbytes], raw[header.hollow_nbytes :]
    if xxhash.xxh3_64_intdigest(hollow) != header.hollow_xxh3:
        raise corrupt(path, "hollow state dict checksum mismatch")
    if padding.count(0) != len(padding):
        raise corrupt(path, "non-zero bytes in the padding before the data section")
    return hollow


def parse_prefix(prefix: bytes, data_nbytes: int, origin: str) -> tuple[PartHeader, bytes]:
    """Validate a part's prefix received as bytes (see :func:`encode_prefix`) whose data section
    has ``data_nbytes``: returns (header, hollow bytes). CorruptCheckpointError names ``origin``."""
    size = len(prefix) + data_nbytes
    header_len, header_sum = parse_preamble(prefix, size, origin)
    header = check_header_bytes(bytes(prefix[PREAMBLE.size : PREAMBLE.size + header_len]), header_sum, origin, size)
    if header.data_offset != len(prefix):
        raise corrupt(origin, f"prefix has {len(prefix)} bytes, its header puts the data at {header.data_offset}")
    return header, check_hollow(bytes(prefix[header.hollow_offset :]), header, origin)


def verify_data(header: PartHeader, buffer: torch.Tensor, origin: str) -> None:
    """Check a data section held in memory against ``header``'s chunk checksums."""
    data = as_bytes(buffer)
    if len(data) != header.data_nbytes:
        raise corrupt(origin, f"data has {len(data)} bytes, the header says {header.data_nbytes}")
    check_checksums(header, chunk_checksums(data), origin)


def check_checksums(header: PartHeader, sums: Sequence[int], origin: str) -> None:
    """Compare a data section's chunk checksums (computed by the caller) with ``header``'s."""
    if len(sums) != len(header.chunk_xxh3):
        raise corrupt(origin, f"data has {len(sums)} checksum chunks, the header says {len(header.chunk_xxh3)}")
    for i, got in enumerate(sums):
        check_chunk((i, got), header, origin)


def check_chunk(result: tuple[int, int], header: PartHeader, path: Path) -> None:
    i, got = result
    if got != header.chunk_xxh3[i]:
        raise corrupt(path, f"checksum mismatch in data chunk {i} (bytes {i * header.chunk_bytes}..)")


@dataclass
class LoadedPart:
    """A decoded part: validated header, hollow object and the data buffer."""

    header: PartHeader
    hollow: Any
    buffer: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The tensors in placeholder index order, each with a storage of its own over ``buffer``."""
        return [lay.standalone(self.buffer) for lay in self.header.layouts]


def decode_hollow(raw: bytes | memoryview, where: str) -> Any:
    """Unpickle a hollow state dict with the restricted unpickler; any failure becomes a
    CorruptCheckpointError naming ``where``."""
    try:
        return safe_loads(raw)
    except Exception as e:  # malformed pickles raise many types; none may escape unwrapped
        raise CorruptCheckpointError(f"{where}: hollow state dict cannot be decoded safely: {e}") from e


@dataclass
class RawPart:
    """A verified part as bytes, read from a file or received from a peer: its header, its prefix
    (everything before the data section, to write or send as is), its hollow bytes and its data."""

    header: PartHeader
    prefix: bytes
    hollow: bytes
    buffer: torch.Tensor

    def decode(self, where: str) -> LoadedPart:
        """Decode the hollow state dict safely (CorruptCheckpointError naming ``where``)."""
        return LoadedPart(self.header, decode_hollow(self.hollow, where), self.buffer)
