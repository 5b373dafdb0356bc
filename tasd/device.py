"""The one place that decides devices, synchronizes and allocates host memory.

Every CUDA call in the library goes through here so that the whole library runs on CPU-only
machines (CUDA is optional) and uses pinned memory and device syncs when CUDA is present.
"""

from __future__ import annotations

import logging
import mmap
import weakref

import torch

logger = logging.getLogger(__name__)

#: Alignment of every host buffer handed out by :func:`empty_host` (and of tensor offsets in
#: files): large enough for O_DIRECT on common block devices.
HOST_ALIGNMENT = 4096
_POPULATE_MIN_BYTES = 1 << 20


def cuda_available() -> bool:
    """True when a CUDA device can be used by this process."""
    return torch.cuda.is_available()


def synchronize() -> None:
    """Wait for all queued device work (no-op without CUDA)."""
    if cuda_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def default_device() -> torch.device:
    """The device a rank computes on: its current CUDA device, else CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def should_pin() -> bool:
    """Whether host staging memory should be page-locked (only useful with CUDA)."""
    return cuda_available()


def _register_pinned(t: torch.Tensor) -> None:
    """Page-lock the memory of ``t`` for fast device copies (cudaHostRegister), unregistered when
    ``t`` is garbage-collected. Falls back to pageable memory, with a warning, if CUDA refuses."""
    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.numel()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        logger.warning("cudaHostRegister of a %d-byte shared buffer failed (%s): device copies into it "
                       "will be slower", nbytes, err)
        return
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)


def _empty_shared(nbytes: int) -> torch.Tensor:
    """Uninitialized shared memory, allocated there directly (``share_memory_()`` on a fresh tensor
    would allocate, fault and copy twice the bytes). Page-aligned."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def empty_host(nbytes: int, pin: bool | None = None, shared: bool = False) -> torch.Tensor:
    """A 1-D uint8 host tensor of ``nbytes`` whose data pointer is HOST_ALIGNMENT-aligned.

    Pinned when ``pin`` (default: :func:`should_pin`). ``shared``: in torch shared memory (backed
    by /dev/shm), so that handing it to a worker process through a multiprocessing queue passes a
    file descriptor instead of copying the bytes; pinned then with cudaHostRegister. Not zeroed.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    pin = should_pin() if pin is None else pin
    if shared:
        t = _empty_shared(nbytes)
        if pin and nbytes:
            _register_pinned(t)
        return t
    if not pin and nbytes >= _POPULATE_MIN_BYTES:
        # Page-aligned anonymous memory, faulted in by the kernel in one go (MAP_POPULATE): on
        # VMs, first-touch page faults otherwise cost more than the copy or read that fills it.
        # The tensor holds the mapping; it is unmapped when the tensor's storage is freed.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=torch.uint8)
    raw = torch.empty(nbytes + HOST_ALIGNMENT, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % HOST_ALIGNMENT
    return raw[shift : shift + nbytes]


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
