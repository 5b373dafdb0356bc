"""A queue of asynchronous checkpoint calls that all ranks finalize together (after NVRx's
``AsyncCallsQueue``).

Contract: every rank schedules the same requests in the same order and calls
:meth:`AsyncCallsQueue.maybe_finalize_async_calls` at the same points. With ``no_dist=False``
finalizing is collective (one small integer all_reduce per call examined; the failure path adds
:func:`tasd.managers.collectives.gather_failures`) whenever this rank has unfinalized calls, so the
ranks' queues must hold the same calls.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

from tasd.managers import collectives
from tasd.managers.async_ckpt.callers import PersistentAsyncCaller, TemporalAsyncCaller
from tasd.managers.async_ckpt.request import AsyncRequest
from tasd.managers.errors import CheckpointingException

logger = logging.getLogger(__name__)

_live_queues: "weakref.WeakSet[AsyncCallsQueue]" = weakref.WeakSet()


class AsyncCallsQueue:
    """Schedules :class:`AsyncRequest` objects in background workers and finalizes them in order.

    ``persistent=True``: one long-lived worker process (spawned) runs the calls in order; requests
    must pickle. ``persistent=False``: each call runs in a process forked for it. ``wait_timeout_s``
    bounds each blocking wait for one call (None: unbounded); a call past it counts as failed.
    """

    def __init__(self, persistent: bool = True, wait_timeout_s: float | None = None, group: Any = None):
        self.persistent = persistent
        self.wait_timeout_s = wait_timeout_s
        self.group = group
        self._next_idx = 0
        self._calls: deque[tuple[int, Any, AsyncRequest]] = deque()  # (call_idx, caller, request)
        self._persistent_caller: PersistentAsyncCaller | None = None
        _live_queues.add(self)

    # -- scheduling -------------------------------------------------------------------------------

    def schedule_async_request(self, async_request: AsyncRequest) -> int:
        """Freeze ``async_request``, give it the next call index and start it in the background
        (runs its preload_fn here first). Local, not collective. Returns the call index. Raises
        CheckpointingException when a persistent queue's request cannot be pickled (nothing is
        scheduled then)."""
        idx = self._next_idx
        req = async_request.freeze()._replace(call_idx=idx)
        if self.persistent:
            if self._persistent_caller is None:
                self._persistent_caller = PersistentAsyncCaller()
            caller: Any = self._persistent_caller
        else:
            caller = TemporalAsyncCaller()
        caller.schedule(req)
        self._next_idx += 1
        self._calls.append((idx, caller, req))
        logger.debug("scheduled async call %d (%s)", idx, "persistent" if self.persistent else "temporal")
        return idx

    def get_num_unfinalized_calls(self) -> int:
        """Calls scheduled and not yet finalized (or dropped after a failure)."""
        return len(self._calls)

    # -- finalizing -------------------------------------------------------------------------------

    def _poll(self, caller: Any, idx: int, blocking: bool) -> tuple[bool, str | None]:
        if blocking:
            done, err = caller.wait(idx, self.wait_timeout_s)
            if not done:
                return True, f"async call {idx} did not finish within {self.wait_timeout_s}s"
            return done, err
        return caller.poll(idx)

    def _drop(self, caller: Any, idx: int) -> None:
        self._calls.popleft()
        caller.retire(idx)

    def holds(self, finalize_fn: Any) -> int | None:
        """Index of the unfinalized call whose finalize functions include ``finalize_fn`` (by
        identity), or None. Local."""
        for idx, _, req in self._calls:
            if any(fn is finalize_fn for fn in req.finalize_fns):
                return idx
        return None

    def finalize_through(self, call_idx: int, no_dist: bool = False) -> list[int]:
        """Finalize every call up to and including ``call_idx``, waiting for them (collective
        unless ``no_dist``; raises like :meth:`maybe_finalize_async_calls`). Returns the
        finalized indices."""
        return self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist, _through=call_idx)

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False,
                                   _through: int | None = None) -> list[int]:
        """Finalize finished calls, oldest first, running each call's finalize functions; stop at
        the first call not finished (on any rank, unless ``no_dist``). ``blocking`` waits for every
        scheduled call. Returns the finalized call indices.

        ``no_dist=False``: collective over the queue's group whenever calls are pending (see the
        module docstring): ranks agree with one all_reduce per call whether it is done everywhere,
        failed anywhere, and has the same index everywhere. A failed call (exception in async_fn,
        dead worker, wait timeout) raises CheckpointingException on every rank, with the failing
        ranks' error texts; the call is dropped (its finalize functions never run) and later calls
        stay queued. Mismatched call indices raise CheckpointingException on every rank. A peer
        that cannot be reached (dead, or past the group's timeout) raises CheckpointingException on
        the ranks that remain, and the call is dropped.
        ``no_dist=True``: local; only this rank's failure raises. Exceptions from finalize
        functions propagate on the rank that raised them."""
        finalized: list[int] = []
        while self._calls and (_through is None or self._calls[0][0] <= _through):
            idx, caller, req = self._calls[0]
            done, err = self._poll(caller, idx, blocking)
            failed = done and err is not None
            if no_dist:
                if failed:
                    self._drop(caller, idx)
                    raise CheckpointingException(f"async checkpoint call {idx} failed:\n{err}")
                if not done:
                    break
            else:
                try:
                    not_done_any, failed_any, max_idx, neg_min_idx = collectives.all_reduce_max(
                        [0 if done else 1, 1 if failed else 0, idx, -idx], self.group)
                    failures = (collectives.gather_failures(CheckpointingException(err) if failed else None,
                                                            self.group) if failed_any else {})
                except Exception as e:  # a peer died or timed out: this call can never be finalized
                    self._drop(caller, idx)
                    rank = collectives.rank_and_size(self.group)[0]
                    raise CheckpointingException(
                        f"async checkpoint call {idx}: rank {rank} could not reach the other ranks to "
                        f"finalize it (a peer died or timed out): {e}") from e
                if failed_any:
                    self._drop(caller, idx)
                    text = "\n".join(f"--- rank {r} ---\n{m}" for r, m in sorted(failures.items()))
                    raise CheckpointingException(
                        f"async checkpoint call {idx} failed on rank(s) {sorted(failures)}:\n{text}")
                if max_idx != -neg_min_idx:
                    raise CheckpointingException(
                        f"ranks disagree on the oldest async call (indices {-neg_min_idx}..{max_idx}): "
                        "every rank must schedule the same requests and finalize together")
                if not_done_any:
                    break
            self._calls.popleft()
            caller.retire(idx)
            for fn in req.finalize_fns:
                fn()
            finalized.append(idx)
            logger.debug("finalized async call %d", idx)
        return finalized

    # -- shutdown ---------------------------------------------------------------------------------

    def close(self, abort: bool = False, no_dist: bool = False) -> None:
        """Normal: finalize every pending call (``maybe_finalize_async_calls(blocking=True,
        no_dist)``: collective unless ``no_dist``, raises like it), then stop the workers.
        ``abort``: local; kill the workers and drop pending calls without finalizing them.
        The queue can be used again afterwards (workers restart on demand)."""
        try:
            if not abort:
                self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist)
        finally:
            if abort or self._calls:
                for idx, caller, _ in self._calls:
                    if not caller.persistent:
                        caller.close(abort=True)
                if self._calls:
                    logger.warning("dropping %d unfinalized async call(s)", len(self._calls))
                self._calls.clear()
            if self._persistent_caller is not None:
                self._persistent_caller.close(abort=abort, timeout=self.wait_timeout_s)
                self._persistent_caller = None

    def abort(self) -> None:
        """``close(abort=True)``: local, never raises for pending calls."""
        self.close(abort=True)


def queue_holding(finalize_fn: Any) -> tuple[AsyncCallsQueue, int] | None:
    """The live queue (and call index) whose unfinalized call has ``finalize_fn`` among its
    finalize functions, or None (never scheduled, already finalized, or dropped). Local."""
    for q in list(_live_queues):
        idx = q.holds(finalize_fn)
        if idx is not None:
            return q, idx
    return None


def abort_async_checkpoints() -> int:
    """Abort every live :class:`AsyncCallsQueue` of this process (kill its workers, drop its
    pending calls unfinalized), e.g. before restarting training in the same process after a
    failure. Local, not collective. Returns the number of queues aborted; new queues work."""
    queues = list(_live_queues)
    for q in queues:
        try:
            q.close(abort=True)
        except Exception:  # keep aborting the others
            logger.exception("aborting an async calls queue failed")
    if queues:
        logger.info("aborted %d async checkpoint queue(s)", len(queues))
    return len(queues)
