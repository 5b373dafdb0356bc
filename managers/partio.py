"""Part files on disk: durable, atomic writes and fully verified reads (format: :mod:`fileformat`).

Writes go to ``<name>.dirty``, are fsync'd, renamed to ``<name>``, and the directory is fsync'd;
the aligned bulk of the data goes through O_DIRECT where the file system allows it. Reads check
the header, the hollow bytes and every data chunk; hashing runs in a thread (GIL released) while
I/O goes on. Nothing here is collective.
"""

from __future__ import annotations

import errno
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from tasd import device
from tasd.managers.fileformat import (CHUNK_BYTES, DATA_ALIGNMENT, DIRTY_SUFFIX, PREAMBLE, LoadedPart, PartHeader,
                                      PartMeta, RawPart, as_bytes, check_chunk, check_header_bytes, check_hollow,
                                      checksum, chunk_checksums, chunks, corrupt, encode_header, parse_preamble)
from tasd.staging import TensorLayout


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


def write_part(path: Path, meta: PartMeta, hollow: bytes, buffer: torch.Tensor,
               layouts: Sequence[TensorLayout], direct_io: bool = True) -> int:
    """Encode and write one part (see :func:`write_encoded`); the data's checksums are computed
    in a thread (GIL released) while the data is written. Returns the file size. Not collective."""
    data = as_bytes(buffer)
    with ThreadPoolExecutor(1) as hasher:
        sums = hasher.submit(chunk_checksums, data)
        n_chunks = math.ceil(len(data) / CHUNK_BYTES)
        _, data_offset = encode_header(meta, hollow, layouts, len(data), [0] * n_chunks)

        def prefix() -> bytes:
            encoded, final_offset = encode_header(meta, hollow, layouts, len(data), sums.result())
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
    data = as_bytes(buffer)
    tmp = str(path) + DIRTY_SUFFIX
    try:
        bulk = len(data) // DATA_ALIGNMENT * DATA_ALIGNMENT if direct_io else 0
        fd, direct = _open_for_write(tmp, direct_io and bulk > 0)
        try:
            if not direct:
                bulk = 0
            for o, n in chunks(bulk, CHUNK_BYTES):
                _pwrite_all(fd, data[o:o + n], data_offset + o)
            if direct:  # the unaligned rest and the header go through the page cache
                os.close(fd)
                fd = os.open(tmp, os.O_WRONLY)
            for o, n in chunks(len(data) - bulk, CHUNK_BYTES):
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


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    out = os.pread(fd, n, offset)
    if len(out) != n:
        raise corrupt(path, f"short read at offset {offset} (truncated?)")
    return out


def read_header(path: Path, fd: int | None = None) -> PartHeader:
    """Read and validate the preamble and header of ``path`` (CorruptCheckpointError if unusable;
    OSError if it cannot be opened)."""
    path = Path(path)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header_len, header_sum = parse_preamble(os.pread(fd, PREAMBLE.size, 0), size, path)
        return check_header_bytes(_pread_exact(fd, header_len, PREAMBLE.size, path), header_sum, path, size)
    finally:
        if own:
            os.close(fd)


def _read_hollow(fd: int, header: PartHeader, path: Path) -> bytes:
    return check_hollow(_pread_exact(fd, header.data_offset - header.hollow_offset, header.hollow_offset, path),
                         header, path)


def _read_data(fd: int, header: PartHeader, path: Path, out: memoryview | None) -> None:
    """Read the data section into ``out`` (or through a scratch chunk when None), checking every
    chunk's checksum; hashing runs in a thread (GIL released) while the next chunk is read."""
    scratch = None if out is not None else memoryview(bytearray(min(header.chunk_bytes, header.data_nbytes)))
    with ThreadPoolExecutor(1) as hasher:
        pending = []
        for i, (o, n) in enumerate(chunks(header.data_nbytes, header.chunk_bytes)):
            if scratch is not None:  # the scratch chunk is reused: finish hashing it first
                for f in pending:
                    check_chunk(f.result(), header, path)
                pending = []
            dst = out[o:o + n] if out is not None else scratch[:n]
            got = 0
            while got < n:
                k = os.preadv(fd, [dst[got:]], header.data_offset + o + got)
                if k == 0:
                    raise corrupt(path, f"short read in data chunk {i} (truncated?)")
                got += k
            pending.append(hasher.submit(lambda d=dst, i=i: (i, checksum(d))))
        for f in pending:
            check_chunk(f.result(), header, path)


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


def read_raw_part(path: Path) -> RawPart:
    """Read a whole part, verifying every checksum, into a fresh aligned host buffer. Raises
    CorruptCheckpointError (or OSError). Not collective."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(path, fd)
        prefix = _pread_exact(fd, header.data_offset, 0, path)
        hollow = check_hollow(prefix[header.hollow_offset :], header, path)
        buffer = device.empty_host(header.data_nbytes)
        _read_data(fd, header, path, as_bytes(buffer))
    finally:
        os.close(fd)
    return RawPart(header, prefix, hollow, buffer)


def read_part(path: Path) -> LoadedPart:
    """:func:`read_raw_part` and decode the hollow state dict safely."""
    return read_raw_part(path).decode(f"checkpoint file {path}")
