"""Staging: copying tensors into one contiguous host buffer taken from a reusable pool.

A *layout* places each tensor at an aligned offset in one byte buffer. Staging copies the tensors
there (device-to-host for CUDA tensors, a plain copy for CPU ones: a save is a point-in-time
snapshot), so that writing or sending a whole part is a few large operations on one buffer.

Buffers come from a :class:`HostBufferPool` keyed by the layout's byte size: the second and later
saves of the same model reuse the buffers of the first, and the pool's counters prove it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from tasd import device

logger = logging.getLogger(__name__)

#: Alignment of each tensor inside a staging buffer (and a file's data section).
TENSOR_ALIGNMENT = 64


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lives in a staging buffer (and a file's data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as a view of ``buffer`` (a 1-D uint8 tensor), sharing its storage."""
        flat = buffer[self.offset : self.offset + self.nbytes]
        return flat.view(self.dtype).view(self.shape)

    def standalone(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor over the same memory of ``buffer`` but with a storage of its own (offset 0,
        its own size), for tensors handed to users: some torch APIs ignore a view's storage offset
        (``torch.set_rng_state`` reads from the storage start), and ``torch.save`` of a view would
        write the whole buffer. The buffer's memory stays alive while the tensor does."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        flat = torch.frombuffer(buffer.numpy(), dtype=torch.uint8, count=self.nbytes,
                                offset=self.offset)
        return flat.view(self.dtype).view(self.shape)


def plan_layout(tensors: Iterable[torch.Tensor]) -> tuple[list[TensorLayout], int]:
    """Place ``tensors`` one after another at TENSOR_ALIGNMENT offsets; return (layouts, total bytes)."""
    layouts, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        layouts.append(TensorLayout(t.dtype, tuple(t.shape), offset, nbytes))
        offset = _align(offset + nbytes, TENSOR_ALIGNMENT)
    return layouts, offset


