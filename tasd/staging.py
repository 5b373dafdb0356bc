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
import math
import pickle
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from tasd import bounce, device

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


class Layout(Sequence[TensorLayout]):
    """Where each of a sequence of tensors lives in one buffer (a sequence of TensorLayout, in
    tensor order) and the buffer's size ``nbytes``. Immutable: :func:`plan_layout` hands the same
    object to every staging of the same structure, and the pool caches its views per buffer.

    Compared and hashed by identity (derived forms, such as the part format's tensor table, are
    cached per object). Pickles compactly (one bytes object, built once), since an async save
    hands it to a worker process on the training thread."""

    __slots__ = ("_entries", "nbytes", "_pickled", "__weakref__")

    def __init__(self, entries: Sequence[TensorLayout], nbytes: int):
        self._entries = tuple(entries)
        self.nbytes = nbytes
        self._pickled: bytes | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):  # type: ignore[override]
        return self._entries[i]

    def __iter__(self) -> Iterator[TensorLayout]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Layout({len(self._entries)} tensors, {self.nbytes} bytes)"

    def __reduce__(self):
        if self._pickled is None:  # a benign race: two threads build the same bytes
            rows = [(lay.dtype, lay.shape, lay.offset, lay.nbytes) for lay in self._entries]
            self._pickled = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
        return (_unpickle_layout, (self._pickled, self.nbytes))


def _unpickle_layout(rows: bytes, nbytes: int) -> Layout:
    return Layout([TensorLayout(*row) for row in pickle.loads(rows)], nbytes)


#: Layouts of the structures staged most recently, by (dtype, shape) of every tensor.
_PLANS_KEPT = 8
_plans: OrderedDict[tuple, Layout] = OrderedDict()
_plans_lock = threading.Lock()


