"""The tasd part file: one checkpoint part (one owner rank's state at one iteration) per file.

Layout (all integers little-endian)::

    offset 0      preamble, 24 bytes: magic b"TASDPART", u64 header length H, u64 xxh3_64 of header
    offset 24     header: H bytes of UTF-8 JSON (below), H <= MAX_HEADER_BYTES
    24 + H        hollow state dict: restricted pickle (tasd.serialization), hollow.nbytes bytes
                  (<= tasd.serialization.MAX_HOLLOW_BYTES), then zero padding
    data.offset   tensor bytes (the staging buffer itself); data.offset is 24 + H + hollow.nbytes
                  rounded up to a multiple of 4096
    end           == data.offset + data.nbytes exactly

Header JSON (format_version 2)::

    {"format_version": 2, "iteration": int, "owner_rank": int, "world_size": int,
     "session_id": str, "replication": {str: str | int | bool | null} | null,
     "save_id": str, "job_id": str,
     "hollow": {"nbytes": int, "xxh3": "16 hex"},
     "data": {"offset": int, "nbytes": int, "chunk_bytes": int, "chunk_xxh3": ["16 hex", ...]},
     "tensors": [[dtype, [shape...], offset, nbytes], ...]}   # offsets within the data section

``save_id`` identifies one save, agreed by all ranks (parts of different saves of one iteration are
different checkpoints); ``job_id`` the job that saved it. Tensor ``i`` of the hollow state dict's
placeholders is ``tensors[i]``; tensors follow one another in that order without overlapping (the
bytes between them are staging padding, covered by the checksums). ``chunk_xxh3[k]`` is the xxh3_64
of data bytes ``[k * chunk_bytes, (k + 1) * chunk_bytes)``.

Every number is bounded (:class:`PartMeta` for the identity fields, ``MAX_INT``/``MAX_NDIM`` for
shapes, the file size for offsets and sizes), so reading hostile bytes costs memory and time
proportional to the header and hollow sizes at most, and every malformed input is a
CorruptCheckpointError. Writers write ``<name>.dirty``, fsync it, rename it to ``<name>`` and fsync
the directory, so a file with its final name is complete. Readers check the preamble, header
checksum and every field before use, the hollow bytes and each data chunk against their checksums,
and never run code from the file (the hollow decoder is :func:`tasd.serialization.safe_loads`).

This module is the format: encoding a part to bytes and validating bytes (from a file or a peer).
Reading and writing files is :mod:`tasd.managers.partio`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import xxhash

from tasd import device, serialization
from tasd.managers.errors import CorruptCheckpointError
from tasd.serialization import safe_loads
from tasd.staging import Layout, TensorLayout

logger = logging.getLogger(__name__)

MAGIC = b"TASDPART"
FORMAT_VERSION = 2
PREAMBLE = struct.Struct("<8sQQ")
DATA_ALIGNMENT = device.HOST_ALIGNMENT
CHUNK_BYTES = 64 << 20  # checksum and I/O granularity
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4 << 10, 1 << 30  # what a reader accepts (powers of two)
MAX_HEADER_BYTES = 64 << 20  # about a million tensors
MAX_INT = (1 << 63) - 1  # iterations, offsets, sizes, dimensions
MAX_WORLD_SIZE = 1 << 31
MAX_NDIM = 64
MAX_SESSION_CHARS = 255  # a directory name
MAX_ID_CHARS = 128  # save_id, job_id

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


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_text(v: Any, max_chars: int) -> bool:
    if type(v) is not str or len(v) > max_chars:
        return False
    try:
        v.encode()  # lone surrogates (valid JSON escapes) are not text
    except UnicodeEncodeError:
        return False
    return True


def _show(v: Any) -> str:
    """``repr(v)`` for an error message, short (a huge integer has no repr)."""
    try:
        return repr(v)[:200]
    except ValueError:
        return "a huge integer"


def _check_settings(s: Any) -> bool:
    """Replication settings as headers record them: a small flat dict of plain values."""
    return s is None or (type(s) is dict and len(s) <= 16 and all(
        _is_text(k, 64) and (v is None or type(v) is bool or _is_int(v, -MAX_INT, MAX_INT) or _is_text(v, 64))
        for k, v in s.items()))


@dataclass(frozen=True)
class PartMeta:
    """What a part's header records besides its layout: which part of which save it is.

    ``save_id`` identifies one save, agreed by all ranks (filled by the manager); ``job_id`` the
    job the save belongs to. Construction validates every field (ValueError naming it): the bounds
    a reader enforces, so that nothing written is later refused.
    """

    iteration: int
    owner_rank: int
    world_size: int
    session_id: str = ""
    replication: dict | None = None
    save_id: str = ""
    job_id: str = ""

    def __post_init__(self) -> None:
        if not _is_int(self.iteration, 0, MAX_INT):
            raise ValueError(f"PartMeta.iteration must be an integer in [0, 2**63), got {_show(self.iteration)}")
        if not _is_int(self.world_size, 1, MAX_WORLD_SIZE):
            raise ValueError(f"PartMeta.world_size must be an integer in [1, 2**31], got {_show(self.world_size)}")
        if not _is_int(self.owner_rank, 0, self.world_size - 1):
            raise ValueError(f"PartMeta.owner_rank must be an integer in [0, world_size={self.world_size}), "
                             f"got {_show(self.owner_rank)}")
        if not _is_text(self.session_id, MAX_SESSION_CHARS):
            raise ValueError(f"PartMeta.session_id must be text of at most {MAX_SESSION_CHARS} characters, "
                             f"got {_show(self.session_id)}")
        for name in ("save_id", "job_id"):
            if not _is_text(getattr(self, name), MAX_ID_CHARS):
                raise ValueError(f"PartMeta.{name} must be text of at most {MAX_ID_CHARS} characters, "
                                 f"got {_show(getattr(self, name))}")
        if not _check_settings(self.replication):
            raise ValueError(f"PartMeta.replication must be None or a flat dict of at most 16 plain values, "
                             f"got {_show(self.replication)}")


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
    """A byte view of a 1-D uint8 host tensor (writable unless empty)."""
    if not buffer.numel():
        return memoryview(b"")
    view = memoryview(buffer.numpy())
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# torch initializes its numpy bridge on the first .numpy() call, once, under a C++ static guard. If
# a background thread (the replica exchange) made that first call while a writer process is forked,
# the child would wait on the guard forever: initialize it at import, before any thread starts.
torch.empty(1, dtype=torch.uint8).numpy()


def chunks(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]


_tables: "weakref.WeakKeyDictionary[Layout, str]" = weakref.WeakKeyDictionary()


def tensor_table(layouts: Sequence[TensorLayout]) -> str:
    """The header's ``tensors`` JSON for ``layouts``: the large part of a header (one entry per
    tensor), encoded once per :class:`~tasd.staging.Layout` object (a structure saved again
    reuses it). Thread-safe."""
    table = _tables.get(layouts) if isinstance(layouts, Layout) else None
    if table is None:
        table = json.dumps([[dtype_name(l.dtype), list(l.shape), l.offset, l.nbytes] for l in layouts],
                           separators=(",", ":"))
        if isinstance(layouts, Layout):
            _tables[layouts] = table
    return table


def encode_header(meta: PartMeta, hollow: bytes, layouts: Sequence[TensorLayout], data_nbytes: int,
                  chunk_sums: Sequence[int]) -> tuple[bytes, int]:
    """(preamble + header + hollow bytes, data offset). Checksum fields are fixed-width, so the
    length does not depend on their values. ValueError when the header or hollow state dict is
    larger than a reader accepts."""
    if len(hollow) > serialization.MAX_HOLLOW_BYTES:
        raise ValueError(f"hollow state dict of {len(hollow)} bytes exceeds MAX_HOLLOW_BYTES "
                         f"({serialization.MAX_HOLLOW_BYTES})")
    tensors = tensor_table(layouts)
    hollow_sum = _hex(xxhash.xxh3_64_intdigest(hollow))
    sums = [_hex(s) for s in chunk_sums]

    def build(data_offset: int) -> bytes:
        header = {
            "format_version": FORMAT_VERSION,
            "iteration": meta.iteration, "owner_rank": meta.owner_rank, "world_size": meta.world_size,
            "session_id": meta.session_id, "replication": meta.replication,
            "save_id": meta.save_id, "job_id": meta.job_id,
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
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"part header of {len(text)} bytes ({len(layouts)} tensors) exceeds MAX_HEADER_BYTES "
                         f"({MAX_HEADER_BYTES})")
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


def _int(obj: dict, key: str, path: Path | str, minimum: int = 0, maximum: int = MAX_INT) -> int:
    v = obj.get(key)
    if not _is_int(v, minimum, maximum):
        raise corrupt(path, f"header field {key!r} must be an integer in [{minimum}, {maximum}], got {_show(v)}")
    return v


def _hexint(v: Any, what: str, path: Path | str) -> int:
    if not isinstance(v, str) or len(v) != 16:
        raise corrupt(path, f"{what} is not a 16-digit hex checksum")
    try:
        return int(v, 16)
    except ValueError:
        raise corrupt(path, f"{what} is not a 16-digit hex checksum") from None


def _parse_meta(h: dict, path: Path | str) -> PartMeta:
    fields = {k: h.get(k) for k in ("iteration", "owner_rank", "world_size", "session_id", "replication",
                                    "save_id", "job_id")}
    try:
        return PartMeta(**fields)
    except ValueError as e:
        raise corrupt(path, f"header {str(e).removeprefix('PartMeta.')}") from None


def _parse_layouts(tensors: Any, data_nbytes: int, path: Path | str) -> list[TensorLayout]:
    if not isinstance(tensors, list):
        raise corrupt(path, "header field 'tensors' is not a list")
    layouts, end = [], 0
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[1], list)):
            raise corrupt(path, f"tensor entry {i} is malformed")
        name, shape, offset, nbytes = entry
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise corrupt(path, f"tensor entry {i} has unknown dtype {_show(name)}")
        if (len(shape) > MAX_NDIM or not all(_is_int(s, 0, MAX_INT) for s in shape)
                or not _is_int(offset, 0, data_nbytes) or not _is_int(nbytes, 0, data_nbytes)):
            raise corrupt(path, f"tensor entry {i} has a malformed shape/offset/size")
        itemsize = _ITEMSIZE[dtype]
        if nbytes != math.prod(shape) * itemsize or offset % itemsize or offset + nbytes > data_nbytes:
            raise corrupt(path, f"tensor entry {i} ({name} {_show(shape)}) does not fit the data section")
        if offset < end:
            raise corrupt(path, f"tensor entry {i} overlaps or precedes tensor {i - 1}")
        end = offset + nbytes
        layouts.append(TensorLayout(dtype, tuple(shape), offset, nbytes))
    return layouts


def _parse_header(path: Path | str, raw: bytes, file_size: int) -> PartHeader:
    try:
        h = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit, nesting
        raise corrupt(path, f"header is not valid JSON ({type(e).__name__}: {str(e):.200})") from None
    if not isinstance(h, dict):
        raise corrupt(path, "header is not a JSON object")
    if h.get("format_version") != FORMAT_VERSION or type(h.get("format_version")) is not int:
        raise corrupt(path, f"unsupported format_version {_show(h.get('format_version'))} "
                            f"(this reader: {FORMAT_VERSION})")
    meta = _parse_meta(h, path)
    hollow, data = h.get("hollow"), h.get("data")
    if not isinstance(hollow, dict) or not isinstance(data, dict):
        raise corrupt(path, "header lacks the hollow/data sections")
    hollow_offset = PREAMBLE.size + len(raw)
    hollow_nbytes = _int(hollow, "nbytes", path, maximum=serialization.MAX_HOLLOW_BYTES)
    data_offset, data_nbytes = _int(data, "offset", path), _int(data, "nbytes", path)
    chunk_bytes = _int(data, "chunk_bytes", path, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    if chunk_bytes & (chunk_bytes - 1):
        raise corrupt(path, f"chunk size {chunk_bytes} is not a power of two")
    if data_offset != _align(hollow_offset + hollow_nbytes):
        raise corrupt(path, f"data offset {data_offset} is not where the hollow state dict ends "
                            f"({_align(hollow_offset + hollow_nbytes)})")
    if data_offset + data_nbytes != file_size:
        raise corrupt(path, f"file has {file_size} bytes, header says {data_offset + data_nbytes} (truncated?)")
    sums = data.get("chunk_xxh3")
    if not isinstance(sums, list) or len(sums) != -(-data_nbytes // chunk_bytes):
        raise corrupt(path, "chunk checksum list does not match the data size")
    layouts = _parse_layouts(h.get("tensors"), data_nbytes, path)
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
        raise corrupt(path, f"header length {header_len} exceeds the file or MAX_HEADER_BYTES")
    return header_len, header_sum


#: Headers parsed lately, by their exact bytes and the size of their part: a restart parses the
#: same header more than once (find_latest, then the load or the send; a replica's header is the
#: owner's), and a header of 10,000 tensors takes tens of milliseconds to parse and validate.
_parsed: dict[tuple[bytes, int], PartHeader] = {}
_parsed_lock = threading.Lock()  # parts are read in several threads
_PARSED_KEPT = 8


def check_header_bytes(raw: bytes, header_sum: int, path: Path | str, size: int) -> PartHeader:
    """The validated header whose bytes are ``raw`` (checked against ``header_sum``) in a part of
    ``size`` bytes; CorruptCheckpointError naming ``path`` otherwise. Headers are cached by their
    exact bytes: the same bytes give the same (shared, not to be modified) PartHeader."""
    if xxhash.xxh3_64_intdigest(raw) != header_sum:
        raise corrupt(path, "header checksum mismatch")
    key = (bytes(raw), size)
    with _parsed_lock:
        header = _parsed.get(key)
    if header is None:
        header = _parse_header(path, raw, size)
        with _parsed_lock:
            if len(_parsed) >= _PARSED_KEPT:
                _parsed.pop(next(iter(_parsed)))
            _parsed[key] = header
    return header


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
    check_checksums(header, [checksum(data[o:o + n]) for o, n in chunks(len(data), header.chunk_bytes)], origin)


def check_checksums(header: PartHeader, sums: Sequence[int], origin: str) -> None:
    """Compare a data section's chunk checksums (computed by the caller) with ``header``'s."""
    if len(sums) != len(header.chunk_xxh3):
        raise corrupt(origin, f"data has {len(sums)} checksum chunks, the header says {len(header.chunk_xxh3)}")
    for i, got in enumerate(sums):
        check_chunk((i, got), header, origin)


def check_chunk(result: tuple[int, int], header: PartHeader, path: Path | str) -> None:
    i, got = result
    if got != header.chunk_xxh3[i]:
        raise corrupt(path, f"checksum mismatch in data chunk {i} (bytes {i * header.chunk_bytes}..)")


def own_storage(layout: TensorLayout) -> tuple[torch.Tensor, memoryview]:
    """An uninitialized tensor for ``layout`` in a storage of exactly its own bytes, and a writable
    byte view of that storage (empty for an empty tensor) that keeps the tensor alive; large ones
    in huge pages where the kernel has them (:func:`tasd.device.host_tensor`). About 1 us per view
    (a ctypes array over the storage), where a numpy view cast to bytes costs about 7: a restart
    of a 10,000-tensor part makes one per tensor."""
    t = device.host_tensor(layout.shape, layout.dtype)
    if not layout.nbytes:
        return t, memoryview(bytearray())
    window = (ctypes.c_char * layout.nbytes).from_address(t.data_ptr())
    window.owner = t  # the view's exporter holds the tensor: its storage outlives every view
    return t, memoryview(window).cast("B")


@dataclass
class LoadedPart:
    """A decoded part: validated header, hollow object and its tensors (in placeholder order), each
    in a storage of exactly its own bytes, so a tensor kept keeps nothing else alive."""

    header: PartHeader
    hollow: Any
    loaded: list[torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors in placeholder index order (``t.untyped_storage().nbytes() == t.nbytes``)."""
        return list(self.loaded)


def decode_hollow(raw: bytes | memoryview, where: str) -> Any:
    """Decode a hollow state dict with the bounded restricted decoder; any refusal becomes a
    CorruptCheckpointError naming ``where``."""
    try:
        return safe_loads(raw)
    except serialization.UnsafeCheckpointError as e:
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
        """Decode the hollow state dict safely (CorruptCheckpointError naming ``where``) and copy
        each tensor out of ``buffer`` once into a storage of its own: the LoadedPart does not
        reference ``buffer``, which its holder may then release."""
        hollow = decode_hollow(self.hollow, where)
        data, tensors = as_bytes(self.buffer), []
        for lay in self.header.layouts:
            t, dst = own_storage(lay)
            dst[:] = data[lay.offset:lay.offset + lay.nbytes]
            tensors.append(t)
        return LoadedPart(self.header, hollow, tensors)
