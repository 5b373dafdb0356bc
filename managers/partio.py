"""Part files on disk: durable, atomic writes and fully verified reads (format: :mod:`fileformat`).

Writes go to ``<name>.dirty`` (a stale one is removed first; it is created exclusively and never
through a symbolic link), are fsync'd, renamed to ``<name>``, and the directory is fsync'd; the
aligned bulk of the data goes through O_DIRECT where the file system allows it.

Reads open only regular files, without following symbolic links and without blocking (a FIFO or
device named like a part is reported as CorruptCheckpointError, never waited on), and check the
header, the hollow bytes and every data chunk; hashing runs in a thread (xxhash releases the GIL)
while the next bytes are read. :func:`read_part` reads the data section straight into one
allocation per tensor (scatter reads of at most IOV_MAX pieces), so a tensor kept from a load
keeps only its own bytes alive. Nothing here is collective.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import xxhash

from tasd import device
from tasd.managers.fileformat import (CHUNK_BYTES, DATA_ALIGNMENT, PREAMBLE, LoadedPart, PartHeader,
                                      PartMeta, RawPart, as_bytes, check_chunk, check_header_bytes, check_hollow,
                                      checksum, chunk_checksums, chunks, corrupt, decode_hollow, encode_header,
                                      own_storage, parse_preamble)
from tasd.managers.partnames import DIRTY_SUFFIX
from tasd.staging import TensorLayout

#: Most pieces one scatter read takes (the system's IOV_MAX).
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024
#: Bytes one scatter read fills at most: the next batch is read while this one is hashed.
READ_BATCH_BYTES = 16 << 20

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_for_write(path: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
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


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (opened read-only) by its path. Not collective."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(path: Path, meta: PartMeta, hollow: bytes, buffer: torch.Tensor,
               layouts: Sequence[TensorLayout], direct_io: bool = True) -> int:
    """Encode and write one part (see :func:`write_encoded`); the data's checksums are computed
    in a thread (GIL released) while the data is written. Returns the file size. ValueError when
    the header or hollow state dict exceeds what a reader accepts. Not collective."""
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
    giving them once the data is written) at 0. A stale ``path.dirty`` is removed first and the new
    one is created exclusively, never through a symbolic link. With ``direct_io`` the aligned bulk
    of the data goes through O_DIRECT where the file system allows it. On any error the ``.dirty``
    file is removed and the error propagates (OSError as it comes). Returns the file size. Not
    collective.
    """
    data = as_bytes(buffer)
    tmp = str(path) + DIRTY_SUFFIX
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
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
                fd = os.open(tmp, os.O_WRONLY | _NOFOLLOW)
            for o, n in chunks(len(data) - bulk, CHUNK_BYTES):
                _pwrite_all(fd, data[bulk + o:bulk + o + n], data_offset + bulk + o)
            _pwrite_all(fd, memoryview(prefix() if callable(prefix) else prefix), 0)
            os.ftruncate(fd, data_offset + len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_path(Path(path).parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return data_offset + len(data)


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def open_part(path: Path) -> int:
    """Open ``path`` for reading when it is a regular file; returns the descriptor (the caller
    closes it). Never follows a symbolic link and never blocks: anything but a regular file
    raises CorruptCheckpointError naming what it is; OSError (FileNotFoundError when it vanished)
    when it cannot be opened. Not collective."""
    path = Path(path)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(path, f"it is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not a regular file")
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a symbolic link since lstat
            raise corrupt(path, "it is a symbolic link, not a regular file") from None
        raise
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise corrupt(path, "it was replaced while being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    out = os.pread(fd, n, offset)
    if len(out) != n:
        raise corrupt(path, f"short read at offset {offset} (truncated?)")
    return out


def read_header(path: Path, fd: int | None = None) -> PartHeader:
    """Read and validate the preamble and header of ``path`` (CorruptCheckpointError if unusable,
    including when it is not a regular file; OSError if it cannot be opened). Not collective."""
    path = Path(path)
    own = fd is None
    if own:
        fd = open_part(path)
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
            _preadv_all(fd, [dst], header.data_offset + o, path)
            pending.append(hasher.submit(lambda d=dst, i=i: (i, checksum(d))))
        for f in pending:
            check_chunk(f.result(), header, path)


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill ``views`` (at most IOV_MAX byte views) from ``offset`` on, retrying short reads."""
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            raise corrupt(path, f"short read at offset {offset} (truncated?)")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def _pieces(header: PartHeader, storages: list[memoryview]) -> Iterator[memoryview]:
    """The data section as consecutive byte views, at most READ_BATCH_BYTES each: the tensors'
    own storages, and fresh scratch for the padding between them (read only to be hashed)."""
    pos = 0
    for lay, view in zip(header.layouts, storages):
        if lay.nbytes == 0:
            continue
        for gap in range(pos, lay.offset, READ_BATCH_BYTES):
            yield memoryview(bytearray(min(READ_BATCH_BYTES, lay.offset - gap)))
        for o in range(0, lay.nbytes, READ_BATCH_BYTES):
            yield view[o:o + READ_BATCH_BYTES]
        pos = lay.offset + lay.nbytes
    for gap in range(pos, header.data_nbytes, READ_BATCH_BYTES):
        yield memoryview(bytearray(min(READ_BATCH_BYTES, header.data_nbytes - gap)))


class _ChunkHasher:
    """Streams the data section's bytes, in order, through one xxh3 state per checksum chunk and
    checks each chunk as it completes. Used from one thread at a time."""

    def __init__(self, header: PartHeader, path: Path):
        self.header, self.path = header, path
        self.pos, self.state = 0, xxhash.xxh3_64()

    def update(self, views: list[memoryview]) -> None:
        size = self.header.chunk_bytes
        for view in views:
            while view:
                room = size - self.pos % size
                part, view = view[:room], view[room:]
                self.state.update(part)
                self.pos += len(part)
                if self.pos % size == 0 or self.pos == self.header.data_nbytes:
                    check_chunk(((self.pos - 1) // size, self.state.intdigest()), self.header, self.path)
                    self.state = xxhash.xxh3_64()


def _read_tensors(fd: int, header: PartHeader, path: Path) -> list[torch.Tensor]:
    """The data section read straight into one allocation per tensor, every chunk checked."""
    tensors, storages = [], []
    for lay in header.layouts:
        t, view = own_storage(lay)
        tensors.append(t)
        storages.append(view)
    hasher = _ChunkHasher(header, path)
    with ThreadPoolExecutor(1, thread_name_prefix="tasd-hash") as pool:
        pending: list[Future] = []
        batch: list[memoryview] = []
        batch_bytes, offset = 0, header.data_offset
        pieces = _pieces(header, storages)
        while True:
            piece = next(pieces, None)
            if piece is not None:
                batch.append(piece)
                batch_bytes += len(piece)
            if batch and (piece is None or len(batch) == IOV_MAX or batch_bytes >= READ_BATCH_BYTES):
                _preadv_all(fd, list(batch), offset, path)
                offset += batch_bytes
                pending.append(pool.submit(hasher.update, batch))
                while pending and pending[0].done():
                    pending.pop(0).result()  # a mismatch stops the read early
                batch, batch_bytes = [], 0
            if piece is None:
                break
        for f in pending:
            f.result()
    if hasher.pos != header.data_nbytes:  # cannot happen: the pieces cover the data section
        raise corrupt(path, f"read {hasher.pos} data bytes, the header says {header.data_nbytes}")
    return tensors


def verify_part(path: Path) -> PartHeader:
    """Check header, hollow and data checksums of ``path`` without keeping its data. Raises
    CorruptCheckpointError (also for anything but a regular file) or OSError when the file is
    unusable. Not collective."""
    path = Path(path)
    fd = open_part(path)
    try:
        header = read_header(path, fd)
        _read_hollow(fd, header, path)
        _read_data(fd, header, path, None)
        return header
    finally:
        os.close(fd)


class RawPartReader:
    """A part opened to be sent as bytes: its header and prefix are read and checked when it is
    opened (:func:`open_raw_part`), its data section is read into ``buffer`` (fresh pageable host
    memory) by :meth:`fill`, in order, piece by piece, so that a sender can send each piece while
    it reads the next. Every checksum chunk is verified as it completes; ``verified`` once all
    are. ``close()`` (or a ``with`` block) closes the file. Not thread-safe; not collective."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self.header = read_header(path, fd)
        self.prefix = _pread_exact(fd, self.header.data_offset, 0, path)
        self.hollow = check_hollow(self.prefix[self.header.hollow_offset:], self.header, path)
        self.buffer = device.empty_host(self.header.data_nbytes, pin=False)  # sent or copied out: never to a device
        self._hasher = _ChunkHasher(self.header, path)
        self._filled = 0

    @property
    def verified(self) -> bool:
        """True once the whole data section was read and every chunk matched its checksum."""
        return self._filled == self.header.data_nbytes

    def fill(self, start: int, stop: int) -> None:
        """Read data bytes ``[start, stop)`` into ``buffer``; ``start`` must be where the previous
        fill stopped (ValueError otherwise). CorruptCheckpointError when the file is short or a
        completed chunk fails its checksum (the bytes stay in ``buffer``), OSError as it comes."""
        stop = min(stop, self.header.data_nbytes)
        if start != self._filled or stop < start:
            raise ValueError(f"{self.path}: fill({start}, {stop}) after {self._filled} bytes: pieces go in order")
        view = as_bytes(self.buffer)[start:stop]
        if view:
            _preadv_all(self._fd, [view], self.header.data_offset + start, self.path)
            self._hasher.update([view])
        self._filled = stop

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RawPartReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def part(self) -> RawPart:
        """The part read so far as a RawPart (whole and verified once :attr:`verified`)."""
        return RawPart(self.header, self.prefix, self.hollow, self.buffer)


def open_raw_part(path: Path) -> RawPartReader:
    """Open a part to read it as bytes (see :class:`RawPartReader`). CorruptCheckpointError when
    it is not a regular file or its header or hollow bytes are damaged, OSError when it cannot
    be opened. The caller closes it. Not collective."""
    path = Path(path)
    fd = open_part(path)
    try:
        return RawPartReader(path, fd)
    except BaseException:
        os.close(fd)
        raise


def read_raw_part(path: Path) -> RawPart:
    """Read a whole part, verifying every checksum, into a fresh aligned host buffer (to send to a
    peer as is). Raises CorruptCheckpointError (or OSError). Not collective."""
    with open_raw_part(path) as reader:
        reader.fill(0, reader.header.data_nbytes)
        return reader.part()


def read_part(path: Path) -> LoadedPart:
    """Read and verify a part, decode its hollow state dict safely, and read its tensors each into
    a storage of its own. Raises CorruptCheckpointError (or OSError). Not collective."""
    path = Path(path)
    fd = open_part(path)
    try:
        header = read_header(path, fd)
        hollow = decode_hollow(_read_hollow(fd, header, path), f"checkpoint file {path}")
        return LoadedPart(header, hollow, _read_tensors(fd, header, path))
    finally:
        os.close(fd)