def check_stageable(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be staged as plain bytes, or None when it can."""
    if t.layout != torch.strided:
        return f"layout {t.layout} is not supported (only dense strided tensors)"
    if t.is_quantized:
        return "quantized tensors are not supported"
    if t.device.type == "meta":
        return "meta tensors have no data"
    return None


class HostBufferPool:
    """Reusable host buffers keyed by byte size, with a bound on the bytes kept while free.

    ``acquire(nbytes)`` hands out a free buffer of exactly that size, or allocates one;
    ``release(buf)`` returns it. Free buffers beyond ``max_pooled_bytes`` are dropped, oldest
    first. ``max_pooled_bytes=None`` bounds the pool by what its users needed at once: the larger of
    the peak bytes in use and twice the largest buffer (double buffering of one layout). A save with
    replication factor F holds F buffers at once (its own part and F-1 received ones), so they are
    all kept. Thread-safe. Pinned when CUDA is present (``pin``). ``shared``: buffers live in
    shared memory (see :func:`tasd.device.empty_host`), for handing to worker processes.
    """

    def __init__(self, max_pooled_bytes: int | None = None, pin: bool | None = None, shared: bool = False):
        if max_pooled_bytes is not None and max_pooled_bytes < 0:
            raise ValueError(f"max_pooled_bytes must be >= 0, got {max_pooled_bytes}")
        self.max_pooled_bytes = max_pooled_bytes
        self.pin = pin
        self.shared = shared
        self._lock = threading.Lock()
        self._free: OrderedDict[int, torch.Tensor] = OrderedDict()  # data_ptr -> buffer, oldest first
        self._in_use: dict[int, torch.Tensor] = {}
        self._largest = 0
        self._peak_in_use = 0
        #: Counters: buffers allocated, bytes allocated, acquisitions served from the pool.
        self.allocations = 0
        self.allocated_bytes = 0
        self.reuses = 0

    @property
    def pooled_bytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            return sum(b.numel() for b in self._free.values())

    @property
    def in_use_bytes(self) -> int:
        """Bytes held in buffers handed out and not yet released."""
        with self._lock:
            return sum(b.numel() for b in self._in_use.values())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 host buffer of ``nbytes`` (contents undefined) that the caller owns until release."""
        with self._lock:
            self._largest = max(self._largest, nbytes)
            for ptr, buf in self._free.items():
                if buf.numel() == nbytes:
                    del self._free[ptr]
                    self._in_use[ptr] = buf
                    self.reuses += 1
                    self._note_peak()
                    return buf
        buf = device.empty_host(nbytes, pin=self.pin, shared=self.shared)
        with self._lock:
            self.allocations += 1
            self.allocated_bytes += nbytes
            # Zero-sized buffers may share a data pointer; key them by object identity instead.
            self._in_use[self._key(buf)] = buf
            self._note_peak()
        logger.debug("allocated a %d-byte staging buffer (%d so far)", nbytes, self.allocations)
        return buf

    def _note_peak(self) -> None:  # with the lock held
        self._peak_in_use = max(self._peak_in_use, sum(b.numel() for b in self._in_use.values()))

    @staticmethod
    def _key(buf: torch.Tensor) -> int:
        return buf.data_ptr() if buf.numel() else id(buf)

    def _untrack(self, buf: torch.Tensor) -> int:  # with the lock held
        key = self._key(buf)
        if self._in_use.pop(key, None) is None:
            raise ValueError("buffer was not acquired from this pool (or released twice)")
        return key

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from :meth:`acquire`; unknown buffers raise ValueError."""
        with self._lock:
            self._free[self._untrack(buf)] = buf
            bound = (max(2 * self._largest, self._peak_in_use) if self.max_pooled_bytes is None
                     else self.max_pooled_bytes)
            total = sum(b.numel() for b in self._free.values())
            while self._free and total > bound:
                _, dropped = self._free.popitem(last=False)
                total -= dropped.numel()

    def forget(self, buf: torch.Tensor) -> None:
        """Stop tracking a buffer from :meth:`acquire` without pooling it (another process may
        still read it): it is freed once nothing references it. Unknown buffers raise ValueError."""
        with self._lock:
            self._untrack(buf)

    def clear(self) -> None:
        """Drop all free buffers."""
        with self._lock:
            self._free.clear()


_default_pools: dict[bool, HostBufferPool] = {}
_default_lock = threading.Lock()


def default_pool(shared: bool = False) -> HostBufferPool:
    """The process-wide pool used when no pool is given (one of private memory, one of shared)."""
    with _default_lock:
        if shared not in _default_pools:
            _default_pools[shared] = HostBufferPool(shared=shared)
        return _default_pools[shared]


@dataclass
class Staged:
    """Tensors copied into one pooled buffer: tensor ``i`` is at ``layouts[i]`` inside ``buffer``;
    ``devices[i]`` is the device it came from."""

    buffer: torch.Tensor
    layouts: list[TensorLayout]
    devices: list[str]
    pool: HostBufferPool

    def release(self) -> None:
        """Return the buffer to its pool; nothing may read it afterwards. Idempotent."""
        if self.buffer is not None:
            self.pool.release(self.buffer)
            self.buffer = None  # type: ignore[assignment]

    def discard(self) -> None:
        """Let go of the buffer without pooling it, for a buffer a worker may still read
        (:meth:`HostBufferPool.forget`). Idempotent."""
        if self.buffer is not None:
            self.pool.forget(self.buffer)
            self.buffer = None  # type: ignore[assignment]


def stage(tensors: Sequence[torch.Tensor], pool: HostBufferPool | None = None,
          non_blocking: bool = False) -> Staged:
    """Copy ``tensors`` into one buffer from ``pool``. With ``non_blocking`` device-to-host copies
    may still be in flight on return (call :func:`tasd.device.synchronize` before reading)."""
    pool = pool or default_pool()
    for i, t in enumerate(tensors):
        reason = check_stageable(t)
        if reason:
            raise TypeError(f"tensor {i} cannot be staged: {reason}")
    layouts, total = plan_layout(tensors)
    buffer = pool.acquire(total)
    try:
        for t, lay in zip(tensors, layouts):
            lay.view(buffer).copy_(t.detach(), non_blocking=non_blocking and t.device.type == "cuda")
        if not non_blocking:
            device.synchronize()
    except BaseException:
        pool.release(buffer)
        raise
    return Staged(buffer, layouts, [str(t.device) for t in tensors], pool)
