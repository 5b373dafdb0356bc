"""Staging: copying tensors into one contiguous host buffer taken from a reusable pool.

A *layout* places each tensor at an aligned offset in one byte buffer. Staging copies the tensors
there (device-to-host for CUDA tensors, a plain copy for CPU ones: a save is a point-in-time
snapshot), so that writing or sending a whole part is a few large operations on one buffer.

Buffers come from a :class:`HostBufferPool` (best fit by byte size): the second and later saves of
the same model reuse the buffers of the first, also when its size changes a little from save to
save, and the pool's counters prove it. Only plain tensors can be staged (:func:`check_stageable`).
"""

from __future__ import annotations

import logging
import sys
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


def _is_dtensor(t: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported: no import here.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, getattr(mod, "DTensor", ()))


def check_stageable(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be staged as plain bytes, or None when it can.

    The reason is written to follow the tensor's name: ``f"state dict entry 'w' {reason}"``
    reads "state dict entry 'w' is a DTensor (a tensor subclass): ...". Only ``torch.Tensor``
    and ``torch.nn.Parameter`` hold their data as one plain storage: every tensor subclass is
    refused (a DTensor's shape and numel are global while its storage holds one shard; wrapper
    subclasses hold their data in inner tensors), naming the class.
    """
    cls = type(t)
    if cls is not torch.Tensor and cls is not torch.nn.Parameter:
        hint = ("use tasd.fsdp.FSDPTensorAwareStateDict for DTensor state dicts" if _is_dtensor(t)
                else "only torch.Tensor and torch.nn.Parameter hold plain storage; convert it to a plain tensor")
        return f"is a {cls.__name__} (a tensor subclass): it cannot be staged as plain bytes; {hint}"
    if t.layout != torch.strided:
        return f"has layout {t.layout}: only dense strided tensors can be staged"
    if t.is_quantized:
        return "is quantized: quantized tensors cannot be staged"
    if t.device.type == "meta":
        return "is a meta tensor: it has no data to stage"
    return None


#: A free buffer serves a request only when it is at most this many times the requested size, so
#: that a small request never takes (and keeps busy) a much larger buffer that a later large
#: request would then have to allocate again.
MAX_OVERSIZE = 2


class HostBufferPool:
    """Reusable host buffers for staging, handed out best-fit, with a bound on the bytes kept free.

    ``acquire(nbytes)`` hands out the smallest free buffer of at least ``nbytes`` (and at most
    MAX_OVERSIZE times that), as a view of exactly ``nbytes`` at its start (same ``data_ptr()``);
    when none fits it allocates a new buffer of exactly ``nbytes`` (:func:`tasd.device.empty_host`),
    after dropping the free buffers smaller than that: they are superseded, so a state whose size
    alternates settles on one buffer. ``release(buf)`` returns a buffer, ``forget(buf)`` lets it go.

    Counters: ``allocations``/``allocated_bytes`` (buffers allocated and their bytes),
    ``reuses`` (acquisitions served from free buffers), :attr:`in_use_bytes` and
    :attr:`pooled_bytes` (bytes of the buffers held by users and free in the pool, whole buffers:
    a request served from a larger buffer holds all of it).

    Bound: on release, free buffers beyond the bound are dropped, oldest first, so that
    :attr:`pooled_bytes` never exceeds it. The bound is ``max_pooled_bytes``, or with ``None``
    (default) MAX_OVERSIZE times the peak of :attr:`in_use_bytes` so far: the buffers its users
    once held at once (a save with replication factor F holds F buffers at once, its own part and
    F-1 received ones, so all are kept), with room for smaller buffers that the large ones are too
    large to serve. The peak is a high-water mark: a pool that once served a large save keeps up
    to that much until :meth:`clear`. Buffers in use are not bounded. A dropped buffer is freed
    (pinned memory unregistered and unmapped) once nothing references it.

    Thread-safe. Pinned when ``pin`` (default: when CUDA is present). ``shared``: buffers live in
    shared memory (see :func:`tasd.device.empty_host`), for handing to worker processes.
    """

    def __init__(self, max_pooled_bytes: int | None = None, pin: bool | None = None, shared: bool = False):
        if max_pooled_bytes is not None and max_pooled_bytes < 0:
            raise ValueError(f"max_pooled_bytes must be >= 0, got {max_pooled_bytes}")
        self.max_pooled_bytes = max_pooled_bytes
        self.pin = pin
        self.shared = shared
        self._lock = threading.Lock()
        self._free: OrderedDict[int, torch.Tensor] = OrderedDict()  # key -> buffer, oldest first
        self._in_use: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (buffer, view handed out)
        self._free_bytes = 0
        self._in_use_bytes = 0
        self._allocating = 0  # bytes being allocated outside the lock, counted as in use
        self._peak_in_use = 0
        #: Counters: buffers allocated, bytes allocated, acquisitions served from free buffers.
        self.allocations = 0
        self.allocated_bytes = 0
        self.reuses = 0

    @property
    def pooled_bytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            return self._free_bytes

    @property
    def in_use_bytes(self) -> int:
        """Bytes of the buffers handed out and not yet released or forgotten (whole buffers)."""
        with self._lock:
            return self._in_use_bytes

    @staticmethod
    def _key(buf: torch.Tensor) -> int:
        # Zero-sized buffers may share a data pointer; they are keyed by object identity instead.
        return buf.data_ptr() if buf.numel() else id(buf)

    def _best_fit(self, nbytes: int) -> int | None:  # with the lock held
        best = None
        for key, buf in self._free.items():
            size = buf.numel()
            if nbytes <= size <= MAX_OVERSIZE * nbytes and (best is None or size < self._free[best].numel()):
                best = key
        return best

    def _note_in_use(self, nbytes: int) -> None:  # with the lock held
        self._in_use_bytes += nbytes
        self._peak_in_use = max(self._peak_in_use, self._in_use_bytes + self._allocating)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 host buffer of exactly ``nbytes`` (contents undefined) that the caller owns
        until :meth:`release` or :meth:`forget`. Not collective; thread-safe."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            key = self._best_fit(nbytes)
            if key is not None:
                buf = self._free.pop(key)
                self._free_bytes -= buf.numel()
                view = buf if buf.numel() == nbytes else buf[:nbytes]
                self._in_use[key] = (buf, view)
                self._note_in_use(buf.numel())
                self.reuses += 1
                return view
            for key in [k for k, b in self._free.items() if b.numel() < nbytes]:
                self._free_bytes -= self._free.pop(key).numel()  # superseded by the new buffer
            self._allocating += nbytes
            self._peak_in_use = max(self._peak_in_use, self._in_use_bytes + self._allocating)
        try:
            buf = device.empty_host(nbytes, pin=self.pin, shared=self.shared)
        finally:
            with self._lock:
                self._allocating -= nbytes
        with self._lock:
            self.allocations += 1
            self.allocated_bytes += nbytes
            self._in_use[self._key(buf)] = (buf, buf)
            self._note_in_use(nbytes)
        logger.debug("allocated a %d-byte staging buffer (%d so far)", nbytes, self.allocations)
        return buf

    def _untrack(self, view: torch.Tensor) -> tuple[int, torch.Tensor]:  # with the lock held
        key = self._key(view)
        entry = self._in_use.get(key)
        if entry is None or entry[1].numel() != view.numel():
            raise ValueError("buffer was not acquired from this pool (or released twice)")
        del self._in_use[key]
        self._in_use_bytes -= entry[0].numel()
        return key, entry[0]

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from :meth:`acquire` (nothing may use it afterwards); unknown
        buffers raise ValueError. Not collective; thread-safe."""
        with self._lock:
            key, whole = self._untrack(buf)
            self._free[key] = whole
            self._free_bytes += whole.numel()
            bound = (MAX_OVERSIZE * self._peak_in_use if self.max_pooled_bytes is None
                     else self.max_pooled_bytes)
            while self._free and self._free_bytes > bound:
                _, dropped = self._free.popitem(last=False)
                self._free_bytes -= dropped.numel()

    def forget(self, buf: torch.Tensor) -> None:
        """Stop tracking a buffer from :meth:`acquire` without pooling it (another process may
        still read it): it is freed once nothing references it. Unknown buffers raise ValueError."""
        with self._lock:
            self._untrack(buf)

    def clear(self) -> None:
        """Drop all free buffers."""
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


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
    """Copy ``tensors`` into one buffer from ``pool``. Device-to-host copies are queued on the
    current CUDA stream; without ``non_blocking`` this waits for that stream once (not for the
    whole device: the training's other streams go on). With ``non_blocking`` they may still be in
    flight on return (call :func:`tasd.device.synchronize_stream` before reading)."""
    pool = pool or default_pool()
    for i, t in enumerate(tensors):
        reason = check_stageable(t)
        if reason:
            raise TypeError(f"tensor {i} {reason}")
    layouts, total = plan_layout(tensors)
    buffer = pool.acquire(total)
    try:
        on_device = False
        for t, lay in zip(tensors, layouts):
            on_device |= t.device.type == "cuda"
            lay.view(buffer).copy_(t.detach(), non_blocking=t.device.type == "cuda")
        if on_device and not non_blocking:
            device.synchronize_stream()
    except BaseException:
        pool.release(buffer)
        raise
    return Staged(buffer, layouts, [str(t.device) for t in tensors], pool)
