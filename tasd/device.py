"""The one place that decides devices, synchronizes and allocates host memory.

Every CUDA call of the library (device queries, synchronization, page-locking host memory,
choosing a device) goes through here, so that the whole library runs on CPU-only machines (CUDA is
optional) and uses pinned memory and stream waits when CUDA is present; elsewhere tensors only move
between devices with torch copies (staging, restore), issued on the calling thread's current
stream. Nothing here is called from tasd's background threads. Device
syncs are counted (:func:`sync_count`) so that tests can prove a path does not wait for the GPU.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Alignment of every host buffer handed out by :func:`empty_host` (and of tensor offsets in
#: files): large enough for O_DIRECT on common block devices.
HOST_ALIGNMENT = 4096
_POPULATE_MIN_BYTES = 1 << 20


def cuda_available() -> bool:
    """True when a CUDA device can be used by this process."""
    return torch.cuda.is_available()


_sync_lock = threading.Lock()
_sync_calls = 0


def synchronize() -> None:
    """Wait for all queued device work (no-op without CUDA). Every call is counted by
    :func:`sync_count`, with or without CUDA."""
    global _sync_calls
    with _sync_lock:
        _sync_calls += 1
    if cuda_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synchronize_stream() -> None:
    """Wait for the work queued on this thread's current CUDA stream (no-op without CUDA): what a
    device-to-host copy issued on it needs, without waiting for the other streams (the training's
    communication, for one). Counted by :func:`sync_count` like :func:`synchronize`."""
    global _sync_calls
    with _sync_lock:
        _sync_calls += 1
    if cuda_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def record_event() -> Any:
    """A CUDA event recorded on this thread's current stream (None without CUDA in use): waiting
    for it (:func:`wait_event`, from any thread) waits for the work queued on that stream so far
    and no more."""
    if cuda_available() and torch.cuda.is_initialized():
        event = torch.cuda.Event()
        event.record()
        return event
    return None


def wait_event(event: Any) -> None:
    """Wait for ``event`` from :func:`record_event` (None: nothing to wait for). Counted by
    :func:`sync_count` like :func:`synchronize`; raises what CUDA raises."""
    global _sync_calls
    if event is None:
        return
    with _sync_lock:
        _sync_calls += 1
    event.synchronize()


def sync_count() -> int:
    """How many times :func:`synchronize` was called in this process (CPU no-ops included), so
    that tests can assert that a code path makes no device synchronization."""
    with _sync_lock:
        return _sync_calls


def default_device() -> torch.device:
    """The device a rank computes on: its current CUDA device, else CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def should_pin() -> bool:
    """Whether host staging memory should be page-locked (only useful with CUDA)."""
    return cuda_available()


_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, as torch's own stager does


def _cuda_host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister of ``nbytes`` at ``ptr``; returns the CUDA error code, 0 on success."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))


def _cuda_host_unregister(ptr: int) -> int:
    """cudaHostUnregister of the range registered at ``ptr``; returns the CUDA error code."""
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _unpin(ptr: int) -> None:
    err = _cuda_host_unregister(ptr)
    if err != 0:
        logger.warning("cudaHostUnregister of the host buffer at %#x failed (CUDA error %d)", ptr, err)


def _page_lock(t: torch.Tensor) -> None:
    """Page-lock the memory of ``t`` (cudaHostRegister of exactly its bytes) for fast device copies.

    Unregistered when its storage dies (with the last view of it, not with ``t``), before the
    memory is freed; not at interpreter exit (the process's memory goes anyway). Falls back to
    pageable memory, with a warning, if CUDA refuses.
    """
    ptr, nbytes = t.data_ptr(), t.numel()
    err = _cuda_host_register(ptr, nbytes)
    if err != 0:
        logger.warning("cudaHostRegister of a %d-byte host buffer failed (CUDA error %d): device copies "
                       "into it will be slower", nbytes, err)
        return
    # torch keeps a storage's Python object alive as long as the storage (views included) and
    # clears its weak references before the storage frees its memory (tests/test_staging.py).
    weakref.finalize(t.untyped_storage(), _unpin, ptr).atexit = False


