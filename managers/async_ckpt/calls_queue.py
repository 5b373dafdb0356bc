"""A queue of asynchronous checkpoint calls that all ranks finalize together (after NVRx's
``AsyncCallsQueue``).

Contract: every rank schedules the same requests in the same order and calls
:meth:`AsyncCallsQueue.maybe_finalize_async_calls` at the same points. Scheduling is local and
keeps the ranks' queues in step even when a call cannot start on some rank: the call still takes
its index there and is recorded as failed, and the next finalize reports it on every rank.

With ``no_dist=False`` finalizing is collective whenever this rank has unfinalized calls: one small
integer all_reduce per call examined (the failure path adds
:func:`tasd.managers.collectives.gather_failures`), all on
:func:`tasd.managers.collectives.agreement_group` of the queue's ``group``: tasd's own tree of gloo
groups, never the training's (NCCL) communicator, so finalizing never waits for the GPU. Those
groups are created at the first finalize that has calls pending (a collective point of every rank). A finalize with no
pending call makes no collective and no device synchronization.

Bounds: a blocking finalize waits for one call at most the queue's wait timeout (``wait_timeout_s``,
by default the job's collective timeout); a call past it fails and its worker is killed. With
``no_dist=False`` it waits in rounds of at most half the agreement groups' timeout, each ended by the
agreement all_reduce, so that a rank whose call finished early waits in a collective only about
that long and a hung writer is reported as a failure of that rank on every rank, not as a
collective timeout. Each collective is bounded by the agreement groups' timeout (the job's collective
timeout). Workers exit by themselves when the training process dies, even in a stuck call.

Handles: a request's optional ``handle`` is told ``scheduled(queue, call_idx)`` and
``dropped(reason)`` (see :mod:`tasd.managers.async_ckpt.request`); when ``dropped`` is called no
worker runs the call any more.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from typing import Any

from tasd.managers import collectives
from tasd.managers.async_ckpt.callers import (DEFAULT_WAIT_TIMEOUT_S, PersistentAsyncCaller, RequestRefused,
                                              TemporalAsyncCaller)
from tasd.managers.async_ckpt.request import AsyncRequest
from tasd.managers.errors import CheckpointingException

logger = logging.getLogger(__name__)

_live_queues: "weakref.WeakSet[AsyncCallsQueue]" = weakref.WeakSet()


def _notify(req: AsyncRequest, method: str, *args: Any) -> None:
    """Call ``req.handle.<method>(*args)`` if the handle has it; log what it raises."""
    fn = getattr(req.handle, method, None) if req.handle is not None else None
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        logger.exception("handle %r of async call %d raised in %s()", req.handle, req.call_idx, method)


class _FailedStart:
    """Stands in the queue for a call that could not be started on this rank: done, failed."""

    persistent = False

    def __init__(self, reason: str):
        self.reason = reason

    def poll(self, call_idx: int) -> tuple[bool, str | None]:
        return True, self.reason

    def wait(self, call_idx: int, timeout: float | None = None) -> tuple[bool, str | None]:
        return True, self.reason

    def kill(self, reason: str) -> None:
        """Nothing runs."""

    def retire(self, call_idx: int) -> None:
        """Nothing to forget."""


class AsyncCallsQueue:
    """Schedules :class:`AsyncRequest` objects in background workers and finalizes them in order.

    ``persistent=True``: one long-lived worker process (spawned, without importing ``__main__``)
    runs the calls in order; requests must pickle and their functions be importable.
    ``persistent=False``: each call runs in a process forked for it. ``wait_timeout_s`` (seconds,
    > 0) bounds each blocking wait for one call; None: the job's collective timeout
    (:func:`tasd.managers.collectives.group_timeout` of ``group``, read at each wait), else
    :data:`DEFAULT_WAIT_TIMEOUT_S`. ``group``: the ranks that finalize together (default: the
    world); the agreement runs on its :func:`~tasd.managers.collectives.agreement_group`.
    """

    def __init__(self, persistent: bool = True, wait_timeout_s: float | None = None, group: Any = None):
        if wait_timeout_s is not None and not wait_timeout_s > 0:
            raise ValueError(f"AsyncCallsQueue wait_timeout_s must be > 0 seconds or None, got {wait_timeout_s!r}")
        self.persistent = persistent
        self.wait_timeout_s = wait_timeout_s
        self.group = group
        self._next_idx = 0
        self._calls: deque[tuple[int, Any, AsyncRequest]] = deque()  # (call_idx, caller, request)
        self._persistent_caller: PersistentAsyncCaller | None = None
        _live_queues.add(self)

    def wait_timeout(self) -> float:
        """The bound, in seconds, of a blocking wait for one call (see the class docstring). Local."""
        if self.wait_timeout_s is not None:
            return float(self.wait_timeout_s)
        timeout = collectives.group_timeout(self.group)
        return timeout.total_seconds() if timeout is not None else DEFAULT_WAIT_TIMEOUT_S

    # -- scheduling -------------------------------------------------------------------------------

    def _caller(self) -> Any:
        if not self.persistent:
            return TemporalAsyncCaller(exit_wait_s=self.wait_timeout())
        if self._persistent_caller is None:
            self._persistent_caller = PersistentAsyncCaller()
        return self._persistent_caller

    def schedule_async_request(self, async_request: AsyncRequest) -> int:
        """Freeze ``async_request``, give it the next call index and start it in the background
        (its preload_fn runs here first). Local, not collective. Returns the call index.

        The call is recorded in the queue whatever happens, so the ranks' queues stay in step; the
        request's handle is told ``scheduled(queue, call_idx)``. When starting fails on this rank
        (fork or spawn failure, a worker that does not start, preload_fn raising), the call is
        recorded as failed with the error text and no exception is raised here: the next finalize
        raises CheckpointingException on every rank, naming this rank and the reason (raising here
        would make this rank alone leave the training loop). API misuse still raises here, after
        recording the failed call: RequestRefused (a CheckpointingException) when a persistent
        queue's request cannot be pickled or a preload_fn has no argument 1 to replace.
        KeyboardInterrupt and other BaseExceptions propagate, also after recording."""
        idx = self._next_idx
        self._next_idx += 1
        req = async_request.freeze()._replace(call_idx=idx)
        error: BaseException | None = None
        try:
            caller = self._caller()
            caller.schedule(req)
        except BaseException as e:
            error = e
            rank = collectives.rank_and_size(self.group)[0]
            caller = _FailedStart(f"async call {idx} could not be started on rank {rank}: {type(e).__name__}: {e}")
        self._calls.append((idx, caller, req))
        _notify(req, "scheduled", self, idx)
        if error is not None:
            if isinstance(error, RequestRefused) or not isinstance(error, Exception):
                raise error
            logger.error("%s (recorded as a failed call; the next finalize reports it on every rank)",
                         caller.reason, exc_info=error)
        else:
            logger.debug("scheduled async call %d (%s)", idx, "persistent" if self.persistent else "temporal")
        return idx

    def get_num_unfinalized_calls(self) -> int:
        """Calls scheduled and not yet finalized (nor dropped after a failure)."""
        return len(self._calls)

    # -- finalizing -------------------------------------------------------------------------------

    def _state(self, caller: Any, idx: int, wait_s: float, deadline: float | None) -> tuple[bool, str | None]:
        """(done, error) of call ``idx`` after waiting up to ``wait_s`` seconds (0: a poll); an
        unfinished call past ``deadline`` (monotonic time) has its worker killed and fails."""
        done, err = caller.wait(idx, wait_s) if wait_s > 0 else caller.poll(idx)
        if not done and deadline is not None and time.monotonic() >= deadline:
            caller.kill(f"async call {idx} did not finish within {self.wait_timeout():g}s (the queue's wait "
                        "timeout); its worker was killed")
            done, err = caller.poll(idx)
        return done, err

    def _drop(self, message: str, cause: BaseException | None = None) -> None:
        """Drop the oldest call (no worker runs it on return), tell its handle, raise ``message``."""
        idx, caller, req = self._calls.popleft()
        try:
            caller.retire(idx)
        finally:
            _notify(req, "dropped", message)
        raise CheckpointingException(message) from cause

    def finalize_through(self, call_idx: int, no_dist: bool = False) -> list[int]:
        """Finalize every call up to and including ``call_idx``, waiting for them (collective
        unless ``no_dist``; raises like :meth:`maybe_finalize_async_calls`). Returns the
        finalized indices."""
        return self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist, _through=call_idx)

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False,
                                   _through: int | None = None) -> list[int]:
        """Finalize finished calls, oldest first, running each call's finalize functions; stop at
        the first call not finished (on any rank, unless ``no_dist``). ``blocking`` waits for every
        scheduled call, each at most :meth:`wait_timeout` (a call past it fails and its worker is
        killed). Returns the finalized call indices. Called on the training thread.

        ``no_dist=False``: collective over the queue's agreement group whenever calls are pending (see
        the module docstring): ranks agree with one all_reduce per call examined (per round of a
        blocking wait) whether it is done everywhere, failed anywhere, and has the same index
        everywhere. A failed call (exception in async_fn, dead or killed worker, wait timeout,
        failed start) raises CheckpointingException on every rank, with the failing ranks' error
        texts; the call is dropped (its finalize functions never run; where it still runs, its
        worker is killed, for a persistent worker failing the calls queued behind it; then its
        handle is told ``dropped``) and later calls stay queued. Mismatched call indices raise
        CheckpointingException on every rank (nothing is dropped). A peer that cannot be reached
        (dead, or past the group's timeout) raises CheckpointingException on the ranks that
        remain, and the call is dropped there the same way.
        ``no_dist=True``: local; only this rank's failure raises. Exceptions from finalize
        functions propagate on the rank that raised them."""
        finalized: list[int] = []
        group: Any = None
        have_group = False
        round_s = 0.0
        while self._calls and (_through is None or self._calls[0][0] <= _through):
            idx, caller, req = self._calls[0]
            deadline = time.monotonic() + self.wait_timeout() if blocking else None
            while True:  # no_dist, or not blocking: one pass; blocking and collective: rounds
                if not no_dist and not have_group:
                    try:
                        group, have_group = collectives.agreement_group(self.group), True
                    except Exception as e:
                        self._unreachable(idx, e)
                    timeout = collectives.group_timeout(group)
                    round_s = (timeout.total_seconds() if timeout is not None else DEFAULT_WAIT_TIMEOUT_S) / 2
                wait_s = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if not no_dist:
                    wait_s = min(wait_s, round_s)
                done, err = self._state(caller, idx, wait_s, deadline)
                failed = done and err is not None
                if no_dist:
                    if failed:
                        self._drop(f"async checkpoint call {idx} failed:\n{err}")
                    if not done:
                        return finalized
                    break
                try:
                    not_done_any, failed_any, max_idx, neg_min_idx = collectives.all_reduce_max(
                        [0 if done else 1, 1 if failed else 0, idx, -idx], group)
                    failures = (collectives.gather_failures(CheckpointingException(err) if failed else None,
                                                            group) if failed_any else collectives.Failures())
                except Exception as e:
                    self._unreachable(idx, e)
                if failed_any:
                    self._drop(f"async checkpoint call {idx} failed on {failures.describe()}")
                if max_idx != -neg_min_idx:
                    raise CheckpointingException(
                        f"ranks disagree on the oldest async call (indices {-neg_min_idx}..{max_idx}): "
                        "every rank must schedule the same requests and finalize together")
                if not not_done_any:
                    break
                if deadline is None:
                    return finalized
            self._calls.popleft()
            caller.retire(idx)
            for fn in req.finalize_fns:
                fn()
            finalized.append(idx)
            logger.debug("finalized async call %d", idx)
        return finalized

    def _unreachable(self, idx: int, error: BaseException) -> None:
        """A peer died or timed out: call ``idx`` can never be finalized; drop it and raise."""
        rank = collectives.rank_and_size(self.group)[0]
        self._drop(f"async checkpoint call {idx}: rank {rank} could not reach the other ranks to finalize it "
                   f"(a peer died or timed out): {error}", cause=error)

    # -- shutdown ---------------------------------------------------------------------------------

    def close(self, abort: bool = False, no_dist: bool = False) -> None:
        """Normal: finalize every pending call (``maybe_finalize_async_calls(blocking=True,
        no_dist)``: collective unless ``no_dist``, raises like it), then stop the persistent
        worker (it gets :meth:`wait_timeout` to exit, then is killed). ``abort``: local; no
        finalizing. Calls still pending afterwards (``abort``, or finalizing raised) are dropped:
        their workers are killed (SIGKILL, bounded join), then their handles are told
        ``dropped``. The queue can be used again afterwards (workers restart on demand)."""
        try:
            if not abort:
                self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist)
        finally:
            pending = list(self._calls)
            self._calls.clear()
            event = "the queue was aborted" if abort else "the queue was closed"
            for idx, caller, _ in pending:
                caller.kill(f"async call {idx} was pending when {event}")
            if self._persistent_caller is not None:
                self._persistent_caller.close(abort=abort or bool(pending), timeout=self.wait_timeout())
                self._persistent_caller = None
            if pending:
                logger.warning("dropping %d unfinalized async call(s): %s", len(pending), event)
            for idx, caller, req in pending:
                caller.retire(idx)
                _notify(req, "dropped", f"async call {idx} was pending when {event}")

    def abort(self) -> None:
        """``close(abort=True)``: local, never raises for pending calls."""
        self.close(abort=True)


def abort_async_checkpoints() -> int:
    """Abort every live :class:`AsyncCallsQueue` of this process (kill its workers, drop its
    pending calls unfinalized, telling their handles), e.g. before restarting training in the same
    process after a failure. Local, not collective. Returns the number of queues aborted; new
    queues work."""
    queues = list(_live_queues)
    for q in queues:
        try:
            q.close(abort=True)
        except Exception:  # keep aborting the others
            logger.exception("aborting an async calls queue failed")
    if queues:
        logger.info("aborted %d async checkpoint queue(s)", len(queues))
    return len(queues)
