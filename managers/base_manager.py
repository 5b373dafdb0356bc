"""BaseCheckpointManager: the collective save / find_latest / load protocol over abstract storage.

Subclasses say where parts live (the ``_own_part_call``, ``_write_encoded``, ``_publish``,
``_read_*``, ``_advertised_parts``, ``_remove_*`` and ``_cleanup`` hooks, all local operations);
this class decides when, and makes every rank agree: a failure on one rank becomes an error on
every rank, and an iteration is published (parts stored unpublished are made visible, older
iterations removed) only after every rank's part and replicas are durable. With a replication
strategy, each rank also stores its peers' parts (exchanged with :mod:`tasd.managers.exchange`),
and load fetches a lost rank's part from a peer that holds it.

A save runs as a :class:`~tasd.managers.save_job.SaveJob`: stage (the caller waits), replicate
and store, then finalize (agree, publish). ``save(is_async=True)`` returns after staging; the
exchange runs in a background thread of this process on the strategy's own process group, the
own part is written by the returned AsyncRequest's ``async_fn`` (in a queue's worker process),
and its finalize function publishes.
"""

from __future__ import annotations

import functools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from tasd.managers import collectives
from tasd.managers.async_ckpt import AsyncRequest
from tasd.managers.async_ckpt.calls_queue import queue_holding
from tasd.managers.config import ReplicationMismatchError
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts, plan_retrieval
from tasd.managers.fileformat import LoadedPart, PartMeta, RawPart, encode_prefix
from tasd.managers.replication import NoReplicasAvailableError, ReplicationStrategy
from tasd.managers.save_job import SaveJob, SaveStats
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, Staged, default_pool, stage
from tasd.state_dict import TensorAwareStateDict
from tasd.tree import find_unpicklable

logger = logging.getLogger(__name__)

CkptID = tuple  # (iteration, rank, session_id)


@dataclass
class Advertised:
    """What one rank holds of one iteration: verified parts (owner ranks) and their settings."""

    owners: list[int]
    replication: dict | None


def _raise_agreed(failures: dict[int, str], rank: int, local: BaseException | None, what: str) -> None:
    """Raise on every rank once ``failures`` (rank -> message, from gather_failures) is non-empty:
    the failing rank its own error, the others a CheckpointingException naming the failed ranks."""
    if not failures:
        return
    if local is not None:
        if isinstance(local, (TypeError, ValueError, CheckpointingException)):
            raise local
        raise CheckpointingException(f"{what} failed on rank {rank}: {local}") from local
    details = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
    raise CheckpointingException(f"{what} failed on rank(s) {sorted(failures)}: {details}")


