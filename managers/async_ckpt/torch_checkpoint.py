"""``torch.save`` in the background (after NVRx's ``TorchAsyncCheckpoint``)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from tasd import device
from tasd.managers.async_ckpt.calls_queue import AsyncCallsQueue
from tasd.managers.async_ckpt.request import AsyncRequest, preload_tensors

logger = logging.getLogger(__name__)


def _atomic_torch_save(state_dict: Any, path: str) -> None:
    """torch.save to a temporary file next to ``path``, fsync, then rename: readers never see a
    partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TorchAsyncCheckpoint:
    """Saves state dicts with ``torch.save``, synchronously or in the background.

    ``async_save`` snapshots the tensors to host memory (:func:`preload_tensors`) before returning,
    so training may change them right away; the file appears (atomically) when the background
    call finishes. Call :meth:`finalize_async_save` regularly and :meth:`close` at the end.
    """

    def __init__(self, persistent_queue: bool = True, wait_timeout_s: float | None = None):
        self.queue = AsyncCallsQueue(persistent=persistent_queue, wait_timeout_s=wait_timeout_s)

    def async_save(self, state_dict: Any, path: str | os.PathLike, finalize_fns: list | None = None) -> int:
        """Start saving ``state_dict`` to ``path`` in the background; returns the call index.
        Local, not collective. Raises TypeError for a leaf hiding a tensor, CheckpointingException
        when the state cannot be pickled for a persistent worker."""
        snapshot = preload_tensors(state_dict, non_blocking=True)
        device.synchronize()
        req = AsyncRequest(_atomic_torch_save, (snapshot, os.fspath(path)), list(finalize_fns or []))
        return self.queue.schedule_async_request(req)

    def save(self, state_dict: Any, path: str | os.PathLike) -> None:
        """Synchronous ``torch.save`` (same atomic write as the background one). Local."""
        _atomic_torch_save(state_dict, os.fspath(path))

    def finalize_async_save(self, blocking: bool = False, no_dist: bool = True,
                            terminate: bool = False) -> list[int]:
        """:meth:`AsyncCallsQueue.maybe_finalize_async_calls` (collective when ``no_dist`` is
        False); ``terminate`` then closes the queue (its workers stop). Returns finalized indices;
        raises CheckpointingException for a failed save."""
        done = self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=no_dist)
        if terminate:
            self.queue.close(no_dist=no_dist)
        return done

    def close(self, abort: bool = False) -> None:
        """Finish pending saves locally (``no_dist=True``) and stop the worker; ``abort`` kills it."""
        self.queue.close(abort=abort, no_dist=True)
