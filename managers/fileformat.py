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
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
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


def _checksum(view: memoryview) -> int:
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


def _as_bytes(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.numpy()).cast("B") if buffer.numel() else memoryview(b"")


def _chunks(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]


def _encode_header(meta: PartMeta, hollow: bytes, layouts: Sequence[TensorLayout], data_nbytes: int,
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


def _open_for_write(path: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return os.open(path, flags, 0o644), False


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunk_checksums(data: memoryview) -> list[int]:
    """xxh3-64 of each CHUNK_BYTES chunk of ``data`` (the data section's checksums)."""
    return [_checksum(data[o:o + n]) for o, n in _chunks(len(data), CHUNK_BYTES)]


def encode_prefix(meta: PartMeta, hollow: bytes, layouts: Sequence[TensorLayout], buffer: torch.Tensor) -> bytes:
    """Everything of a part before its data section (preamble, header with the data's checksums,
    hollow bytes, zero padding): with ``buffer`` it is the whole part, to send or write as is."""
    data = _as_bytes(buffer)
    prefix, data_offset = _encode_header(meta, hollow, layouts, len(data), chunk_checksums(data))
    return prefix.ljust(data_offset, b"\0")


def write_part(path: Path, meta: PartMeta, hollow: bytes, buffer: torch.Tensor,
               layouts: Sequence[TensorLayout], direct_io: bool = True) -> int:
    """Encode and write one part (see :func:`write_encoded`); the data's checksums are computed
    in a thread (GIL released) while the data is written. Returns the file size. Not collective."""
    data = _as_bytes(buffer)
    with ThreadPoolExecutor(1) as hasher:
        sums = hasher.submit(chunk_checksums, data)
        n_chunks = math.ceil(len(data) / CHUNK_BYTES)
        _, data_offset = _encode_header(meta, hollow, layouts, len(data), [0] * n_chunks)

        def prefix() -> bytes:
            encoded, final_offset = _encode_header(meta, hollow, layouts, len(data), sums.result())
            if final_offset != data_offset:  # checksum fields are fixed-width: cannot happen
                raise RuntimeError(f"header of {path} changed size while it was written")
            return encoded

        return write_encoded(path, data_offset, buffer, prefix, direct_io)


def write_encoded(path: Path, data_offset: int, buffer: torch.Tensor, prefix: bytes | Callable[[], bytes],
                  direct_io: bool = True) -> int:
    """Write a part atomically: ``path.dirty``, fsync, rename to ``path``, fsync the directory.

    ``buffer`` (1-D uint8, host) goes at ``data_offset``, then ``prefix`` (bytes, or a function
    giving them once the data is written) at 0. With ``direct_io`` the aligned bulk of the data goes
    through O_DIRECT where the file system allows it. On any error the ``.dirty`` file is removed
    and the error propagates (OSError as it comes). Returns the file size. Not collective.
    """
    data = _as_bytes(buffer)
    tmp = str(path) + DIRTY_SUFFIX
    try:
        bulk = len(data) // DATA_ALIGNMENT * DATA_ALIGNMENT if direct_io else 0
        fd, direct = _open_for_write(tmp, direct_io and bulk > 0)
        try:
            if not direct:
                bulk = 0
            for o, n in _chunks(bulk, CHUNK_BYTES):
                _pwrite_all(fd, data[o:o + n], data_offset + o)
            if direct:  # the unaligned rest and the header go through the page cache
                os.close(fd)
                fd = os.open(tmp, os.O_WRONLY)
            for o, n in _chunks(len(data) - bulk, CHUNK_BYTES):
                _pwrite_all(fd, data[bulk + o:bulk + o + n], data_offset + bulk + o)
            _pwrite_all(fd, memoryview(prefix() if callable(prefix) else prefix), 0)
            os.ftruncate(fd, data_offset + len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(Path(path).parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return data_offset + len(data)


def _corrupt(path: Path | str, reason: str) -> CorruptCheckpointError:
    """``path`` is a file, or a string saying where bytes came from (e.g. a received part)."""
    where = f"checkpoint file {path}" if isinstance(path, Path) else path
    return CorruptCheckpointError(f"{where} is unusable: {reason}")


def _int(obj: dict, key: str, path: Path, minimum: int = 0) -> int:
    v = obj.get(key)
    if type(v) is not int or v < minimum:
        raise _corrupt(path, f"header field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _hexint(v: Any, what: str, path: Path) -> int:
    if not isinstance(v, str) or len(v) != 16:
        raise _corrupt(path, f"{what} is not a 16-digit hex checksum")
    try:
        return int(v, 16)
    except ValueError:
        raise _corrupt(path, f"{what} is not a 16-digit hex checksum") from None


def _parse_header(path: Path, raw: bytes, file_size: int) -> PartHeader:
    try:
        h = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise _corrupt(path, "header is not a JSON object")
    if h.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"unsupported format_version {h.get('format_version')!r} (this reader: {FORMAT_VERSION})")
    session = h.get("session_id")
    repl = h.get("replication")
    if not isinstance(session, str) or not (repl is None or isinstance(repl, dict)):
        raise _corrupt(path, "header fields session_id/replication have wrong types")
    meta = PartMeta(_int(h, "iteration", path), _int(h, "owner_rank", path), _int(h, "world_size", path, 1),
                    session, repl)
    hollow, data = h.get("hollow"), h.get("data")
    if not isinstance(hollow, dict) or not isinstance(data, dict):
        raise _corrupt(path, "header lacks the hollow/data sections")
    hollow_offset = PREAMBLE.size + len(raw)
    hollow_nbytes = _int(hollow, "nbytes", path)
    data_offset, data_nbytes = _int(data, "offset", path), _int(data, "nbytes", path)
    chunk_bytes = _int(data, "chunk_bytes", path, 1)
    sums = data.get("chunk_xxh3")
    if data_offset % DATA_ALIGNMENT or data_offset < hollow_offset + hollow_nbytes:
        raise _corrupt(path, f"data offset {data_offset} is misaligned or overlaps the header")
    if data_offset + data_nbytes != file_size:
        raise _corrupt(path, f"file has {file_size} bytes, header says {data_offset + data_nbytes} (truncated?)")
    if not isinstance(sums, list) or len(sums) != math.ceil(data_nbytes / chunk_bytes):
        raise _corrupt(path, "chunk checksum list does not match the data size")
    tensors = h.get("tensors")
    if not isinstance(tensors, list):
        raise _corrupt(path, "header field 'tensors' is not a list")
    layouts = []
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[1], list)):
            raise _corrupt(path, f"tensor entry {i} is malformed")
        name, shape, offset, nbytes = entry
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise _corrupt(path, f"tensor entry {i} has unknown dtype {name!r}")
        if not all(type(s) is int and s >= 0 for s in shape) or type(offset) is not int or type(nbytes) is not int:
            raise _corrupt(path, f"tensor entry {i} has a malformed shape/offset/size")
        itemsize = _ITEMSIZE[dtype]
        if nbytes != math.prod(shape) * itemsize or offset < 0 or offset % itemsize or offset + nbytes > data_nbytes:
            raise _corrupt(path, f"tensor entry {i} ({name} {shape}) does not fit the data section")
        layouts.append(TensorLayout(dtype, tuple(shape), offset, nbytes))
    return PartHeader(meta, hollow_offset, hollow_nbytes, _hexint(hollow.get("xxh3"), "hollow checksum", path),
                      data_offset, data_nbytes, chunk_bytes,
                      [_hexint(s, f"chunk checksum {i}", path) for i, s in enumerate(sums)], layouts)


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    out = os.pread(fd, n, offset)
    if len(out) != n:
        raise _corrupt(path, f"short read at offset {offset} (truncated?)")
    return out


def _parse_preamble(pre: bytes, size: int, path: Path | str) -> tuple[int, int]:
    """(header length, header checksum) from the 24-byte preamble of a part of ``size`` bytes."""
    if size < PREAMBLE.size or len(pre) < PREAMBLE.size:
        raise _corrupt(path, f"only {size} bytes, shorter than the preamble")
    magic, header_len, header_sum = PREAMBLE.unpack(pre[: PREAMBLE.size])
    if magic != MAGIC:
        raise _corrupt(path, "bad magic (not a tasd part file)")
    if header_len > min(MAX_HEADER_BYTES, size - PREAMBLE.size):
        raise _corrupt(path, f"header length {header_len} exceeds the file")
    return header_len, header_sum


def _check_header_bytes(raw: bytes, header_sum: int, path: Path | str, size: int) -> PartHeader:
    if xxhash.xxh3_64_intdigest(raw) != header_sum:
        raise _corrupt(path, "header checksum mismatch")
    return _parse_header(path, raw, size)


def read_header(path: Path, fd: int | None = None) -> PartHeader:
    """Read and validate the preamble and header of ``path`` (CorruptCheckpointError if unusable;
    OSError if it cannot be opened)."""
    path = Path(path)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header_len, header_sum = _parse_preamble(os.pread(fd, PREAMBLE.size, 0), size, path)
        return _check_header_bytes(_pread_exact(fd, header_len, PREAMBLE.size, path), header_sum, path, size)
    finally:
        if own:
            os.close(fd)


def _check_hollow(raw: bytes, header: PartHeader, path: Path | str) -> bytes:
    """``raw`` is everything from the hollow offset to the data offset: return the hollow bytes
    after checking their checksum and that the padding after them is zero."""
    hollow, padding = raw[: header.hollow_nbytes], raw[header.hollow_nbytes :]
    if xxhash.xxh3_64_intdigest(hollow) != header.hollow_xxh3:
        raise _corrupt(path, "hollow state dict checksum mismatch")
    if padding.count(0) != len(padding):
        raise _corrupt(path, "non-zero bytes in the padding before the data section")
    return hollow


def _read_hollow(fd: int, header: PartHeader, path: Path) -> bytes:
    return _check_hollow(_pread_exact(fd, header.data_offset - header.hollow_offset, header.hollow_offset, path),
                         header, path)


def parse_prefix(prefix: bytes, data_nbytes: int, origin: str) -> tuple[PartHeader, bytes]:
    """Validate a part's prefix received as bytes (see :func:`encode_prefix`) whose data section
    has ``data_nbytes``: returns (header, hollow bytes). CorruptCheckpointError names ``origin``."""
    size = len(prefix) + data_nbytes
    header_len, header_sum = _parse_preamble(prefix, size, origin)
    header = _check_header_bytes(bytes(prefix[PREAMBLE.size : PREAMBLE.size + header_len]), header_sum, origin, size)
    if header.data_offset != len(prefix):
        raise _corrupt(origin, f"prefix has {len(prefix)} bytes, its header puts the data at {header.data_offset}")
    return header, _check_hollow(bytes(prefix[header.hollow_offset :]), header, origin)


def verify_data(header: PartHeader, buffer: torch.Tensor, origin: str) -> None:
    """Check a data section held in memory against ``header``'s chunk checksums."""
    data = _as_bytes(buffer)
    if len(data) != header.data_nbytes:
        raise _corrupt(origin, f"data has {len(data)} bytes, the header says {header.data_nbytes}")
    check_checksums(header, chunk_checksums(data), origin)


def check_checksums(header: PartHeader, sums: Sequence[int], origin: str) -> None:
    """Compare a data section's chunk checksums (computed by the caller) with ``header``'s."""
    if len(sums) != len(header.chunk_xxh3):
        raise _corrupt(origin, f"data has {len(sums)} checksum chunks, the header says {len(header.chunk_xxh3)}")
    for i, got in enumerate(sums):
        _check_chunk((i, got), header, origin)


def _read_data(fd: int, header: PartHeader, path: Path, out: memoryview | None) -> None:
    """Read the data section into ``out`` (or through a scratch chunk when None), checking every
    chunk's checksum; hashing runs in a thread (GIL released) while the next chunk is read."""
    scratch = None if out is not None else memoryview(bytearray(min(header.chunk_bytes, header.data_nbytes)))
    with ThreadPoolExecutor(1) as hasher:
        pending = []
        for i, (o, n) in enumerate(_chunks(header.data_nbytes, header.chunk_bytes)):
            if scratch is not None:  # the scratch chunk is reused: finish hashing it first
                for f in pending:
                    _check_chunk(f.result(), header, path)
                pending = []
            dst = out[o:o + n] if out is not None else scratch[:n]
            got = 0
            while got < n:
                k = os.preadv(fd, [dst[got:]], header.data_offset + o + got)
                if k == 0:
                    raise _corrupt(path, f"short read in data chunk {i} (truncated?)")
                got += k
            pending.append(hasher.submit(lambda d=dst, i=i: (i, _checksum(d))))
        for f in pending:
            _check_chunk(f.result(), header, path)


def _check_chunk(result: tuple[int, int], header: PartHeader, path: Path) -> None:
    i, got = result
    if got != header.chunk_xxh3[i]:
        raise _corrupt(path, f"checksum mismatch in data chunk {i} (bytes {i * header.chunk_bytes}..)")


def verify_part(path: Path) -> PartHeader:
    """Check header, hollow and data checksums of ``path`` without keeping its data. Raises
    CorruptCheckpointError (or OSError) when the file is unusable. Not collective."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(path, fd)
        _read_hollow(fd, header, path)
        _read_data(fd, header, path, None)
        return header
    finally:
        os.close(fd)


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


def read_raw_part(path: Path) -> RawPart:
    """Read a whole part, verifying every checksum, into a fresh aligned host buffer. Raises
    CorruptCheckpointError (or OSError). Not collective."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(path, fd)
        prefix = _pread_exact(fd, header.data_offset, 0, path)
        hollow = _check_hollow(prefix[header.hollow_offset :], header, path)
        buffer = device.empty_host(header.data_nbytes)
        _read_data(fd, header, path, _as_bytes(buffer))
    finally:
        os.close(fd)
    return RawPart(header, prefix, hollow, buffer)


def read_part(path: Path) -> LoadedPart:
    """:func:`read_raw_part` and decode the hollow state dict safely."""
    return read_raw_part(path).decode(f"checkpoint file {path}")
