"""BaseCheckpointManager: the collective save / find_latest / load protocol over abstract storage.

Subclasses say where parts live (the ``_write_*``, ``_read_*``, ``_advertised_parts``, ``_remove_*``
and ``_cleanup`` hooks, all local operations); this class decides when, and makes every rank agree:
a failure on one rank becomes an error on every rank, and an iteration is published (others
removed) only after every rank's part and replicas are durable. With a replication strategy, each
rank also stores its peers' parts (exchanged with :mod:`tasd.managers.exchange`), and load fetches
a lost rank's part from a peer that holds it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tasd.managers import collectives
from tasd.managers.config import ReplicationMismatchError
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts, plan_retrieval
from tasd.managers.fileformat import LoadedPart, PartMeta, RawPart, encode_prefix
from tasd.managers.replication import NoReplicasAvailableError, ReplicationStrategy
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, Staged, default_pool, stage
from tasd.state_dict import TensorAwareStateDict
from tasd.tree import find_unpicklable

logger = logging.getLogger(__name__)

CkptID = tuple  # (iteration, rank, session_id)


@dataclass
class SaveStats:
    """What the last save cost on this rank (seconds, bytes)."""

    iteration: int = -1
    stage_s: float = 0.0
    exchange_s: float = 0.0
    write_s: float = 0.0
    finalize_s: float = 0.0
    total_s: float = 0.0
    tensor_bytes: int = 0
    file_bytes: int = 0
    extra: dict = field(default_factory=dict)


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
                 group: Any = None, pool: HostBufferPool | None = None):
        if repl_strategy is not None and not isinstance(repl_strategy, ReplicationStrategy):
            raise TypeError(f"repl_strategy must be a ReplicationStrategy or None, got {type(repl_strategy).__name__}")
        self.session_id = session_id
        self.group = group
        self.rank, self.world_size = collectives.rank_and_size(group)
        self.repl_strategy = repl_strategy
        if repl_strategy is not None:
            repl_strategy.check_world_size(self.world_size)
        self.replication = None if repl_strategy is None else repl_strategy.settings
        self.pool = pool or default_pool()
        self.latest_iteration: int | None = None  # newest iteration every rank can load, once known
        self._latest_holders: dict[int, list[int]] | None = None  # owner -> ranks holding its part
        self._unrecoverable: tuple[int, list[int]] | None = None  # newest incomplete iteration, lost owners
        self.last_save = SaveStats()

    # -- storage, implemented by subclasses (local operations, never collective) ---------------
    @abstractmethod
    def _write_part(self, meta: PartMeta, hollow: bytes, staged: Staged) -> int:
        """Durably store this rank's own part; return its size in bytes."""

    @abstractmethod
    def _write_encoded(self, meta: PartMeta, prefix: bytes, buffer: Any) -> int:
        """Durably store an encoded part (this rank's own, or a peer's received as bytes) given its
        prefix and data buffer; return its size in bytes."""

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
        """Remove every part of ``iteration`` this rank holds (missing is fine)."""

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
        if iteration <= latest:
            raise CheckpointingException(
                f"cannot save iteration {iteration} on rank {self.rank}: it is not newer than the "
                f"latest checkpoint, iteration {latest}")

    def _snapshot(self, sd: TensorAwareStateDict) -> tuple[bytes, Staged]:
        """Hollow bytes and staged tensors of ``sd``; ``sd`` is left as it was."""
        tensors = sd.pop_tensors()
        try:
            try:
                hollow = dumps(sd)
            except Exception as e:
                where = find_unpicklable(getattr(sd, "state_dict", None))
                raise TypeError(f"state dict cannot be pickled{f' at entry {where!r}' if where else ''}: {e}") from e
            staged = stage(tensors, self.pool)
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

    def save(self, ta_state_dict: TensorAwareStateDict, iteration: int, is_async: bool = False) -> None:
        """Save this rank's part of ``iteration`` (and, with replication, the parts it holds for
        peers). Collective.

        A point-in-time snapshot: ``ta_state_dict`` is left as it was, and changing its tensors after
        save returns does not change what was written. On success the iteration is published and
        every other iteration is removed (older ones, and newer ones left by an abandoned run), in
        the background, off the training thread's critical path; on failure on any rank, every rank
        removes what it wrote for ``iteration``, the previous checkpoint stays, and every rank
        raises (the failing rank its own TypeError/ValueError/CheckpointingException, the others a
        CheckpointingException naming it).
        """
        if is_async:
            raise ValueError("is_async=True is not supported yet: asynchronous saves are not implemented")
        self.wait_for_cleanup()
        stats = SaveStats(iteration=iteration)
        t0 = time.perf_counter()
        error: BaseException | None = None
        staged: Staged | None = None
        received: list[RawPart] = []
        written = False
        number = iteration if type(iteration) is int else -1
        try:
            try:
                self._check_save_args(ta_state_dict, iteration)
                meta = self._meta(iteration)
                hollow, staged = self._snapshot(ta_state_dict)
                # With replication the part is encoded once: sent as is, and written as is.
                prefix = None if self.repl_strategy is None else encode_prefix(meta, hollow, staged.layouts,
                                                                               staged.buffer)
                stats.stage_s, stats.tensor_bytes = time.perf_counter() - t0, staged.buffer.numel()
            except Exception as e:
                error = e
            if self.repl_strategy is not None:
                # Peers wait for this rank's part: agree that every rank has one before exchanging.
                self._agree_or_raise(error, number, f"save of iteration {iteration}")
                t1 = time.perf_counter()
                try:
                    received = self._replicate(meta, prefix, staged)
                except Exception as e:
                    error = e
                stats.exchange_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            if error is None:
                try:
                    written = True
                    stats.file_bytes = (self._write_part(meta, hollow, staged) if prefix is None
                                        else self._write_encoded(meta, prefix, staged.buffer))
                    stats.file_bytes += sum(self._write_encoded(p.header.meta, p.prefix, p.buffer) for p in received)
                except Exception as e:
                    error = e
            stats.write_s = time.perf_counter() - t1
        finally:
            if staged is not None:
                staged.release()
            for part in received:
                self.pool.release(part.buffer)
        if error is not None:
            logger.debug("rank %d: save of iteration %s failed locally: %s", self.rank, iteration, error)
        t2 = time.perf_counter()
        try:
            error, failures = self._agree(error, number, f"save of iteration {iteration}")
        except BaseException:
            if written:
                self._remove_iteration(iteration)
            raise
        if failures:
            if written:
                self._remove_iteration(iteration)
            _raise_agreed(failures, self.rank, error, f"save of iteration {iteration}")
        self.latest_iteration, self._latest_holders, self._unrecoverable = iteration, None, None
        self._cleanup(keep=iteration)
        stats.finalize_s = time.perf_counter() - t2
        stats.total_s = time.perf_counter() - t0
        self.last_save = stats
        logger.info("rank %d saved iteration %d: %d bytes, stage %.3fs exchange %.3fs write %.3fs finalize %.3fs",
                    self.rank, iteration, stats.file_bytes, stats.stage_s, stats.exchange_s, stats.write_s,
                    stats.finalize_s)

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
        rank when that iteration was saved with other replication settings."""
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
        there is no checkpoint at all. May be called more than once."""
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