def _empty_shared(nbytes: int) -> torch.Tensor:
    """Uninitialized shared memory, allocated there directly (``share_memory_()`` on a fresh tensor
    would allocate, fault and copy twice the bytes). Page-aligned."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


#: Transparent huge pages are asked for (madvise) for mappings of at least this size.
HUGE_PAGE_BYTES = 2 << 20


def _huge_pages_possible(_mode: list[str] = []) -> bool:  # noqa: B006 - read once per process
    """Whether the kernel gives transparent huge pages to a mapping that asks (mode "always" or
    "madvise", read once from sysfs; False where it cannot be read)."""
    if not _mode:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                text = f.read()
            _mode.append(text[text.index("[") + 1 : text.index("]")])
        except (OSError, ValueError):
            _mode.append("unknown")
    return _mode[0] in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def _empty_mapped(nbytes: int) -> torch.Tensor:
    """Page-aligned anonymous memory of exactly ``nbytes`` (> 0), faulted in by the kernel in one
    go: on VMs, first-touch page faults of 4 KiB pages cost more than the copy or read that fills
    the memory (256 MiB: 0.17 s of faults against 0.04 s of copying from the page cache, measured
    on the development VM). From HUGE_PAGE_BYTES up, where the kernel has transparent huge pages,
    the mapping asks for them (MADV_HUGEPAGE: 512 times fewer faults, taken by whatever fills the
    memory: 0.06 s to fault in and read the same 256 MiB); otherwise MAP_POPULATE. The tensor's storage holds the mapping,
    unmapped when the storage is freed (its storage cannot be resized)."""
    huge = nbytes >= HUGE_PAGE_BYTES and _huge_pages_possible()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0 if huge else getattr(mmap, "MAP_POPULATE", 0))
    mapping = mmap.mmap(-1, nbytes, flags=flags)
    if huge:  # faulted in 2 MiB at a time by whatever fills it (a read, a copy)
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            logger.debug("madvise(MADV_HUGEPAGE) failed: %d bytes in 4 KiB pages", nbytes)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous host tensor in a storage of exactly its own bytes, for data
    about to be read or copied in (a load): from 1 MiB up an exact-size mapping populated in one
    go, with huge pages where the kernel has them (see :func:`empty_host`), torch's allocator below.
    Never pinned: loads fill it from files or peers. Not collective."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _POPULATE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    return _empty_mapped(nbytes).view(dtype).view(shape)


def empty_host(nbytes: int, pin: bool | None = None, shared: bool = False) -> torch.Tensor:
    """A 1-D uint8 host tensor of ``nbytes`` whose data pointer is HOST_ALIGNMENT-aligned. Not zeroed.

    ``pin`` (default: :func:`should_pin`): page-locked when CUDA is present (without CUDA
    page-locking has no use: the memory is pageable). Pinned memory is an exact-size mapping
    registered with cudaHostRegister, not torch's caching host allocator (which rounds sizes up to
    a power of two and keeps freed memory page-locked for the life of the process): it goes back
    to the system when the tensor's storage is freed. ``shared``: in torch shared memory (backed by
    /dev/shm), so that handing it to a worker process through a multiprocessing queue passes a
    file descriptor instead of copying the bytes; pinned then with cudaHostRegister too.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    pin = (should_pin() if pin is None else pin) and nbytes > 0 and cuda_available()
    if shared:
        t = _empty_shared(nbytes)
    elif pin or nbytes >= _POPULATE_MIN_BYTES:
        t = _empty_mapped(nbytes)
    else:
        raw = torch.empty(nbytes + HOST_ALIGNMENT, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % HOST_ALIGNMENT
        return raw[shift : shift + nbytes]
    if pin:
        _page_lock(t)
    return t


def host_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized host tensor of ``t``'s shape and dtype (contiguous), pinned when CUDA is
    present: exact-size page-locked memory (see :func:`empty_host`) from 1 MiB up, torch's caching
    host allocator below (one page-locked mapping per small tensor would cost more than its
    rounding)."""
    nbytes = t.numel() * t.element_size()
    if should_pin() and nbytes >= _POPULATE_MIN_BYTES:
        return empty_host(nbytes, pin=True).view(t.dtype).view(t.shape)
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=should_pin())


def restore_device(tensor: torch.Tensor, device: str, non_blocking: bool = True) -> torch.Tensor:
    """Move ``tensor`` to ``device`` (a string as recorded at staging). A CUDA device that this
    process lacks falls back to the current CUDA device, and to CPU without CUDA."""
    target = torch.device(device)
    if target.type == "cuda":
        if not cuda_available():
            target = torch.device("cpu")
        elif target.index is not None and target.index >= torch.cuda.device_count():
            target = default_device()
    if tensor.device == target:
        return tensor
    return tensor.to(target, non_blocking=non_blocking and target.type == "cuda")
