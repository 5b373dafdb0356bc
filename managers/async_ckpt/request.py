"""What one asynchronous checkpoint call does: :class:`AsyncRequest` (after NVIDIA
nvidia-resiliency-ext's ``AsyncRequest``), plus helpers to build its parts.

A request is ``async_fn(*async_fn_args, **async_fn_kwargs)`` run in the background (a worker
process) and ``finalize_fns`` run afterwards in the scheduling process, once every rank's
``async_fn`` has finished (see :class:`tasd.managers.async_ckpt.AsyncCallsQueue`).

``preload_fn`` convention (same for both callers and :meth:`AsyncRequest.execute_sync`): when set,
it is called in the *scheduling* process when the request is started (before forking or pickling),
and its return value replaces ``async_fn_args[1]`` (NVRx's convention: argument 1 is the state to
write). A request with a ``preload_fn`` therefore needs at least two positional arguments.

Handles: the optional last field ``handle`` lets whoever made a request learn what became of its
call. Three optional methods are called on it, on the scheduling (training) thread, locally (never
collective); an exception raised by any of them is logged and does not stop the caller's own
bookkeeping:

- ``handle.frozen()``: by :meth:`AsyncRequest.freeze`, which every queue calls on the requests it
  schedules (tasd's, megatron-core's, NVRx's): some queue is taking the request. It is the only
  thing a queue that does not know handles (megatron-core's) tells.

:class:`tasd.managers.async_ckpt.AsyncCallsQueue` also calls:

- ``handle.scheduled(queue, call_idx)``: once the call has its index and is recorded in ``queue``
  (also when its start failed: the call is then recorded as failed and is reported at the next
  finalize).
- ``handle.dropped(reason: str)``: the call will never be finalized: it failed on some rank
  (called on every rank after the ranks agreed, before the CheckpointingException is raised), its
  peers could not be reached, or the queue was closed or aborted with it pending. When it is
  called, no worker still runs the call (it finished, or its worker was killed), so buffers the
  call reads may be reused or freed.

A successful call is never told ``dropped``: its ``finalize_fns`` run. The
handle never leaves the process: pickling a request drops it (None in the copy), and the persistent
worker never receives it. Queues that do not know handles (megatron-core's own ``AsyncCallsQueue``)
ignore the field, except that freezing the request tells ``frozen()``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable, NamedTuple

import torch

from tasd import device
from tasd.managers import collectives
from tasd.managers.errors import CheckpointingException
from tasd.tree import map_tensors

logger = logging.getLogger(__name__)


class _AsyncRequestFields(NamedTuple):
    async_fn: Callable | None
    async_fn_args: tuple
    finalize_fns: list
    async_fn_kwargs: dict | None = None
    preload_fn: Callable | None = None
    is_frozen: bool = False
    call_idx: int = 0
    handle: Any = None


class AsyncRequest(_AsyncRequestFields):
    """One asynchronous call: ``async_fn`` (None: nothing to run in the background) with
    ``async_fn_args``/``async_fn_kwargs`` (``None`` gives a fresh empty dict per request), then
    ``finalize_fns`` (called without arguments, in order, in the scheduling process), an optional
    ``preload_fn`` (see the module docstring), ``is_frozen``, the ``call_idx`` the queue assigned
    and an optional ``handle`` (see the module docstring; kept by :meth:`freeze` and ``_replace``,
    dropped by pickling). Field order and defaults are NVRx's, ``handle`` added last.

    Requests given to a persistent queue must be picklable (module-level functions, no process
    groups, no lambdas); temporal (forked) queues accept anything.
    """

    __slots__ = ()

    def __new__(cls, async_fn: Callable | None, async_fn_args: tuple, finalize_fns: list,
                async_fn_kwargs: dict | None = None, preload_fn: Callable | None = None,
                is_frozen: bool = False, call_idx: int = 0, handle: Any = None) -> "AsyncRequest":
        return super().__new__(cls, async_fn, tuple(async_fn_args), list(finalize_fns),
                               {} if async_fn_kwargs is None else async_fn_kwargs, preload_fn,
                               is_frozen, call_idx, handle)

    def __reduce__(self) -> tuple:
        """Pickling (any protocol) and deepcopy keep every field but the handle, which is local to
        this process."""
        return type(self), tuple(self)[:-1] + (None,)

    def __copy__(self) -> "AsyncRequest":
        return self._replace()

    def add_finalize_fn(self, fn: Callable[[], Any]) -> None:
        """Append ``fn`` to the finalize functions (in place). Raises CheckpointingException when
        the request is frozen (already scheduled)."""
        if self.is_frozen:
            raise CheckpointingException("cannot add a finalize function to a frozen (scheduled) AsyncRequest")
        self.finalize_fns.append(fn)

    def freeze(self) -> "AsyncRequest":
        """A frozen copy (its own finalize list); the queue freezes every request it schedules.
        Tells the handle ``frozen()`` (see the module docstring)."""
        notify_frozen(self.handle)
        return self._replace(is_frozen=True, finalize_fns=list(self.finalize_fns))

    def check_args(self) -> None:
        """Raise CheckpointingException when there is a preload_fn but fewer than two positional
        arguments (nothing for its result to replace). Local."""
        if self.preload_fn is not None and len(self.async_fn_args) < 2:
            raise CheckpointingException(
                "AsyncRequest.preload_fn replaces async_fn_args[1]; the request has "
                f"{len(self.async_fn_args)} positional argument(s)")

    def resolved_args(self) -> tuple:
        """``async_fn_args`` with ``preload_fn()``'s result in position 1 when a preload_fn is set
        (calls preload_fn: local, not collective). Raises like :meth:`check_args`, before calling
        the preload_fn."""
        self.check_args()
        args = list(self.async_fn_args)
        if self.preload_fn is not None:
            args[1] = self.preload_fn()
        return tuple(args)

    def execute_sync(self) -> None:
        """Run the request synchronously in this process: preload_fn (if any), async_fn, a barrier
        when torch.distributed is initialized (collective then: every rank must call it; on
        :func:`tasd.managers.collectives.agreement_group`, never the training's communicator), then the
        finalize functions in order. The handle is not told anything. Exceptions propagate as
        they come."""
        args = self.resolved_args()
        if self.async_fn is not None:
            self.async_fn(*args, **self.async_fn_kwargs)
        if collectives.is_distributed():
            collectives.all_reduce_max([0], collectives.agreement_group())  # a barrier
        for fn in self.finalize_fns:
            fn()


def notify_frozen(handle: Any) -> None:
    """Call ``handle.frozen()`` when the handle has it; log what it raises (local)."""
    fn = getattr(handle, "frozen", None) if handle is not None else None
    if fn is None:
        return
    try:
        fn()
    except Exception:
        logger.exception("handle %r of an async request raised in frozen()", handle)


class _GCDisabledCall:
    """Picklable wrapper running ``fn`` with the garbage collector disabled."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self.fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    def __repr__(self) -> str:
        return f"wrap_for_async({self.fn!r})"


def wrap_for_async(fn: Callable) -> Callable:
    """``fn`` wrapped to run with garbage collection disabled (as NVRx does for async writers).
    The wrapper pickles whenever ``fn`` does (a module-level class)."""
    return _GCDisabledCall(fn)


def _host_copy(t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:
        return t.to("cpu", copy=True)
    if t.device.type == "cpu":
        return t.clone()
    out = device.host_like(t)
    out.copy_(t, non_blocking=non_blocking)
    return out


def preload_tensors(state_dict: Any, non_blocking: bool = True) -> Any:
    """A copy of the nested dict/list/tuple ``state_dict`` in which every tensor is copied to host
    memory (pinned with CUDA); CPU tensors are copied too, so the result is a point-in-time
    snapshot that later in-place updates do not change. Non-tensor leaves are kept (not copied).
    Copies are detached (``requires_grad`` and Parameter types are dropped).

    With ``non_blocking`` device-to-host copies may still be in flight on return: call
    :func:`tasd.device.synchronize_stream` before reading them (the callers do before forking/pickling).
    Local (not collective). Raises TypeError when a leaf object hides a tensor
    (:func:`tasd.tree.map_tensors`)."""
    return map_tensors(state_dict, lambda _path, t: _host_copy(t, non_blocking))
