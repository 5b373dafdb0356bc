"""BaseCheckpointManager: the collective save / find_latest / load protocol over abstract storage.

Subclasses say where parts live (``_write_part``, ``_advertised_parts``, ``_read_part``,
``_remove_part``, ``_cleanup``); this class decides when, and makes every rank agree: a failure on
one rank becomes an error on every rank, and an iteration is published (older ones removed) only
after every rank's part is durable.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tasd.managers import collectives
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.fileformat import LoadedPart, PartMeta
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
    write_s: float = 0.0
    finalize_s: float = 0.0
    total_s: float = 0.0
    tensor_bytes: int = 0
    file_bytes: int = 0
    extra: dict = field(default_factory=dict)


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
    """Collective checkpoint protocol. All ranks of ``group`` call save, find_latest and load together."""

    def __init__(self, session_id: str = "", group: Any = None, pool: HostBufferPool | None = None):
        self.session_id = session_id
        self.group = group
        self.rank, self.world_size = collectives.rank_and_size(group)
        self.pool = pool or default_pool()
        self.latest_iteration: int | None = None  # newest iteration every rank can load, once known
        self.last_save = SaveStats()

    # -- storage, implemented by subclasses (local operations, never collective) ---------------
    @abstractmethod
    def _write_part(self, meta: PartMeta, hollow: bytes, staged: Staged) -> int:
        """Durably store this rank's part; return its size in bytes."""

    @abstractmethod
    def _advertised_parts(self) -> dict[int, list[int]]:
        """Iteration -> owner ranks whose verified parts this rank holds for the current world size."""

    @abstractmethod
    def _read_part(self, iteration: int, owner: int) -> LoadedPart:
        """Read and verify a part this rank holds."""

    @abstractmethod
    def _remove_part(self, iteration: int, owner: int) -> None:
        """Remove a part (missing is fine)."""

    @abstractmethod
    def _cleanup(self, keep: int) -> None:
        """Remove every part of every iteration other than ``keep``; may finish in the background
        (see wait_for_cleanup)."""

    def wait_for_cleanup(self) -> None:
        """Wait until parts superseded by the last save are removed. Not collective; save,
        find_latest and load call it first."""

    @abstractmethod
    def _newest_local_iteration(self) -> int:
        """Newest iteration with a complete part of this rank on storage (-1 if none), unverified."""

    # -- the protocol --------------------------------------------------------------------------
    def _meta(self, iteration: int) -> PartMeta:
        return PartMeta(iteration, self.rank, self.world_size, self.session_id, None)

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

    def save(self, ta_state_dict: TensorAwareStateDict, iteration: int, is_async: bool = False) -> None:
        """Save this rank's part of ``iteration``. Collective.

        A point-in-time snapshot: ``ta_state_dict`` is left as it was, and changing its tensors after
        save returns does not change what was written. On success the iteration is published and
        older ones are removed; on failure on any rank, every rank removes what it wrote for
        ``iteration``, the previous checkpoint stays, and every rank raises (the failing rank its own
        TypeError/ValueError/CheckpointingException, the others a CheckpointingException naming it).
        """
        if is_async:
            raise ValueError("is_async=True is not supported yet: asynchronous saves are not implemented")
        self.wait_for_cleanup()
        stats = SaveStats(iteration=iteration)
        t0 = time.perf_counter()
        error: BaseException | None = None
        written = False
        try:
            self._check_save_args(ta_state_dict, iteration)
            hollow, staged = self._snapshot(ta_state_dict)
            t1 = time.perf_counter()
            stats.stage_s, stats.tensor_bytes = t1 - t0, staged.buffer.numel()
            try:
                written = True
                stats.file_bytes = self._write_part(self._meta(iteration), hollow, staged)
            finally:
                staged.release()
            stats.write_s = time.perf_counter() - t1
        except Exception as e:
            error = e
            logger.debug("rank %d: save of iteration %s failed locally: %s", self.rank, iteration, e)
        t2 = time.perf_counter()
        error, failures = self._agree(error, iteration if type(iteration) is int else -1)
        if failures:
            if written:
                self._remove_part(iteration, self.rank)
            _raise_agreed(failures, self.rank, error, f"save of iteration {iteration}")
        self.latest_iteration = iteration
        self._cleanup(keep=iteration)
        stats.finalize_s = time.perf_counter() - t2
        stats.total_s = time.perf_counter() - t0
        self.last_save = stats
        logger.info("rank %d saved iteration %d: %d bytes, stage %.3fs write %.3fs finalize %.3fs",
                    self.rank, iteration, stats.file_bytes, stats.stage_s, stats.write_s, stats.finalize_s)

    def _agree(self, error: BaseException | None, iteration: int) -> tuple[BaseException | None, dict[int, str]]:
        """One all_reduce: did any rank fail, and did all ranks pass the same iteration? Returns the
        local error (a mismatch becomes one on every rank) and the failures of all ranks."""
        flag, hi, neg_lo = collectives.all_reduce_max([1 if error else 0, iteration, -iteration], self.group)
        if error is None and hi != -neg_lo:
            error = CheckpointingException(f"ranks passed different iterations ({-neg_lo} to {hi}); "
                                           f"rank {self.rank} passed {iteration}")
        if flag or hi != -neg_lo:
            return error, collectives.gather_failures(error, self.group)
        return error, {}

    def find_latest(self) -> int:
        """Newest iteration every rank can load (-1 if none). Collective: two all_gathers of a small
        JSON list, whatever the number of files. Parts that fail verification are skipped."""
        self.wait_for_cleanup()
        error: BaseException | None = None
        parts: dict[int, list[int]] = {}
        try:
            parts = self._advertised_parts()
        except Exception as e:
            error = e
        gathered = collectives.all_gather_json(
            {"error": None if error is None else f"{type(error).__name__}: {error}",
             "parts": {str(k): v for k, v in parts.items()}}, self.group)
        failures = {r: g["error"] for r, g in enumerate(gathered) if g["error"]}
        _raise_agreed(failures, self.rank, error, "find_latest")
        holders: dict[int, set[int]] = {}
        for g in gathered:
            for it, owners in g["parts"].items():
                holders.setdefault(int(it), set()).update(owners)
        complete = [it for it, owners in holders.items() if owners >= set(range(self.world_size))]
        self.latest_iteration = max(complete, default=-1)
        logger.info("rank %d: latest complete iteration is %d", self.rank, self.latest_iteration)
        return self.latest_iteration

    def load(self) -> tuple[TensorAwareStateDict, CkptID]:
        """Load this rank's part of the latest iteration (find_latest is called first if it has not
        been). Collective. Raises CheckpointingException on every rank if any rank fails, and when
        there is no checkpoint. May be called more than once."""
        self.wait_for_cleanup()
        if self.latest_iteration is None:
            self.find_latest()
        iteration = self.latest_iteration
        if iteration is None or iteration < 0:
            raise CheckpointingException(f"no checkpoint to load in session {self.session_id!r}")
        error: BaseException | None = None
        sd = None
        try:
            sd = self._load_part(iteration, self.rank)
        except Exception as e:
            error = e
        error, failures = self._agree(error, iteration)
        _raise_agreed(failures, self.rank, error, f"load of iteration {iteration}")
        return sd, (iteration, self.rank, self.session_id)

    def _load_part(self, iteration: int, owner: int) -> TensorAwareStateDict:
        part = self._read_part(iteration, owner)
        sd = part.hollow
        if not isinstance(sd, TensorAwareStateDict) or not sd.is_hollow:
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration} does not hold a hollow "
                                         f"TensorAwareStateDict (got {type(sd).__name__})")
        try:
            sd.insert_tensors(part.tensors())
        except ValueError as e:
            raise CorruptCheckpointError(f"part of rank {owner} at iteration {iteration}: {e}") from e
        return sd
