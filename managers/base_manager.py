"""BaseCheckpointManager: the collective save / find_latest / load protocol over abstract storage.

Subclasses say where parts live (the storage hooks below, all local operations); this class decides
when, and makes every rank agree (:mod:`tasd.managers.agreement`): a failure on one rank becomes an
error on every rank. A save runs as a :class:`~tasd.managers.save_job.SaveJob`, whose module
docstring gives the protocol in order; which checkpoint a restart loads, and where lost parts come
from, is planned by :mod:`tasd.managers.recovery`.

All of tasd's collectives run on process groups of its own, created inside these collective calls:
agreements on :func:`tasd.managers.collectives.agreement_group` (a tree of gloo groups of at most 8
ranks, created on the calling thread), replica and recovery traffic on the strategy's gloo groups
among peers (created in the background exchange thread from find_latest on, see
``_prepare_exchange``). Nothing
here issues work on the training's communicators or waits for the GPU.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch.distributed as dist

from tasd.managers import collectives, identity
from tasd.managers.agreement import agree, agree_or_raise, raise_agreed
from tasd.managers.async_ckpt import AsyncRequest
from tasd.managers.config import ReplicationMismatchError
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError, PeerUnreachableError
from tasd.managers.exchange import ExchangeAborted, OutgoingPart, TransferDamaged, exchange_parts
from tasd.managers.fileformat import LoadedPart, PartMeta
from tasd.managers import recovery
from tasd.managers.recovery import Holding
from tasd.managers.replication import NoReplicasAvailableError, ReplicationStrategy
from tasd.managers.save_job import SaveJob, SaveStats
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, Staged, default_pool, stage
from tasd.state_dict import TensorAwareStateDict
from tasd.tree import find_unpicklable

logger = logging.getLogger(__name__)

CkptID = tuple  # (iteration, rank, session_id)

#: Iterations are recorded as int64 and agreed with int64 all_reduces (negated, too).
MAX_ITERATION = 2**62 - 1


def _check_world_group(group: Any) -> None:
    """A manager works on the whole world, ranks in world order: ``group`` must be None or such a
    group (ValueError otherwise). Local."""
    if group is None or not collectives.is_distributed() or group is dist.group.WORLD:
        return
    size, world = dist.get_world_size(group), dist.get_world_size()
    if size != world or dist.get_rank(group) != dist.get_rank():
        raise ValueError(f"a checkpoint manager works on the whole world in rank order: group must be None or "
                         f"the world, got a group of {size} of {world} ranks (rank {dist.get_rank()} is rank "
                         f"{dist.get_rank(group)} in it); use one manager per job")


class BaseCheckpointManager(ABC):
    """Collective checkpoint protocol. All ranks call save, find_latest and load together, on the
    training thread.

    ``repl_strategy`` (a ReplicationStrategy or None) decides which peers store each rank's part;
    its world-size rule is checked here (ValueError). ``job_id`` (default: from the environment,
    see :mod:`tasd.managers.identity`) is recorded in every part; with the default session id ("")
    only parts of the same job are loaded. A collective waits at most the job's collective timeout
    for a peer; a dead or stuck peer makes the others raise CheckpointingException.
    """

    def __init__(self, session_id: str = "", repl_strategy: ReplicationStrategy | None = None,
                 group: Any = None, pool: HostBufferPool | None = None,
                 async_pool: HostBufferPool | None = None, max_saves_in_flight: int = 1,
                 job_id: str | None = None):
        if repl_strategy is not None and not isinstance(repl_strategy, ReplicationStrategy):
            raise TypeError(f"repl_strategy must be a ReplicationStrategy or None, got {type(repl_strategy).__name__}")
        if type(max_saves_in_flight) is not int or max_saves_in_flight < 1:
            raise ValueError(f"max_saves_in_flight must be an int >= 1, got {max_saves_in_flight!r}")
        if job_id is not None and (not isinstance(job_id, str) or len(job_id) > 128):
            raise ValueError(f"job_id must be a string of at most 128 characters, got {job_id!r}")
        _check_world_group(group)
        self.session_id = session_id
        self.job_id = identity.job_id_from_env() if job_id is None else job_id
        self.rank, self.world_size = collectives.rank_and_size()
        self.repl_strategy = repl_strategy
        if repl_strategy is not None:
            repl_strategy.check_world_size(self.world_size)
        self.replication = None if repl_strategy is None else repl_strategy.settings
        self.pool = pool or default_pool()
        self.async_pool = async_pool or default_pool(shared=True)
        # Replicas received from peers go straight to storage: pageable memory, so that the
        # background exchange makes no CUDA call (pinning is one).
        self.receive_pool = HostBufferPool(pin=False)
        if not self.async_pool.shared:
            raise ValueError("async_pool must be a HostBufferPool(shared=True): its buffers go to worker processes")
        self.max_saves_in_flight = max_saves_in_flight
        self._pending: list[SaveJob] = []  # async saves not yet finalized or dropped, oldest first
        self._replicator: ThreadPoolExecutor | None = None  # runs async exchanges, one at a time
        self._newest_saved = -1  # newest iteration this manager published
        self.latest_iteration: int | None = None  # newest iteration every rank can load, once known
        self._latest: recovery.Chosen | None = None  # what find_latest found (None: search again before a load)
        self._held: dict[recovery.SaveKey, Holding] = {}  # what this rank held at the last find_latest
        self._excluded: set[tuple] = set()  # parts found damaged since: (iteration, save id, holder, owner)
        self.last_save = SaveStats()

    # -- storage, implemented by subclasses (local operations, never collective) ---------------
    @abstractmethod
    def _prepare_storage(self) -> None:
        """Make sure parts can be stored (e.g. create the directory). Raises on failure."""

    @abstractmethod
    def _own_part_call(self, meta: PartMeta, hollow: bytes, staged: Staged) -> tuple[Callable[..., int], tuple]:
        """``(fn, args)``: a picklable call (module-level ``fn``, plain-data ``args`` plus the
        staging buffer) that durably stores this rank's own part, unpublished, and returns its
        size in bytes. Run inline by a synchronous save, in a worker process by an async one.
        Building it does no I/O."""

    @abstractmethod
    def _write_encoded(self, meta: PartMeta, prefix: bytes, buffer: Any) -> int:
        """Durably store an encoded part (this rank's own, or a peer's received as bytes),
        unpublished, given its prefix and data buffer; return its size in bytes. Thread-safe."""

    @abstractmethod
    def _stored_size(self, meta: PartMeta) -> int | None:
        """Size in bytes of the part ``meta`` names, stored unpublished; None if it is not."""

    @abstractmethod
    def _publish(self, iteration: int, metas: list[PartMeta]) -> None:
        """Make the unpublished parts ``metas`` of ``iteration`` visible to find_latest/load,
        durably, after removing published parts of ``iteration`` and newer ones (left by an
        abandoned run). Raises CheckpointingException (or OSError) on failure."""

    @abstractmethod
    def _advertised_parts(self) -> dict[tuple[int, str], Holding]:
        """(iteration, save id) -> the parts this rank holds of this session (and job, for the
        default session) for the current world size: owner -> whether its data was verified."""

    @abstractmethod
    def _read_part(self, iteration: int, owner: int, save_id: str) -> LoadedPart:
        """Read, verify and decode a part this rank holds (CorruptCheckpointError when it is not
        of save ``save_id``)."""

    @abstractmethod
    def _open_outgoing(self, iteration: int, owner: int, save_id: str) -> tuple[OutgoingPart, Callable[[], None]]:
        """A part this rank holds, opened to be sent, and the function that closes it: its header
        and prefix checked now (CorruptCheckpointError when damaged or not of save ``save_id``),
        its data read and verified piece by piece by the OutgoingPart's ``fill`` as the exchange
        sends it."""

    @abstractmethod
    def _remove_iteration(self, iteration: int) -> None:
        """Remove every part of ``iteration`` this rank holds, published or not (missing is fine)."""

    @abstractmethod
    def _cleanup(self, keep: int) -> None:
        """Remove every part of every iteration other than ``keep``; may finish in the background
        (see wait_for_cleanup)."""

    def wait_for_cleanup(self) -> None:
        """Wait until parts superseded by the last save are removed. Not collective; find_latest
        and load call it first. A save does not wait: the removal runs in the background while the
        next save stages and writes (it touches only superseded iterations' files)."""

    # -- groups -------------------------------------------------------------------------------------
    def _groups_ready(self) -> Any:
        """tasd's agreement tree, created on the first collective call, on the calling thread."""
        return collectives.agreement_group()

    def _background(self) -> ThreadPoolExecutor:
        """The one thread that runs exchanges in the background (and creates their groups)."""
        if self._replicator is None:
            self._replicator = ThreadPoolExecutor(1, thread_name_prefix="tasd-replicate")
        return self._replicator

    def _prepare_exchange(self) -> None:
        """Start creating the strategy's exchange groups in the background thread, unless they
        exist. Called by every rank at the same collective point (find_latest), so that a restart
        that moves no part does not wait for them; whoever needs them first waits
        (``exchange_groups`` is thread-safe), and a save's replication in the same thread runs
        after them. A failure to create them is logged here and raised where they are needed."""
        strategy = self.repl_strategy
        if strategy is None or not collectives.is_distributed() or strategy._groups is not None:
            return
        self._background().submit(strategy._create_in_background)

    def _agree_or_raise(self, error: BaseException | None, iteration: int, what: str, extra: int = 0) -> int:
        return agree_or_raise(error, iteration, what, self._groups_ready(), extra)

    # -- save ----------------------------------------------------------------------------------
    def _check_save_args(self, sd: Any, iteration: Any) -> None:
        if not isinstance(sd, TensorAwareStateDict):
            raise TypeError(f"save() takes a TensorAwareStateDict, got {type(sd).__name__}")
        if sd.is_hollow:
            raise ValueError("save() got a hollow state dict (its tensors were popped)")
        if type(iteration) is not int or not 0 <= iteration <= MAX_ITERATION:
            raise ValueError(f"iteration must be an int in [0, 2**62), got {iteration!r}")
        latest = max([self._newest_saved, *self._in_flight_iterations()])
        if iteration <= latest:
            raise CheckpointingException(
                f"cannot save iteration {iteration} on rank {self.rank}: this manager already saved or is saving "
                f"iteration {latest}; iterations must increase")

    def _snapshot(self, sd: TensorAwareStateDict, pool: HostBufferPool) -> tuple[bytes, Staged]:
        """Hollow bytes and staged tensors of ``sd`` (in a buffer of ``pool``); ``sd`` is left as it
        was. Device-to-host copies are queued first and may still be in flight on return (the
        hollow state is pickled meanwhile; ``Staged.wait``). Raises TypeError when the hollow state
        cannot be pickled, or names a class that a load would refuse (tasd.serialization.dumps),
        having released the buffer."""
        tensors = sd.pop_tensors()
        staged: Staged | None = None
        try:
            staged = stage(tensors, pool, non_blocking=True)
            try:
                hollow = dumps(sd)
            except TypeError:
                raise
            except Exception as e:
                where = find_unpicklable(getattr(sd, "state_dict", None))
                raise TypeError(f"state dict cannot be pickled{f' at entry {where!r}' if where else ''}: {e}") from e
        except BaseException:
            if staged is not None:
                staged.release()
            raise
        finally:
            sd.insert_tensors(tensors)
        return hollow, staged

    def save(self, ta_state_dict: TensorAwareStateDict, iteration: int,
             is_async: bool = False) -> AsyncRequest | None:
        """Save this rank's part of ``iteration`` (and, with replication, the parts it holds for
        peers). Collective, on the training thread; the protocol is in
        :mod:`tasd.managers.save_job`.

        A point-in-time snapshot: ``ta_state_dict`` is left as it was, and changing its tensors after
        save returns does not change what is written. Iterations must increase within one manager;
        parts left on storage by an earlier run (older, newer or the same iteration) are replaced.
        On success the iteration is published and every other iteration is removed (in a background
        thread); on failure on any rank, every rank removes what it stored for ``iteration``, the
        previous checkpoint stays, and every rank raises (the failing rank its own
        TypeError/ValueError/CheckpointingException, the others a CheckpointingException naming it).
        A hollow state that a load could not decode (a class outside the allow-list) raises
        TypeError naming the class.

        ``is_async=True``: returns once this rank's tensors are staged and every rank agreed to the
        save (the agreement runs while the device-to-host copies do), with an
        :class:`AsyncRequest` to schedule on an AsyncCallsQueue (persistent or not) or run with
        ``execute_sync()``; the exchange with peers runs meanwhile in a background thread. The
        request's finalize function publishes (collective: finalize with
        ``maybe_finalize_async_calls(no_dist=False)``, the default, so that every rank runs it at the
        same point). When its call fails on any rank, the queue drops it on every rank and its files
        are removed at once. At most ``max_saves_in_flight`` async saves are unfinalized: a save
        beyond that, and every sync save, find_latest and load, first finalizes the older ones
        (collective; raises on every rank if one failed): through their queue when it is tasd's;
        when another queue took the request (megatron-core's ``AsyncCallsQueue``, where
        Megatron-LM schedules it, which may not have finalized it yet: Megatron-LM starts a new
        save whether or not the last one finished), by waiting for its writer's own report
        (:meth:`SaveJob.wait_for_writer`) and finalizing it here, so the later finalize by that
        queue does nothing (or raises again, when it failed). A request no queue took (never
        scheduled) is dropped then and its files removed.
        """
        if type(is_async) is not bool:
            raise TypeError(f"is_async must be a bool, got {type(is_async).__name__}")
        self._settle(keep=self.max_saves_in_flight - 1 if is_async else 0)
        job = self._begin_save(ta_state_dict, iteration, is_async)   # 1. stage, agree
        if not is_async:
            if self.repl_strategy is not None:
                job.replicate()                                      # 2. exchange, store replicas
            job.store_own()                                          # 3. store the own part
            job.finalize()                                           # 4. agree, publish
            return None
        if self.repl_strategy is not None:                           # 2. in the background
            job.replication = self._background().submit(job.replicate)
        self._pending.append(job)
        job.stats.stall_s = time.perf_counter() - job.started
        return job.request()                                         # 3. in a worker; 4. its finalize

    def _begin_save(self, sd: TensorAwareStateDict, iteration: int, is_async: bool) -> SaveJob:
        """Step 1: check the arguments, start staging ``sd`` (its device-to-host copies queued),
        prepare storage, then agree with every rank (one all_reduce, which also agrees the save
        id) while the copies run, then wait for them. Raises on every rank when any rank failed
        before the agreement, having released what it staged. The copies' own failure (a CUDA
        error, known only once they are waited for) comes after the agreement: it is recorded as
        the job's ``error``, so the save is not replicated or stored here and its finalize fails
        on every rank."""
        t0 = time.perf_counter()
        error: BaseException | None = None
        staged: Staged | None = None
        hollow = b""
        try:
            self._check_save_args(sd, iteration)
            hollow, staged = self._snapshot(sd, self.async_pool if is_async else self.pool)
            self._prepare_storage()
        except Exception as e:
            error = e
        try:
            agreed_it = iteration if type(iteration) is int and 0 <= iteration <= MAX_ITERATION else -1
            nonce = self._agree_or_raise(error, agreed_it, f"save of iteration {iteration}",
                                         extra=identity.save_nonce())
            meta = PartMeta(iteration, self.rank, self.world_size, self.session_id, self.replication,
                            save_id=identity.save_id(nonce), job_id=self.job_id)
            owners = [self.rank] + ([] if self.repl_strategy is None
                                    else sorted(self.repl_strategy.held_owners(self.rank, self.world_size)))
            stats = SaveStats(iteration=iteration, tensor_bytes=staged.buffer.numel(), is_async=is_async)
            job = SaveJob(self, meta, hollow, staged, owners, stats, t0, is_async)
        except BaseException:
            if staged is not None:
                staged.release()
            raise
        try:
            staged.wait()
        except Exception as e:  # noqa: BLE001 - agreed at finalize, like a failed write
            job.error = CheckpointingException(f"rank {self.rank}: the device-to-host copies of iteration "
                                               f"{iteration} failed: {e}")
        stats.stage_s = time.perf_counter() - t0
        return job

    def _published(self, iteration: int) -> None:
        """Called by a SaveJob once its iteration is published everywhere."""
        self._newest_saved = max(self._newest_saved, iteration)
        self.latest_iteration, self._latest = iteration, None
        self._cleanup(keep=iteration)

    def _forget(self, job: SaveJob) -> None:
        """Called by a SaveJob once it is finalized or dropped."""
        if job in self._pending:
            self._pending.remove(job)

    def _settle(self, keep: int) -> None:
        """Finalize unfinalized async saves, oldest first, until at most ``keep`` remain (every
        rank holds the same ones: saves are collective):

        - a call on a tasd AsyncCallsQueue: through that queue (collective; raises on every rank if
          it, or an earlier call of that queue, failed: a save whose call is still queued then
          stays pending);
        - a request another queue took (froze) without telling tasd where (megatron-core's): wait
          for its writer on every rank (:meth:`SaveJob.wait_for_writer`, collective, bounded by
          the collective timeout), then finalize it (collective; raises on every rank if it failed
          anywhere);
        - a request no queue took: drop it (local; its buffer is never reused)."""
        while len(self._pending) > keep:
            job = self._pending[0]
            if job.queue is not None and not job.done:
                job.queue.finalize_through(job.call_idx)  # runs job.finalize, or drops the job
            elif job.taken and not job.done:
                job.wait_for_writer()
                job.finalize()
            if not job.done:
                job.drop("its request was never scheduled on an AsyncCallsQueue", worker_may_run=True)

    def _in_flight_iterations(self) -> set[int]:
        """Iterations of async saves not yet finalized (their unpublished files are in use)."""
        return {job.iteration for job in self._pending}

    # -- find_latest ---------------------------------------------------------------------------
    def find_latest(self) -> int:
        """Newest iteration every rank can load (-1 if none): a save of which every owner rank's
        part is held by at least one rank. It reads the header of every part, and starts reading
        this rank's newest own part whole in a background thread that load then uses (so a
        restart reads it once, and the read overlaps the planning and the sending of replicas);
        a part's data is verified when a load reads it (a damaged one is then never used, see
        load). Collective: a fixed number of small all_reduces whatever the number of
        files or ranks (:mod:`tasd.managers.recovery`: about W/4 bytes per rank, 8 more per lost
        rank).
        Parts that fail these checks, or belong to another session (or, with the default session,
        another job), are skipped. Raises ReplicationMismatchError on every
        rank when that iteration was saved with other replication settings. Finalizes pending async
        saves first (see save)."""
        self._settle(keep=0)
        self.wait_for_cleanup()
        error: BaseException | None = None
        held: dict[tuple[int, str], Holding] = {}
        # Reading the own part (most of a restart) overlaps the creation of tasd's groups, which
        # must happen on this thread: the reader thread touches files and this manager's records only.
        with ThreadPoolExecutor(1, thread_name_prefix="tasd-find") as reader:
            found = reader.submit(self._advertised_parts)
            try:
                self._groups_ready()
            finally:
                try:
                    held = found.result()
                except Exception as e:
                    error = e
        self._agree_or_raise(error, 0, "find_latest")
        self._prepare_exchange()
        self._held = {(it, int(sid, 16)): h for (it, sid), h in held.items()}
        self._excluded = set()
        return self._choose()

    def _choose(self) -> int:
        """Plan the load (collective, :func:`recovery.choose`) from what this rank holds, less the
        parts found damaged since find_latest; returns the chosen iteration (-1: none)."""
        mine = {}
        for key, holding in self._held.items():
            owners = {o: v for o, v in holding.owners.items() if (*key, self.rank, o) not in self._excluded}
            if owners:
                mine[key] = Holding(owners, holding.replication)
        group = self._groups_ready()

        def reduce(values, op):
            try:
                return collectives.all_reduce(values, op, group)
            except Exception as e:
                raise PeerUnreachableError(f"find_latest: rank {self.rank} could not reach the other ranks "
                                           f"(a peer died or timed out): {e}") from e
        chosen = recovery.choose(mine, self.rank, self.world_size, self.replication, reduce)
        if chosen.unrecoverable:
            it, owners = chosen.unrecoverable
            logger.warning("rank %d: iteration %d cannot be restored: no rank holds the part of %d rank(s) %s", self.rank,
                           it, len(owners), owners[:16])
        if chosen.iteration >= 0 and chosen.mismatch:
            raise ReplicationMismatchError(chosen.iteration, chosen.replication, self.replication)
        self.latest_iteration, self._latest = chosen.iteration, chosen
        logger.info("rank %d: latest complete iteration is %d", self.rank, chosen.iteration)
        return chosen.iteration

    # -- load ----------------------------------------------------------------------------------
    def load(self) -> tuple[TensorAwareStateDict, CkptID]:
        """Load this rank's part of the latest iteration; a rank that lost it gets it from a peer
        holding a replica (holders of a verified copy first; senders spread so no rank serves
        many). Every part is read once, where it is needed, and reading verifies it: a part found
        damaged then is never used, and the load is planned again without it (another holder, or
        the newest older complete checkpoint: the iteration in the returned ckpt_id says which).
        Calls find_latest first unless it ran since the last save. Collective. Raises on every
        rank if any rank fails: NoReplicasAvailableError when some rank's part exists nowhere,
        CheckpointingException when there is no checkpoint at all, or when damaged parts leave
        none. May be called more than once. Finalizes pending async saves first (see save)."""
        self._settle(keep=0)
        self.wait_for_cleanup()
        if self._latest is None:
            self.find_latest()
        damaged: dict[tuple, str] = {}  # parts found damaged by this load -> why
        while True:
            latest = self._latest
            if latest.iteration < 0:
                if damaged:
                    details = "; ".join(f"rank {h}'s copy of rank {o}'s part of iteration {it}: {why}"
                                        for (it, _, h, o), why in sorted(damaged.items()))
                    raise CheckpointingException(f"load failed: part(s) found damaged on rank(s) "
                                                 f"{sorted({k[2] for k in damaged})}: {details}; no other copy "
                                                 "and no older complete checkpoint is left")
                if latest.unrecoverable:
                    raise NoReplicasAvailableError(*latest.unrecoverable)
                raise CheckpointingException(f"no checkpoint to load in session {self.session_id!r}")
            outcome = self._load_once(latest)
            if not isinstance(outcome, dict):
                return outcome
            new = {k: v for k, v in outcome.items() if k not in damaged}
            if not new:  # cannot happen: a damaged part is excluded from every later plan
                raise CheckpointingException(f"load of iteration {latest.iteration}: damaged parts reported twice")
            damaged.update(new)
            self._excluded.update(new)
            self._choose()
            logger.warning("rank %d: load of iteration %d found damaged part(s) %s; planning again (iteration %d)",
                           self.rank, latest.iteration, sorted(new), self._latest.iteration)

    def _load_once(self, latest: recovery.Chosen) -> tuple[TensorAwareStateDict, CkptID] | dict[tuple, str]:
        """One attempt at loading ``latest`` (collective): the loaded state and ckpt_id, or the
        damaged parts ((iteration, save id, holder, owner) -> why) that some rank found, agreed by
        every rank."""
        iteration, save_id = latest.iteration, identity.save_id(latest.save_id)
        what = f"load of iteration {iteration}"
        needs, plan = set(latest.needs), latest.plan
        error: BaseException | None = None
        damaged: list[list] = []  # [iteration, save_id, holder, owner] this rank found damaged
        sd, outgoing, closers, aborted = None, {}, [], False
        # Parts move first: this rank's own part is still being read in the background meanwhile
        # (find_latest started it), and is decoded once its peers have what they need from it.
        try:
            for t in plan:
                if t.src == self.rank and error is None:
                    try:
                        outgoing[t.owner], close = self._open_outgoing(iteration, t.owner, save_id)
                        closers.append(close)
                    except CorruptCheckpointError as e:
                        error = e
                        damaged.append([iteration, save_id, self.rank, t.owner])
        except Exception as e:
            error = e
        if plan:  # the ranks of its transfers take part; one that failed to open a part says so before data moves
            try:
                received = exchange_parts(plan, outgoing, self.repl_strategy.exchange_groups, failure=error)
                if self.rank in needs:
                    sd = self._load_part(iteration, received[self.rank].decode(
                        f"part of rank {self.rank} received for iteration {iteration}"))
            except ExchangeAborted:  # a peer's failure or damaged part: it reports it in the agreement below
                aborted = True
            except TransferDamaged as e:  # read by its holder, or validated here, as it moved
                error = error or e
                damaged += [[iteration, save_id, t.src, t.owner] for t in e.transfers]
            except Exception as e:
                error = error or e
            finally:
                for close in closers:
                    close()
        if self.rank not in needs:
            try:
                sd = self._load_part(iteration, self._read_part(iteration, self.rank, save_id))
            except CorruptCheckpointError as e:
                error = error or e
                damaged.append([iteration, save_id, self.rank, self.rank])
            except Exception as e:
                error = error or e
        if sd is None and error is None and not damaged and not aborted:
            error = NoReplicasAvailableError(iteration, [self.rank])
        # 2: a failure (raise everywhere), 1: damaged parts only (plan again), 0: loaded
        real = error if error is not None and not damaged else None
        real, failures, worst = agree(real, iteration, what, self._groups_ready(),
                                      extra=2 if real is not None else 1 if damaged else 0)
        if worst == 2:
            raise_agreed(failures, self.rank, real, what)
        if worst == 1:  # which owners' parts were found damaged (a bitmap) and why (a few ranks' words)
            group = self._groups_ready()
            try:
                owners = collectives.bitmap_ranks(collectives.all_reduce(
                    collectives.rank_bitmap([d[3] for d in damaged], self.world_size), "bor", group), self.world_size)
                why = collectives.gather_failures(error if damaged else None, group)
            except Exception as e:
                raise PeerUnreachableError(f"{what}: rank {self.rank} could not reach the other ranks: {e}") from e
            source = {t.owner: t.src for t in plan}  # a part not planned to move was read by its owner
            found = {}
            for o in owners:
                holder = source.get(o, o)
                text = why.get(holder, why.get(o, collectives.NOT_GATHERED))
                found[(iteration, latest.save_id, holder, o)] = text
            return found
        if plan:
            logger.info("rank %d: iteration %d restored with %d part(s) fetched from peers: %s",
                        self.rank, iteration, len(plan), [(t.owner, t.src) for t in plan])
        return sd, (iteration, self.rank, self.session_id)

    def _load_part(self, iteration: int, part: LoadedPart) -> TensorAwareStateDict:
        owner = part.header.meta.owner_rank
        sd = part.hollow
        if not isinstance(sd, TensorAwareStateDict) or not sd.is_hollow:
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration} does not hold a hollow "
                                         f"TensorAwareStateDict (got {type(sd).__name__})")
        try:
            sd.insert_tensors(part.tensors())
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep to walk
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration}: {e}") from e
        return sd