class BaseCheckpointManager(ABC):
    """Collective checkpoint protocol. All ranks of ``group`` call save, find_latest and load together.

    ``repl_strategy`` (a ReplicationStrategy or None) decides which peers store each rank's part;
    its world-size rule is checked here (ValueError). Every collective waits at most the process
    group's timeout for a peer; a dead peer makes the others raise CheckpointingException.
    """

    def __init__(self, session_id: str = "", repl_strategy: ReplicationStrategy | None = None,
                 group: Any = None, pool: HostBufferPool | None = None,
                 async_pool: HostBufferPool | None = None, max_saves_in_flight: int = 1):
        if repl_strategy is not None and not isinstance(repl_strategy, ReplicationStrategy):
            raise TypeError(f"repl_strategy must be a ReplicationStrategy or None, got {type(repl_strategy).__name__}")
        if type(max_saves_in_flight) is not int or max_saves_in_flight < 1:
            raise ValueError(f"max_saves_in_flight must be an int >= 1, got {max_saves_in_flight!r}")
        self.session_id = session_id
        self.group = group
        self.rank, self.world_size = collectives.rank_and_size(group)
        self.repl_strategy = repl_strategy
        if repl_strategy is not None:
            repl_strategy.check_world_size(self.world_size)
        self.replication = None if repl_strategy is None else repl_strategy.settings
        self.pool = pool or default_pool()
        self.async_pool = async_pool or default_pool(shared=True)
        if not self.async_pool.shared:
            raise ValueError("async_pool must be a HostBufferPool(shared=True): its buffers go to worker processes")
        self.max_saves_in_flight = max_saves_in_flight
        self._pending: deque[SaveJob] = deque()  # async saves not yet finalized, oldest first
        self._replicator: ThreadPoolExecutor | None = None  # runs async exchanges, one at a time
        self.latest_iteration: int | None = None  # newest iteration every rank can load, once known
        self._latest_holders: dict[int, list[int]] | None = None  # owner -> ranks holding its part
        self._unrecoverable: tuple[int, list[int]] | None = None  # newest incomplete iteration, lost owners
        self.last_save = SaveStats()

    # -- storage, implemented by subclasses (local operations, never collective) ---------------
    @abstractmethod
    def _own_part_call(self, meta: PartMeta, hollow: bytes, staged: Staged) -> tuple[Callable[..., int], tuple]:
        """``(fn, args)``: a picklable call (module-level ``fn``, plain-data ``args`` plus the
        staging buffer) that durably stores this rank's own part, unpublished, and returns its
        size in bytes. Run inline by a synchronous save, in a worker process by an async one."""

    @abstractmethod
    def _write_encoded(self, meta: PartMeta, prefix: bytes, buffer: Any) -> int:
        """Durably store an encoded part (this rank's own, or a peer's received as bytes),
        unpublished, given its prefix and data buffer; return its size in bytes. Thread-safe."""

    @abstractmethod
    def _stored_size(self, meta: PartMeta) -> int | None:
        """Size in bytes of the part ``meta`` names, stored unpublished; None if it is not."""

    @abstractmethod
    def _publish(self, iteration: int, owners: list[int]) -> None:
        """Make the unpublished parts of ``owners`` at ``iteration`` visible to find_latest/load,
        durably. Raises CheckpointingException (or OSError) on failure."""

    @abstractmethod
    def _advertised_parts(self) -> dict[int, Advertised]:
        """Iteration -> verified parts this rank holds for the current world size."""

    @abstractmethod
    def _read_part(self, iteration: int, owner: int) -> LoadedPart:
        """Read, verify and decode a part this rank holds."""

    @abstractmethod
    def _read_raw_part(self, iteration: int, owner: int) -> RawPart:
        """Read and verify a part this rank holds, as bytes (to send)."""

    @abstractmethod
    def _remove_iteration(self, iteration: int) -> None:
        """Remove every part of ``iteration`` this rank holds, published or not (missing is fine)."""

    @abstractmethod
    def _cleanup(self, keep: int) -> None:
        """Remove every part of every iteration other than ``keep``; may finish in the background
        (see wait_for_cleanup)."""

    @abstractmethod
    def _newest_local_iteration(self) -> int:
        """Newest iteration with a part of this rank on storage (-1 if none), unverified."""

    def wait_for_cleanup(self) -> None:
        """Wait until parts superseded by the last save are removed. Not collective; save,
        find_latest and load call it first."""

    # -- save ----------------------------------------------------------------------------------
    def _meta(self, iteration: int) -> PartMeta:
        return PartMeta(iteration, self.rank, self.world_size, self.session_id, self.replication)

    def _check_save_args(self, sd: Any, iteration: Any) -> None:
        if not isinstance(sd, TensorAwareStateDict):
            raise TypeError(f"save() takes a TensorAwareStateDict, got {type(sd).__name__}")
        if sd.is_hollow:
            raise ValueError("save() got a hollow state dict (its tensors were popped)")
        if type(iteration) is not int or iteration < 0:
            raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
        latest = self.latest_iteration if self.latest_iteration is not None else self._newest_local_iteration()
        latest = max([latest, *self._in_flight_iterations()])
        if iteration <= latest:
            raise CheckpointingException(
                f"cannot save iteration {iteration} on rank {self.rank}: it is not newer than the "
                f"latest checkpoint, iteration {latest}")

    def _snapshot(self, sd: TensorAwareStateDict, pool: HostBufferPool) -> tuple[bytes, Staged]:
        """Hollow bytes and staged tensors of ``sd`` (in a buffer of ``pool``); ``sd`` is left as it was."""
        tensors = sd.pop_tensors()
        try:
            try:
                hollow = dumps(sd)
            except Exception as e:
                where = find_unpicklable(getattr(sd, "state_dict", None))
                raise TypeError(f"state dict cannot be pickled{f' at entry {where!r}' if where else ''}: {e}") from e
            staged = stage(tensors, pool)
        finally:
            sd.insert_tensors(tensors)
        return hollow, staged

    def _replicate(self, meta: PartMeta, prefix: bytes, staged: Staged) -> list[RawPart]:
        """Send this rank's part to its holders and receive the parts it holds for peers, into
        buffers of the staging pool (the caller releases them)."""
        strategy, rank, world = self.repl_strategy, self.rank, self.world_size
        plan = ([Transfer(rank, rank, h) for h in strategy.holders(rank, world)]
                + [Transfer(o, o, rank) for o in strategy.held_owners(rank, world)])
        received = exchange_parts(plan, {rank: OutgoingPart(prefix, staged.buffer)}, group=strategy.group,
                                  pool=self.pool)
        parts = [received[o] for o in sorted(received)]
        for owner, part in zip(sorted(received), parts):
            got = part.header.meta
            if (got.iteration, got.owner_rank, got.world_size) != (meta.iteration, owner, meta.world_size):
                for p in parts:
                    self.pool.release(p.buffer)
                raise CorruptCheckpointError(
                    f"rank {rank} received a part of rank {got.owner_rank}, iteration {got.iteration}, world size "
                    f"{got.world_size} where it expected rank {owner}, iteration {meta.iteration}")
        return parts

    def save(self, ta_state_dict: TensorAwareStateDict, iteration: int,
             is_async: bool = False) -> AsyncRequest | None:
        """Save this rank's part of ``iteration`` (and, with replication, the parts it holds for
        peers). Collective.

        A point-in-time snapshot: ``ta_state_dict`` is left as it was, and changing its tensors after
        save returns does not change what is written. On success the iteration is published and
        every other iteration is removed (older ones, and newer ones left by an abandoned run), in
        the background, off the training thread's critical path; on failure on any rank, every rank
        removes what it stored for ``iteration``, the previous checkpoint stays, and every rank
        raises (the failing rank its own TypeError/ValueError/CheckpointingException, the others a
        CheckpointingException naming it).

        ``is_async=True``: returns once the tensors are staged (and every rank has staged), with an
        :class:`AsyncRequest` to schedule on an AsyncCallsQueue (persistent or not) or run with
        ``execute_sync()``; the exchange with peers runs meanwhile in a background thread. The
        request's finalize function publishes (collective over the manager's group, so finalize
        with ``maybe_finalize_async_calls(no_dist=False)``, the default, which runs it on every rank
        at the same point; failures raise as above, from there). At most ``max_saves_in_flight`` async saves are
        unfinalized: a save beyond that, and every sync save, find_latest and load, first finalizes
        the older ones through their queue (collective; raises if one failed). A request that was
        never scheduled, or whose call failed, is dropped then and its files removed.
        """
        if type(is_async) is not bool:
            raise TypeError(f"is_async must be a bool, got {type(is_async).__name__}")
        self._settle(keep=self.max_saves_in_flight - 1 if is_async else 0)
        self.wait_for_cleanup()
        job = self._begin_save(ta_state_dict, iteration, is_async)
        if not is_async:
            if self.repl_strategy is not None:
                self._replicate_and_store(job)
            if job.error is None:
                t = time.perf_counter()
                try:
                    if job.prefix is not None:  # encoded for the exchange: written as sent
                        self._write_encoded(job.meta, job.prefix, job.staged.buffer)
                    else:
                        fn, args = job.own_call
                        fn(*args)
                except Exception as e:
                    job.error = e
                job.stats.write_s += time.perf_counter() - t
            self._finalize_save(job)
            return None
        if self.repl_strategy is not None:
            if self._replicator is None:
                self._replicator = ThreadPoolExecutor(1, thread_name_prefix="tasd-replicate")
            job.replication = self._replicator.submit(self._replicate_and_store, job)
        fn, args = job.own_call
        job.finalize_fn = functools.partial(self._finalize_save, job)
        self._pending.append(job)
        job.stats.stall_s = time.perf_counter() - job.started
        return AsyncRequest(fn, args, [job.finalize_fn])

    def _begin_save(self, sd: TensorAwareStateDict, iteration: int, is_async: bool) -> SaveJob:
        """Check the arguments and stage ``sd``. Agrees with every rank (one all_reduce) when a
        rank failed, and always for async or replicated saves (peers wait for this part); raises
        on every rank then, having released what it staged."""
        t0 = time.perf_counter()
        error: BaseException | None = None
        job: SaveJob | None = None
        try:
            self._check_save_args(sd, iteration)
            meta = self._meta(iteration)
            hollow, staged = self._snapshot(sd, self.async_pool if is_async else self.pool)
            owners = [self.rank] + ([] if self.repl_strategy is None
                                    else sorted(self.repl_strategy.held_owners(self.rank, self.world_size)))
            stats = SaveStats(iteration=iteration, stage_s=time.perf_counter() - t0,
                              tensor_bytes=staged.buffer.numel(), is_async=is_async)
            job = SaveJob(meta, hollow, staged, t0, owners, stats)
            job.own_call = self._own_part_call(meta, hollow, staged)
        except Exception as e:
            error = e
        if error is not None or is_async or self.repl_strategy is not None:
            try:
                self._agree_or_raise(error, iteration if type(iteration) is int else -1,
                                     f"save of iteration {iteration}")
            except BaseException:
                if job is not None:
                    job.staged.release()
                raise
        return job

    def _replicate_and_store(self, job: SaveJob) -> None:
        """Encode this rank's part, exchange parts with peers on the strategy's process group and
        store the received ones, unpublished. Records a failure in ``job.error`` instead of
        raising (may run in the background thread)."""
        t = time.perf_counter()
        try:
            job.prefix = encode_prefix(job.meta, job.hollow, job.staged.layouts, job.staged.buffer)
            job.stats.encode_s = time.perf_counter() - t
            t = time.perf_counter()
            received = self._replicate(job.meta, job.prefix, job.staged)
            t1 = time.perf_counter()
            job.stats.exchange_s = t1 - t
            try:
                for part in received:
                    job.stats.file_bytes += self._write_encoded(part.header.meta, part.prefix, part.buffer)
            finally:
                for part in received:
                    self.pool.release(part.buffer)
            job.stats.write_s += time.perf_counter() - t1
        except Exception as e:
            logger.debug("rank %d: replication of iteration %d failed: %s", self.rank, job.iteration, e)
            job.error = e

    def _finalize_save(self, job: SaveJob) -> None:
        """Publish ``job``'s iteration once every rank stored its parts, then remove the others;
        or remove what this rank stored of it and raise on every rank. Collective over the
        manager's group: two all_reduces (stored everywhere? published everywhere?). Does nothing
        for a job already finalized."""
        if job.done:
            return
        t = time.perf_counter()
        iteration, what = job.iteration, f"save of iteration {job.iteration}"
        try:
            if job.replication is not None:
                job.replication.result()  # records its failure in job.error
            error = job.error
            size = self._stored_size(job.meta) if error is None else None
            if error is None and size is None:
                error = CheckpointingException(f"rank {self.rank}: its part of iteration {iteration} was not "
                                               "stored (the async writer did not finish)")
            job.stats.file_bytes += size or 0  # the own part (replicas were counted as written)
        finally:
            job.staged.release()
        if error is not None:
            logger.debug("rank %d: save of iteration %d failed locally: %s", self.rank, iteration, error)
        try:
            self._agree_or_raise(error, iteration, what)
            try:
                self._publish(iteration, job.owners)
                error = None
            except Exception as e:
                error = e
            self._agree_or_raise(error, iteration, f"{what} (publishing)")
        except BaseException:
            job.done = True
            self._remove_iteration(iteration)
            raise
        job.done = True
        self.latest_iteration, self._latest_holders, self._unrecoverable = iteration, None, None
        self._cleanup(keep=iteration)
        stats = job.stats
        stats.finalize_s = time.perf_counter() - t
        stats.total_s = time.perf_counter() - job.started
        if not stats.is_async:
            stats.stall_s = stats.total_s
        self.last_save = stats
        logger.info("rank %d saved iteration %d%s: %d bytes, stall %.3fs (stage %.3fs) exchange %.3fs write "
                    "%.3fs finalize %.3fs", self.rank, iteration, " asynchronously" if stats.is_async else "",
                    stats.file_bytes, stats.stall_s, stats.stage_s, stats.exchange_s, stats.write_s,
                    stats.finalize_s)

    def _settle(self, keep: int) -> None:
        """Finalize unfinalized async saves, oldest first, until at most ``keep`` remain: through
        the queue holding each one's call (collective; raises on every rank if it, or an earlier
        call of that queue, failed; a save whose call is still queued then stays pending), or, for
        a request that no queue holds (never scheduled, or its call failed and was dropped), by
        dropping it: its background exchange is awaited and its files are removed (local)."""
        while len(self._pending) > keep:
            job = self._pending[0]
            found = None if job.done else queue_holding(job.finalize_fn)
            if found is not None:
                queue, call_idx = found
                try:
                    queue.finalize_through(call_idx)
                except BaseException:
                    if job.done or queue.holds(job.finalize_fn) is None:  # this save's call ended
                        self._retire_oldest()
                    raise
            self._retire_oldest()

    def _retire_oldest(self) -> None:
        job = self._pending.popleft()
        if not job.done:
            self._drop(job)

    def _drop(self, job: SaveJob) -> None:
        if job.replication is not None:
            job.replication.result()
        job.staged.release()
        self._remove_iteration(job.iteration)
        job.done = True
        logger.warning("rank %d: the async save of iteration %d was never finalized (not scheduled, or its "
                       "call failed); its files were removed", self.rank, job.iteration)

    def _in_flight_iterations(self) -> set[int]:
        """Iterations of async saves not yet finalized (their unpublished files are in use)."""
        return {job.iteration for job in self._pending if not job.done}

    def _agree(self, error: BaseException | None, iteration: int, what: str) -> tuple[BaseException | None, dict[int, str]]:
        """One all_reduce: did any rank fail, and did all ranks pass the same iteration? Returns the
        local error (a mismatch becomes one on every rank) and the failures of all ranks. A peer
        that cannot be reached (dead, or timed out) raises CheckpointingException."""
        try:
            flag, hi, neg_lo = collectives.all_reduce_max([1 if error else 0, iteration, -iteration], self.group)
            if error is None and hi != -neg_lo:
                error = CheckpointingException(f"ranks passed different iterations ({-neg_lo} to {hi}); "
                                               f"rank {self.rank} passed {iteration}")
            if flag or hi != -neg_lo:
                return error, collectives.gather_failures(error, self.group)
            return error, {}
        except Exception as e:
            raise CheckpointingException(f"{what}: rank {self.rank} could not reach the other ranks "
                                         f"(a peer died or timed out): {e}") from e

    def _agree_or_raise(self, error: BaseException | None, iteration: int, what: str) -> None:
        """:meth:`_agree`, then raise on every rank if any rank failed (see _raise_agreed)."""
        error, failures = self._agree(error, iteration, what)
        _raise_agreed(failures, self.rank, error, what)

    # -- find_latest ---------------------------------------------------------------------------
    def find_latest(self) -> int:
        """Newest iteration every rank can load (-1 if none): every owner rank's part verified on
        at least one rank. Collective: two all_gathers of small JSON, whatever the number of
        files. Parts that fail verification are skipped. Raises ReplicationMismatchError on every
        rank when that iteration was saved with other replication settings. Finalizes pending
        async saves first (see save)."""
        self._settle(keep=0)
        self.wait_for_cleanup()
        error: BaseException | None = None
        parts: dict[int, Advertised] = {}
        try:
            parts = self._advertised_parts()
        except Exception as e:
            error = e
        mine = {"error": None if error is None else f"{type(error).__name__}: {error}",
                "parts": {str(it): [a.owners, a.replication] for it, a in parts.items()}}
        try:
            gathered = collectives.all_gather_json(mine, self.group)
        except Exception as e:
            raise CheckpointingException(f"find_latest: rank {self.rank} could not reach the other ranks: {e}") from e
        _raise_agreed({r: g["error"] for r, g in enumerate(gathered) if g["error"]}, self.rank, error, "find_latest")
        holders: dict[int, dict[int, list[int]]] = {}
        settings: dict[int, Any] = {}
        for r, g in enumerate(gathered):
            for it, (owners, repl) in g["parts"].items():
                for owner in owners:
                    holders.setdefault(int(it), {}).setdefault(owner, []).append(r)
                settings.setdefault(int(it), repl)
        everyone = set(range(self.world_size))
        complete = [it for it, by_owner in holders.items() if set(by_owner) >= everyone]
        latest = max(complete, default=-1)
        incomplete = [it for it in holders if it > latest]
        self._unrecoverable = None
        if incomplete:
            newest = max(incomplete)
            self._unrecoverable = (newest, sorted(everyone - set(holders[newest])))
            logger.warning("rank %d: iteration %d cannot be restored: no rank holds the part of rank(s) %s",
                           self.rank, *self._unrecoverable)
        if latest >= 0 and settings[latest] != self.replication:
            raise ReplicationMismatchError(latest, settings[latest], self.replication)
        self.latest_iteration = latest
        self._latest_holders = holders.get(latest, {})  # {} once known: load does not search again
        logger.info("rank %d: latest complete iteration is %d", self.rank, latest)
        return latest

    # -- load ----------------------------------------------------------------------------------
    def load(self) -> tuple[TensorAwareStateDict, CkptID]:
        """Load this rank's part of the latest iteration; a rank that lost it gets it from a peer
        holding a replica (senders are spread so no rank serves many). Calls find_latest first
        unless it ran since the last save. Collective. Raises on every rank if any rank fails:
        NoReplicasAvailableError when some rank's part exists nowhere, CheckpointingException when
        there is no checkpoint at all. May be called more than once. Finalizes pending async
        saves first (see save)."""
        self._settle(keep=0)
        self.wait_for_cleanup()
        if self._latest_holders is None:
            self.find_latest()
        iteration, holders = self.latest_iteration, self._latest_holders or {}
        if iteration is None or iteration < 0:
            if self._unrecoverable:
                raise NoReplicasAvailableError(*self._unrecoverable)
            raise CheckpointingException(f"no checkpoint to load in session {self.session_id!r}")
        what = f"load of iteration {iteration}"
        needs = {r: [r] for r in range(self.world_size) if r not in holders.get(r, ())}
        plan = plan_retrieval(needs, holders)
        error: BaseException | None = None
        sd, outgoing = None, {}
        try:
            if self.rank not in needs:
                sd = self._load_part(iteration, self._read_part(iteration, self.rank))
            outgoing = {t.owner: self._outgoing(iteration, t.owner) for t in plan if t.src == self.rank}
        except Exception as e:
            error = e
        if plan:
            # Receivers wait for their senders: agree that every sender read its parts first.
            self._agree_or_raise(error, iteration, what)
            try:
                received = exchange_parts(plan, outgoing, group=self.repl_strategy.group)
                if self.rank in needs:
                    sd = self._load_part(iteration, received[self.rank].decode(
                        f"part of rank {self.rank} received for iteration {iteration}"))
            except Exception as e:
                error = e
        if sd is None and error is None:
            error = NoReplicasAvailableError(iteration, [self.rank])
        self._agree_or_raise(error, iteration, what)
        if plan:
            logger.info("rank %d: iteration %d restored with %d part(s) fetched from peers: %s",
                        self.rank, iteration, len(plan), [(t.owner, t.src) for t in plan])
        return sd, (iteration, self.rank, self.session_id)

    def _outgoing(self, iteration: int, owner: int) -> OutgoingPart:
        raw = self._read_raw_part(iteration, owner)
        return OutgoingPart(raw.prefix, raw.buffer)

    def _load_part(self, iteration: int, part: LoadedPart) -> TensorAwareStateDict:
        owner = part.header.meta.owner_rank
        sd = part.hollow
        if not isinstance(sd, TensorAwareStateDict) or not sd.is_hollow:
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration} does not hold a hollow "
                                         f"TensorAwareStateDict (got {type(sd).__name__})")
        try:
            sd.insert_tensors(part.tensors())
        except ValueError as e:
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration}: {e}") from e
        return sd
