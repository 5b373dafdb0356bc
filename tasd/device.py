"""The one place that decides devices, synchronizes and allocates host memory.

Every CUDA call in the library goes through here so that the whole library runs on CPU-only
machines (CUDA is optional) and uses pinned memory and device syncs when CUDA is present.
"""

from __future__ import annotations

import mmap

import torch

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


def empty_host(nbytes: int, pin: bool | None = None) -> torch.Tensor:
    """A 1-D uint8 host tensor of ``nbytes`` whose data pointer is HOST_ALIGNMENT-aligned.

    Pinned when ``pin`` (default: :func:`should_pin`). Not zeroed.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    pin = should_pin() if pin is None else pin
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
