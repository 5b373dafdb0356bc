"""Asynchronous checkpointing after NVIDIA nvidia-resiliency-ext: requests run in background
worker processes (:class:`AsyncCallsQueue`) and are finalized together by all ranks."""

from tasd.managers.async_ckpt.calls_queue import AsyncCallsQueue, abort_async_checkpoints
from tasd.managers.async_ckpt.request import AsyncRequest, preload_tensors, wrap_for_async
from tasd.managers.async_ckpt.torch_checkpoint import TorchAsyncCheckpoint

__all__ = ["AsyncCallsQueue", "AsyncRequest", "TorchAsyncCheckpoint", "abort_async_checkpoints",
           "preload_tensors", "wrap_for_async"]
