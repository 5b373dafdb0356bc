"""One save of one iteration by this rank, from staging to publication (:class:`SaveJob`), and
what it cost (:class:`SaveStats`).

The save protocol, in order (every step that can fail on one rank is followed by an agreement, so
a failure anywhere becomes an error on every rank and removes the iteration's files everywhere):

1. **begin** (``BaseCheckpointManager.save``, training thread): check the arguments, queue the
   copies of the tensors into a host buffer, pickle the hollow state, prepare storage; agree (one
   all_reduce: every rank staged, same iteration, and the save id: the maximum of every rank's
   random draw) while the device-to-host copies run; wait for them (their CUDA error, if any, is
   this rank's failure, reported in step 4's agreement).
2. **replicate** (with a strategy; inline for a synchronous save, in the manager's background
   thread for an asynchronous one): encode the part, exchange parts with the peers on the
   strategy's exchange groups (pairwise with each peer: a failure on one rank calls off only its
   transfers, and its peers record an ExchangeAborted), store the received parts unpublished
   (``.pending``). A failure here is reported in step 4's agreement.
3. **store** this rank's own part unpublished: inline, or the AsyncRequest's ``async_fn`` in a
   worker process.
4. **finalize** (collective, training thread): wait for 2, check 3 happened, agree everyone stored;
   publish (newer or same-iteration parts left by an abandoned run are removed first, then every
   stored part is renamed, and the directory fsync'd); agree everyone published; then older
   iterations are removed in the background.
   Or **drop** (local): the save failed on some rank (agreed), or its async call failed or was
   never scheduled: wait for 2, free the staging buffer, remove the iteration's files.

An asynchronous save's AsyncRequest carries its job as ``handle``: the AsyncCallsQueue tells the
job where its call is (``scheduled``) and when it will never be finalized (``dropped``), so a
failed call is cleaned up on every rank as soon as the queue agrees it failed. A queue tasd does
not hold (megatron-core's, where Megatron-LM schedules its requests) tells only that it took the
request (``frozen``, from the request's ``freeze``); the request's writer then reports to the job's
:class:`~tasd.managers.async_ckpt.status.CallStatus` from the worker, so the manager can wait for
it without that queue (:meth:`SaveJob.wait_for_writer`) and finalize the save itself when it needs
to (a later call of the same finalize by that queue does nothing, or raises when the save was not
published).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tasd.managers import collectives
from tasd.managers.async_ckpt import AsyncRequest
from tasd.managers.async_ckpt.callers import DEFAULT_WAIT_TIMEOUT_S
from tasd.managers.async_ckpt.status import CallStatus, TrackedCall
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError, PeerUnreachableError
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts
from tasd.managers.fileformat import PartMeta, RawPart, encode_prefix
from tasd.staging import Staged

if TYPE_CHECKING:
    from tasd.managers.base_manager import BaseCheckpointManager

logger = logging.getLogger(__name__)


@dataclass
class SaveStats:
    """What a save cost on this rank (seconds, bytes). ``stall_s``: time ``save`` kept the
    caller (for a synchronous save, all of it); ``total_s``: from ``save`` to publication."""

    iteration: int = -1
    stall_s: float = 0.0
    stage_s: float = 0.0
    encode_s: float = 0.0  # header and checksums of the own part, with replication
    exchange_s: float = 0.0
    write_s: float = 0.0
    finalize_s: float = 0.0
    total_s: float = 0.0
    tensor_bytes: int = 0
    file_bytes: int = 0
    is_async: bool = False
    extra: dict = field(default_factory=dict)


class SaveJob:
    """A save of ``meta.iteration`` by this rank (see the module docstring for the protocol).

    ``owners``: owner ranks of the parts this rank stores (its own, then those it holds for peers).
    ``error``: the first local failure of steps 2-3. ``replication``: the background exchange (a
    Future; None when synchronous or without replication). ``queue``/``call_idx``: where the async
    call runs, once scheduled on a tasd AsyncCallsQueue. ``taken``: some queue froze the request
    (tasd's or another). ``status``: the writer's reports (async saves, once :meth:`request` was
    called). ``done``: finalized or dropped; ``failure``: why, when it was not published.
    """

    def __init__(self, manager: "BaseCheckpointManager", meta: PartMeta, hollow: bytes, staged: Staged,
                 owners: list[int], stats: SaveStats, started: float, is_async: bool):
        self.manager = manager
        self.meta = meta
        self.hollow = hollow
        self.staged = staged
        self.owners = owners
        self.stats = stats
        self.started = started
        self.is_async = is_async
        self.stored_metas: list[PartMeta] = [meta]  # own part, then received ones
        self.prefix: bytes | None = None
        self.error: BaseException | None = None
        self.replication: Future | None = None
        self.queue: Any = None
        self.call_idx: int | None = None
        self.taken = False
        self.status: CallStatus | None = None
        self.done = False
        self.failure: str | None = None
        self._writer_may_run = False  # a worker this process does not control may still read the buffer
        self.own_call: tuple[Callable[..., int], tuple] = manager._own_part_call(meta, hollow, staged)

    @property
    def iteration(self) -> int:
        return self.meta.iteration

    def __repr__(self) -> str:
        return f"SaveJob(iteration={self.iteration}, rank={self.meta.owner_rank}, done={self.done})"

    # -- 2. replicate ------------------------------------------------------------------------------
    def replicate(self) -> None:
        """Encode this rank's part, exchange parts with its peers (pairwise on the strategy's
        exchange groups: every rank with peers runs it, also after a local failure, so that its
        peers learn of the failure instead of waiting for its part) and store the received ones,
        unpublished. Records a failure in ``error`` instead of raising: this rank's own, or
        ExchangeAborted when a peer failed (that peer records its own). May run in the background
        thread, which must touch no CUDA state and no group but the strategy's exchange groups
        (created beforehand, on the training thread)."""
        m = self.manager
        t = time.perf_counter()
        failure = self.error  # the staging copies failed (step 1): nothing worth sending
        try:
            if failure is None:
                self.prefix = encode_prefix(self.meta, self.hollow, self.staged.layouts, self.staged.buffer)
        except Exception as e:
            failure = e
        self.stats.encode_s = time.perf_counter() - t
        t = time.perf_counter()
        received: list[RawPart] = []
        try:
            strategy, rank, world = m.repl_strategy, m.rank, m.world_size
            plan = ([Transfer(rank, rank, h) for h in strategy.holders(rank, world)]
                    + [Transfer(o, o, rank) for o in strategy.held_owners(rank, world)])
            outgoing = {} if failure is not None else {rank: OutgoingPart(self.prefix, self.staged.buffer)}
            got = exchange_parts(plan, outgoing, strategy.exchange_groups, pool=m.receive_pool, failure=failure)
            received = [got[o] for o in sorted(got)]
            t1 = time.perf_counter()
            self.stats.exchange_s = t1 - t
            for part in received:
                self._check_received(part)
            for part in received:
                self.stats.file_bytes += m._write_encoded(part.header.meta, part.prefix, part.buffer)
                self.stored_metas.append(part.header.meta)
            self.stats.write_s += time.perf_counter() - t1
        except Exception as e:
            logger.debug("rank %d: replication of iteration %d failed: %s", m.rank, self.iteration, e)
            self.error = e
        finally:
            for part in received:
                m.receive_pool.release(part.buffer)

    def _check_received(self, part: RawPart) -> None:
        got, want = part.header.meta, self.meta
        if (got.iteration, got.world_size, got.session_id, got.save_id) != (
                want.iteration, want.world_size, want.session_id, want.save_id):
            raise CorruptCheckpointError(
                f"rank {want.owner_rank} received a part of rank {got.owner_rank} for iteration {got.iteration}, "
                f"world size {got.world_size}, session {got.session_id!r}, save {got.save_id} where it expected "
                f"iteration {want.iteration}, world size {want.world_size}, session {want.session_id!r}, save "
                f"{want.save_id}")

    # -- 3. store ----------------------------------------------------------------------------------
    def store_own(self) -> None:
        """Store this rank's own part unpublished, inline (synchronous saves). Records a failure
        in ``error``."""
        if self.error is not None:
            return
        t = time.perf_counter()
        try:
            if self.prefix is not None:  # encoded for the exchange: written as sent
                self.manager._write_encoded(self.meta, self.prefix, self.staged.buffer)
            else:
                fn, args = self.own_call
                fn(*args)
        except Exception as e:
            self.error = e
        self.stats.write_s += time.perf_counter() - t

    def request(self) -> AsyncRequest:
        """The AsyncRequest of an asynchronous save: ``async_fn`` stores the own part (module-level,
        plain-data arguments plus the staging buffer) and reports to ``status``
        (:class:`~tasd.managers.async_ckpt.status.TrackedCall`), ``finalize`` publishes,
        ``handle`` is this job."""
        fn, args = self.own_call
        self.status = CallStatus()
        return AsyncRequest(TrackedCall(fn, self.status), args, [self.finalize], handle=self)

    # -- the AsyncRequest handle protocol (local) -------------------------------------------------------
    def frozen(self) -> None:
        """A queue (tasd's or another) is scheduling the request."""
        self.taken = True

    def scheduled(self, queue: Any, call_idx: int) -> None:
        self.queue, self.call_idx = queue, call_idx

    def dropped(self, reason: str) -> None:
        self.drop(f"its async call failed or was dropped: {reason.strip().splitlines()[-1] if reason else ''}")

    # -- 3b. a writer on a queue tasd does not hold ----------------------------------------------------
    def wait_for_writer(self) -> None:
        """Wait until this async save's writer (its request's ``async_fn``) has finished on every
        rank, for a request scheduled on a queue tasd does not hold (megatron-core's), which cannot
        be asked: the writer reports to ``status`` from its worker. Collective over the manager's
        agreement group, on the training thread. Waits at most that group's timeout (the job's
        collective timeout), in rounds of at most half of it, each ended by one all_reduce, so no
        rank waits inside a collective longer than that. A writer that failed, whose process died,
        or that has not finished by then is a failure of this rank, recorded in ``error`` (the
        :meth:`finalize` that follows fails the save on every rank, naming it). Raises
        PeerUnreachableError when a peer cannot be reached, having dropped the job."""
        if self.status is None:
            raise CheckpointingException(f"the save of iteration {self.iteration} has no async request to wait for")
        m = self.manager
        try:
            group = m._groups_ready()
        except Exception as e:
            self.drop(f"rank {m.rank} could not reach the other ranks: {e}", worker_may_run=True)
            raise PeerUnreachableError(f"rank {m.rank}: waiting for the async save of iteration {self.iteration}: "
                                       f"{e}") from e
        timeout = collectives.group_timeout(group)
        bound = timeout.total_seconds() if timeout is not None else DEFAULT_WAIT_TIMEOUT_S
        deadline = time.monotonic() + bound
        t0 = time.perf_counter()
        told = False
        while True:
            finished, err = self.status.outcome()
            if not finished:
                if not told:
                    logger.info("rank %d: waiting for the async save of iteration %d, scheduled on a queue tasd does "
                                "not hold, to finish writing (at most %d unfinalized async saves)", m.rank,
                                self.iteration, m.max_saves_in_flight)
                    told = True
                finished, err = self._poll_writer(min(bound / 2, max(0.0, deadline - time.monotonic())))
            if not finished and time.monotonic() >= deadline:
                err, finished = (f"its async writer did not finish within {bound:g}s (the collective timeout) and "
                                 "may still run: the staging buffer is never reused"), True
                self._writer_may_run = True
            if err is not None and self.error is None:
                self.error = CheckpointingException(f"rank {m.rank}: the async save of iteration {self.iteration} "
                                                    f"failed: {err}")
            try:
                (not_done_any,) = collectives.all_reduce_max([0 if finished else 1], group)
            except Exception as e:
                self.drop(f"rank {m.rank} could not reach the other ranks while waiting for its writer: {e}",
                          worker_may_run=not finished or self._writer_may_run)
                raise PeerUnreachableError(f"rank {m.rank}: waiting for the async save of iteration "
                                           f"{self.iteration}: a peer died or timed out: {e}") from e
            if not not_done_any:
                break
        if told:
            logger.info("rank %d: waited %.3fs for the async save of iteration %d (%s)", m.rank,
                        time.perf_counter() - t0, self.iteration, "failed" if self.error else "written everywhere")

    def _poll_writer(self, wait_s: float) -> tuple[bool, str | None]:
        """``status.outcome()`` after waiting up to ``wait_s`` seconds for the writer to finish."""
        end = time.monotonic() + wait_s
        sleep = 0.005
        while True:
            finished, err = self.status.outcome()
            if finished or time.monotonic() >= end:
                return finished, err
            time.sleep(min(sleep, max(0.0, end - time.monotonic())))
            sleep = min(sleep * 2, 0.1)

    # -- 4. finalize or drop --------------------------------------------------------------------------
    def _local_outcome(self) -> BaseException | None:
        """Wait for the background exchange; the first local failure of steps 2-3, if any."""
        if self.replication is not None:
            self.replication.result()  # records its failure in self.error
        error = self.error
        if error is None and self.status is not None:
            finished, text = self.status.outcome()  # the writer's own report, wherever it ran
            if finished and text is not None:
                error = CheckpointingException(f"rank {self.meta.owner_rank}: the async writer of iteration "
                                               f"{self.iteration} failed: {text}")
        if error is None:
            size = self.manager._stored_size(self.meta)
            if size is None:
                error = CheckpointingException(f"rank {self.meta.owner_rank}: its part of iteration "
                                               f"{self.iteration} was not stored (the async writer did not finish)")
            self.stats.file_bytes += size or 0  # the own part (replicas were counted as written)
        return error

    def finalize(self) -> None:
        """Step 4 (collective over the manager's group): publish once every rank stored its parts,
        or remove this rank's files of the iteration and raise on every rank. Called again once the
        job is over (a queue tasd does not hold finalizing a save the manager already finalized or
        dropped): does nothing when it was published, raises CheckpointingException (local; every
        rank has the same outcome) when it was not, so that its loss is never reported as a save."""
        if self.done:
            if self.failure is not None:
                raise CheckpointingException(f"rank {self.manager.rank}: the async save of iteration {self.iteration} "
                                             f"was not published: {self.failure}")
            return
        m = self.manager
        t = time.perf_counter()
        try:
            error = self._local_outcome()
        finally:
            self._let_go()
        if error is not None:
            logger.debug("rank %d: save of iteration %d failed locally: %s", m.rank, self.iteration, error)
        what = f"save of iteration {self.iteration}"
        try:
            m._agree_or_raise(error, self.iteration, what)
            try:
                m._publish(self.iteration, self.stored_metas)
            except Exception as e:
                error = e
            m._agree_or_raise(error, self.iteration, f"{what} (publishing)")
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            self._end()
            m._remove_iteration(self.iteration)
            raise
        self._end()
        m._published(self.iteration)
        stats = self.stats
        stats.finalize_s = time.perf_counter() - t
        stats.total_s = time.perf_counter() - self.started
        if not self.is_async:
            stats.stall_s = stats.total_s
        m.last_save = stats
        logger.info("rank %d saved iteration %d%s: %d bytes, stall %.3fs (stage %.3fs) exchange %.3fs write "
                    "%.3fs finalize %.3fs", m.rank, self.iteration, " asynchronously" if self.is_async else "",
                    stats.file_bytes, stats.stall_s, stats.stage_s, stats.exchange_s, stats.write_s,
                    stats.finalize_s)

    def drop(self, reason: str, worker_may_run: bool = False) -> None:
        """Give up this save locally (no collective): wait for the background exchange, let go of
        the staging buffer (back to the pool; or, when ``worker_may_run``, never to be reused, since
        a worker this process does not control may still read it), remove the iteration's files.
        Idempotent."""
        if self.done:
            return
        self.failure = reason
        try:
            if self.replication is not None:
                self.replication.result()
        finally:
            self._writer_may_run = self._writer_may_run or worker_may_run
            self._let_go()
            self._end()
            self.manager._remove_iteration(self.iteration)
        logger.warning("rank %d: the async save of iteration %d was dropped (%s); its files were removed",
                       self.manager.rank, self.iteration, reason)

    def _let_go(self) -> None:
        """Give the staging buffer (and the writer's status row) back, or, when a worker this
        process does not control may still use them, let them go without reuse."""
        if self._writer_may_run:
            self.staged.discard()
        else:
            self.staged.release()
            if self.status is not None:
                self.status.release()

    def _end(self) -> None:
        self.done = True
        self.manager._forget(self)