def plan_layout(tensors: Sequence[torch.Tensor]) -> Layout:
    """Place ``tensors`` one after another at TENSOR_ALIGNMENT offsets. The layout of a structure
    (the dtype and shape of every tensor) staged recently is returned from a cache: a model saved
    every few minutes is planned once. Not collective; thread-safe."""
    signature = tuple([(t.dtype, t.shape) for t in tensors])
    with _plans_lock:
        hit = _plans.get(signature)
        if hit is not None:
            _plans.move_to_end(signature)
            return hit
    entries, offset = [], 0
    for dtype, shape in signature:
        nbytes = math.prod(shape) * dtype.itemsize
        entries.append(TensorLayout(dtype, tuple(shape), offset, nbytes))
        offset = _align(offset + nbytes, TENSOR_ALIGNMENT)
    layout = Layout(entries, offset)
    with _plans_lock:
        _plans[signature] = layout
        while len(_plans) > _PLANS_KEPT:
            _plans.popitem(last=False)
    return layout


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
    if t.is_meta:
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
        self._views: dict[int, tuple[Layout, list[torch.Tensor]]] = {}  # key -> views of the last layout staged
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
                self._views.pop(key, None)
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
                key, dropped = self._free.popitem(last=False)
                self._free_bytes -= dropped.numel()
                self._views.pop(key, None)

    def forget(self, buf: torch.Tensor) -> None:
        """Stop tracking a buffer from :meth:`acquire` without pooling it (another process may
        still read it): it is freed once nothing references it. Unknown buffers raise ValueError."""
        with self._lock:
            key, _ = self._untrack(buf)
            self._views.pop(key, None)

    def clear(self) -> None:
        """Drop all free buffers."""
        with self._lock:
            for key in self._free:
                self._views.pop(key, None)
            self._free.clear()
            self._free_bytes = 0

    def views(self, buf: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
        """Views of ``buf`` (held from :meth:`acquire`, at least ``layout.nbytes`` long), one per
        entry of ``layout``. Built once per buffer and layout: while the pool keeps the buffer, the
        views of the layout last asked for are kept with it, so staging the same structure into a
        reused buffer creates no tensor objects. ValueError for a buffer not held from this pool.
        Not collective; thread-safe."""
        key = self._key(buf)
        with self._lock:
            entry = self._in_use.get(key)
            if entry is None or entry[1].numel() != buf.numel():
                raise ValueError("buffer was not acquired from this pool (or was released)")
            cached = self._views.get(key)
            if cached is not None and cached[0] is layout:
                return cached[1]
        if layout.nbytes > buf.numel():
            raise ValueError(f"layout of {layout.nbytes} bytes does not fit a buffer of {buf.numel()} bytes")
        views = [lay.view(entry[0]) for lay in layout]
        with self._lock:
            if key in self._in_use:
                self._views[key] = (layout, views)
        return views


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
    ``devices[i]`` is the device it came from. ``copies``: while device-to-host copies queued by
    ``stage(non_blocking=True)`` may still be in flight, the CUDA event recorded after them
    (:meth:`wait` before reading the buffer), else None."""

    buffer: torch.Tensor
    layouts: Layout
    devices: list[str]
    pool: HostBufferPool
    copies: Any = None

    def wait(self) -> None:
        """Wait for the pending device-to-host copies (their event; from any thread; nothing when
        none are pending). Raises what CUDA raises (an error of the copies, or a sticky error of
        earlier work); the copies then count as still pending."""
        if self.copies is not None:
            device.wait_event(self.copies)
            self.copies = None

    def _settle(self) -> bool:
        """Wait for pending copies before the buffer is let go; False when that failed (the copies'
        state is unknown, so the buffer must never be reused)."""
        try:
            self.wait()
            return True
        except Exception as e:  # noqa: BLE001 - the caller is already failing or finishing
            logger.warning("waiting for the device-to-host copies into a staging buffer failed (%s): the buffer "
                           "is not reused", e)
            return False

    def release(self) -> None:
        """Return the buffer to its pool (after its pending copies; a buffer whose copies could
        not be waited for is let go instead, never reused); nothing may read it afterwards.
        Idempotent."""
        if self.buffer is not None:
            if not self._settle():
                self.discard()
                return
            self.pool.release(self.buffer)
            self.buffer = None  # type: ignore[assignment]

    def discard(self) -> None:
        """Let go of the buffer without pooling it, for a buffer a worker may still read
        (:meth:`HostBufferPool.forget`), after waiting for its pending copies (best effort).
        Idempotent."""
        if self.buffer is not None:
            self._settle()
            self.pool.forget(self.buffer)
            self.buffer = None  # type: ignore[assignment]


def stage(tensors: Sequence[torch.Tensor], pool: HostBufferPool | None = None,
          non_blocking: bool = False) -> Staged:
    """Copy ``tensors`` into one buffer from ``pool`` (:func:`plan_layout` places them).
    Device-to-host copies are queued on the current CUDA stream; without ``non_blocking`` this
    waits for that stream once (not for the whole device: the training's other streams go on).
    With ``non_blocking`` they may still be in flight on return (``Staged.copies``; call
    :meth:`Staged.wait` before reading; releasing the buffer waits for them). TypeError naming
    the tensor's index for a tensor that cannot be staged (:func:`check_stageable`). Not collective.

    The cost per tensor is a few microseconds of Python once the structure was staged before:
    the layout and the buffer's views are cached, and the copies are one ``torch._foreach_copy_``
    (host tensors) or, from a CUDA device, a few gathering kernels and transfers for the small
    tensors (:mod:`tasd.bounce`) and one copy per large one.
    """
    pool = pool or default_pool()
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        reason = check_stageable(t)
        if reason:
            raise TypeError(f"tensor {i} {reason}")
    layout = plan_layout(tensors)
    buffer = pool.acquire(layout.nbytes)
    devices = [t.device for t in tensors]
    on_device = any(d.type == "cuda" for d in set(devices))
    try:
        if tensors:
            with torch.no_grad():  # the copies are snapshots, never part of an autograd graph
                if on_device:  # small device tensors go in a few transfers (tasd.bounce)
                    bounce.copy_to_host(tensors, devices, layout, buffer, pool.views(buffer, layout))
                else:
                    torch._foreach_copy_(pool.views(buffer, layout), tensors)
        if on_device and not non_blocking:
            device.synchronize_stream()
    except BaseException:
        if on_device and non_blocking:  # copies queued before the failure may still run
            try:
                device.synchronize_stream()
            except Exception:  # noqa: BLE001 - their state is unknown: never reuse the buffer
                pool.forget(buffer)
                raise
        pool.release(buffer)
        raise
    names = {d: str(d) for d in set(devices)}
    copies = device.record_event() if on_device and non_blocking else None
    return Staged(buffer, layout, [names[d] for d in devices], pool, copies)
