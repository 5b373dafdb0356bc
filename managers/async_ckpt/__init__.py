"""Asynchronous checkpointing after NVIDIA nvidia-resiliency-ext: requests run in background
worker processes (:class:`AsyncCallsQueue`) and are finalized together by all ranks; a request's
optional ``handle`` learns what became of its call (see :mod:`.request`)."""

from tasd.managers.async_ckpt.callers import RequestRefused
from tasd.managers.async_ckpt.calls_queue import AsyncCallsQueue, abort_async_checkpoints
from tasd.managers.async_ckpt.request import AsyncRequest, preload_tensors, wrap_for_async
from tasd.managers.async_ckpt.torch_checkpoint import TorchAsyncCheckpoint

__all__ = ["AsyncCallsQueue", "AsyncRequest", "RequestRefused", "TorchAsyncCheckpoint",
           "abort_async_checkpoints", "preload_tensors", "wrap_for_async"]
