"""``torch.save`` in the background (after NVRx's ``TorchAsyncCheckpoint``)."""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import torch

from tasd import device
from tasd.basic import BasicTensorAwareStateDict
from tasd.managers.async_ckpt.calls_queue import AsyncCallsQueue
from tasd.managers.async_ckpt.request import AsyncRequest, preload_tensors
from tasd.staging import HostBufferPool, Staged, TensorLayout, default_pool, stage

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


def _save_staged(hollow: bytes, buffer: torch.Tensor, layouts: list[TensorLayout], path: str) -> None:
    """The background call of a staged save: rebuild the state dict around the staged bytes (each
    tensor with a storage of its own, so torch.save writes only its bytes) and save it."""
    sd = pickle.loads(hollow)  # pickled by this library in the scheduling process: trusted
    sd.insert_tensors([lay.standalone(buffer) for lay in layouts])
    _atomic_torch_save(sd.state_dict, path)


class _StagingHandle:
    """Handle (see :mod:`tasd.managers.async_ckpt.request`) of a staged save's call: the call's
    first finalize function returns the buffer to its pool; a dropped call's buffer is discarded
    (never pooled again)."""

    def __init__(self, staged: Staged):
        self.staged = staged

    def dropped(self, reason: str) -> None:
        self.staged.discard()


class TorchAsyncCheckpoint:
    """Saves state dicts with ``torch.save``, synchronously or in the background.

    ``async_save`` snapshots the tensors before returning, so training may change them right away;
    the file appears (atomically) when the background call finishes. Call
    :meth:`finalize_async_save` regularly and :meth:`close` at the end. Snapshots are staged into
    one reused shared-memory buffer per save from ``pool`` (default: the process-wide shared
    pool), which a persistent worker receives without a copy; state dicts holding tensors that
    cannot be staged (sparse, quantized) are copied with :func:`preload_tensors` instead. A
    finalized call's buffer goes back to the pool; the buffer of a call that failed or was dropped
    is discarded, never reused (through the request's handle, when the queue drops the call).
    """

    def __init__(self, persistent_queue: bool = True, wait_timeout_s: float | None = None,
                 pool: HostBufferPool | None = None):
        self.queue = AsyncCallsQueue(persistent=persistent_queue, wait_timeout_s=wait_timeout_s)
        self.pool = pool or default_pool(shared=True)
        if not self.pool.shared:
            raise ValueError("pool must be a HostBufferPool(shared=True): its buffers go to worker processes")

    def _request(self, state_dict: Any, path: str, finalize_fns: list) -> AsyncRequest:
        sd = BasicTensorAwareStateDict(state_dict)
        try:
            tensors = sd.pop_tensors()
        except TypeError:  # a tensor that cannot be staged as bytes (or a hidden one: raises again)
            snapshot = preload_tensors(state_dict, non_blocking=True)
            device.synchronize_stream()
            return AsyncRequest(_atomic_torch_save, (snapshot, path), finalize_fns)
        hollow = pickle.dumps(sd, protocol=pickle.HIGHEST_PROTOCOL)
        staged = stage(tensors, self.pool)
        return AsyncRequest(_save_staged, (hollow, staged.buffer, staged.layouts, path),
                            [staged.release, *finalize_fns], handle=_StagingHandle(staged))

    def async_save(self, state_dict: Any, path: str | os.PathLike, finalize_fns: list | None = None) -> int:
        """Start saving ``state_dict`` to ``path`` in the background; returns the call index.
        Local, not collective. Raises TypeError for a leaf hiding a tensor, and what
        :meth:`AsyncCallsQueue.schedule_async_request` raises (a call that could not start is
        reported by the next finalize)."""
        req = self._request(state_dict, os.fspath(path), list(finalize_fns or []))
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
        """Finish pending saves locally (``no_dist=True``) and stop the worker; ``abort`` kills it
        and drops pending saves."""
        self.queue.close(abort=abort, no_dist=True)
