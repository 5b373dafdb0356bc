"""LocalCheckpointManager: parts as files on node-local storage, one directory per rank.

Directory: ``root_local_ckpt_dir / session_id / str(rank)``; file names: :mod:`tasd.managers.partnames`.
A save stores parts as ``<name>.pending`` (written as ``<name>.pending.dirty``, fsync'd, renamed)
and publishes them by renaming to ``<name>`` once every rank stored its parts; only published
names of regular files count for find_latest and load. Leftover ``.pending`` and ``.dirty`` files
of an interrupted save are removed by the next scan.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tasd.managers import collectives, identity
from tasd.managers.base_manager import BaseCheckpointManager, CkptID
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError, PeerUnreachableError
from tasd.managers.exchange import OutgoingPart
from tasd.managers.fileformat import LoadedPart, PartMeta
from tasd.managers.partio import fsync_path, open_raw_part, read_header, read_part, write_encoded, write_part
from tasd.managers.partnames import DIRTY_SUFFIX, parse_part_name, part_name
from tasd.managers.recovery import Holding
from tasd.managers.reuse import LoadedCopy, hollow_copy
from tasd.staging import HostBufferPool, Staged
from tasd.state_dict import TensorAwareStateDict

logger = logging.getLogger(__name__)


def check_session_id(session_id: Any) -> str:
    """A session id must be a plain directory name (or empty); ValueError otherwise."""
    if not isinstance(session_id, str):
        raise ValueError(f"session_id must be a string, got {type(session_id).__name__}")
    if session_id in (".", "..") or any(c in session_id for c in "/\\\0") or len(session_id) > 128:
        raise ValueError(f"session_id {session_id!r} is not a plain directory name of at most 128 characters")
    return session_id


def store_own_part(path: str, meta: PartMeta, hollow: bytes, buffer: Any, layouts: list, direct_io: bool) -> int:
    """Write this rank's own part to ``path`` (see :func:`tasd.managers.partio.write_part`); the
    async_fn of LocalCheckpointManager's async requests, run in a worker process. Returns the
    file size; raises OSError (and the part is not stored) on failure."""
    return write_part(Path(path), meta, hollow, buffer, layouts, direct_io=direct_io)


def _unlink(path: Path, what: str) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # left for the next cleanup, which scans again
        logger.warning("could not remove %s %s: %s", what, path, e)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        _unlink(path, "superseded checkpoint part")


class LocalCheckpointManager(BaseCheckpointManager):
    """Local checkpoints with NVRx semantics (see BaseCheckpointManager for the collective protocol).

    ``repl_strategy``: a tasd.managers.replication strategy (each rank then also stores its peers'
    parts, files named by their owner rank) or None. Options: ``group`` (None or the world: a
    manager works on the whole job), ``pool`` (a HostBufferPool for staging, default the
    process-wide one), ``async_pool`` (a shared-memory HostBufferPool for async saves, default the
    process-wide one), ``max_saves_in_flight`` (unfinalized async saves allowed, default 1; see
    save), ``direct_io`` (how parts are written, see below), ``keep_loaded`` (see below), ``job_id``
    (default from the environment, see :mod:`tasd.managers.identity`). Unknown options raise
    TypeError. Options must be the same on every rank.

    ``keep_loaded`` (default False: every load reads its parts again): with True a load keeps its
    result (references to the loaded tensors, their fingerprints and a copy of the hollow state
    dict; no tensor bytes are copied) so that the next load of the same checkpoint reads no file
    and moves no part between ranks. Megatron-LM calls find_latest and load twice per resume
    (common part, then everything): its manager
    (:class:`tasd.adapters.megatron.MegatronLocalCheckpointManager`) turns this on. The repeat
    load returns an equal, independent state (tensors the first result no longer references are
    handed over, the others cloned; see :mod:`tasd.managers.reuse`); it costs one hash pass over
    the tensors (and the first load another) plus one small all_reduce, and tensors changed in
    place since make it read the checkpoint again. The kept result is let go by that next load,
    by the next save, and by a find_latest that chooses another checkpoint; until then the
    loaded tensors stay referenced even when the caller drops them (host memory of one part),
    which is why it is off by default.

    ``direct_io``: None (default) writes this rank's own part through the page cache, so that a
    restart on the same node reads it from memory, and the replicas it holds for peers with
    O_DIRECT (read only when a peer lost its node: they need not take page cache); True writes
    every part with O_DIRECT, False every part through the page cache. O_DIRECT applies where the
    file system supports it (not tmpfs: there every part is in memory anyway). Measured on the
    development VM (ext4, 256 MiB per rank): a restart right after a save, in fresh processes,
    took 0.12-0.14 s after buffered writes and 0.21-0.27 s after O_DIRECT ones (``tasd bench
    --scenario restart_warm``).
    """

    def __init__(self, root_local_ckpt_dir: str | os.PathLike, session_id: str = "",
                 repl_strategy: Any = None, *, group: Any = None, pool: HostBufferPool | None = None,
                 async_pool: HostBufferPool | None = None, max_saves_in_flight: int = 1,
                 direct_io: bool | None = None, keep_loaded: bool = False, job_id: str | None = None,
                 **options: Any):
        if options:
            raise TypeError(f"unknown LocalCheckpointManager option(s): {', '.join(sorted(options))}")
        if direct_io is not None and type(direct_io) is not bool:
            raise ValueError(f"direct_io must be None, True or False, got {direct_io!r}")
        if type(keep_loaded) is not bool:
            raise ValueError(f"keep_loaded must be True or False, got {keep_loaded!r}")
        super().__init__(check_session_id(session_id), repl_strategy=repl_strategy, group=group, pool=pool,
                         async_pool=async_pool, max_saves_in_flight=max_saves_in_flight, job_id=job_id)
        self.root = Path(root_local_ckpt_dir)
        self.local_ckpt_dir = self.root / session_id / str(self.rank)
        self.direct_io = direct_io
        self.keep_loaded = keep_loaded
        # The last load's result, for the next load of the same checkpoint (see keep_loaded). Set and
        # let go only at points every rank reaches together (a load, a save, find_latest), so every
        # rank holds one or none alike.
        self._last_load: LoadedCopy | None = None
        self._loading: tuple[Any, list] | None = None  # (hollow copy, tensors) of the load under way
        # Parts this process has seen: the file identity they had then, their meta, and whether their
        # data was verified (written by this process, or read whole) or only their header checked.
        self._known: dict[Path, tuple[tuple[int, int, int], PartMeta, bool]] = {}
        # Parts found damaged when a load read them: their identity then.
        self._damaged: dict[Path, tuple[int, int, int]] = {}
        # The newest own part, read whole (and verified) in a thread started by find_latest, for the
        # next load, so that a restart reads it once and its read overlaps the census and a
        # holder's sending of replicas: (path, identity, future of the LoadedPart).
        self._prefetched: tuple[Path, tuple[int, int, int], Future] | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        # Removal of superseded parts runs in one background thread (freeing a large file costs
        # ~0.15 s/GiB); every later storage operation waits for it first.
        self._janitor: ThreadPoolExecutor | None = None
        self._pending_cleanup: Future | None = None

    # -- helpers --------------------------------------------------------------------------------
    def _direct(self, owner: int) -> bool:
        """Whether the part of ``owner`` is written with O_DIRECT (see ``direct_io``)."""
        return self.direct_io if self.direct_io is not None else owner != self.rank

    def _path(self, iteration: int, owner: int, pending: bool = False) -> Path:
        return self.local_ckpt_dir / part_name(iteration, owner, pending)

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _scan(self, remove_leftovers: bool = True) -> dict[tuple[int, int], Path]:
        """Published parts (regular files) in this rank's directory, by (iteration, owner).
        With ``remove_leftovers``, unpublished and ``.dirty`` files of saves not in flight are
        removed (left by an interrupted save). Anything else named like a part (a FIFO, a symlink)
        is skipped."""
        found: dict[tuple[int, int], Path] = {}
        if not self.local_ckpt_dir.is_dir():
            return found
        in_flight = self._in_flight_iterations()
        for entry in os.scandir(self.local_ckpt_dir):
            name = parse_part_name(entry.name)
            if name is not None and name.published:
                if entry.is_file(follow_symlinks=False):
                    found[(name.iteration, name.owner)] = Path(entry.path)
                else:
                    logger.warning("rank %d skips %s: not a regular file", self.rank, entry.path)
            elif remove_leftovers and ((name is not None and name.iteration not in in_flight) or (
                    name is None and entry.name.endswith(DIRTY_SUFFIX))):
                logger.warning("removing %s left by an interrupted save", entry.path)
                _unlink(Path(entry.path), "leftover of an interrupted save")
        return found

    # -- storage hooks ---------------------------------------------------------------------------
    def _prepare_storage(self) -> None:
        self.local_ckpt_dir.mkdir(parents=True, exist_ok=True)

    def _own_part_call(self, meta: PartMeta, hollow: bytes, staged: Staged) -> tuple[Callable[..., int], tuple]:
        path = self._path(meta.iteration, meta.owner_rank, pending=True)
        return store_own_part, (str(path), meta, hollow, staged.buffer, staged.layouts, self._direct(meta.owner_rank))

    def _write_encoded(self, meta: PartMeta, prefix: bytes, buffer: Any) -> int:
        path = self._path(meta.iteration, meta.owner_rank, pending=True)
        try:
            return write_encoded(path, len(prefix), buffer, prefix, direct_io=self._direct(meta.owner_rank))
        except OSError as e:
            raise CheckpointingException(f"rank {self.rank} could not write {path}: {e}") from e

    def _stored_size(self, meta: PartMeta) -> int | None:
        try:
            return self._path(meta.iteration, meta.owner_rank, pending=True).stat().st_size
        except FileNotFoundError:
            return None

    def _publish(self, iteration: int, metas: list[PartMeta]) -> None:
        self._prefetched = None
        owners = {meta.owner_rank for meta in metas}
        for (it, owner), path in self._scan(remove_leftovers=False).items():
            if it > iteration or (it == iteration and owner not in owners):  # left by an abandoned run
                self._known.pop(path, None)
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        for meta in metas:
            path = self._path(iteration, meta.owner_rank)
            try:
                os.rename(self._path(iteration, meta.owner_rank, pending=True), path)
            except OSError as e:
                raise CheckpointingException(f"rank {self.rank} could not publish {path}: {e}") from e
            self._known[path] = (self._identity(path), meta, True)
        fsync_path(self.local_ckpt_dir)

    def _is_unchanged(self, path: Path, identity: tuple[int, int, int] | None) -> bool:
        try:
            return identity is not None and identity == self._identity(path)
        except FileNotFoundError:
            return False

    def _known_part(self, path: Path) -> tuple[PartMeta, bool] | None:
        """(meta, data verified) of a part seen before and unchanged since, else None."""
        known = self._known.get(path)
        return known[1:] if known is not None and self._is_unchanged(path, known[0]) else None

    def _foreign(self, meta: PartMeta, iteration: int, owner: int) -> str | None:
        """Why a part with header ``meta``, named for (iteration, owner), is not one of this
        manager's checkpoints, or None when it is."""
        if (meta.iteration, meta.owner_rank) != (iteration, owner):
            return f"its header says iteration {meta.iteration} owner {meta.owner_rank}"
        if meta.world_size != self.world_size:
            return f"saved with world size {meta.world_size}, now {self.world_size}"
        if meta.session_id != self.session_id:
            return f"it belongs to session {meta.session_id!r}, not {self.session_id!r}"
        if self.session_id == "" and meta.job_id != self.job_id:
            return (f"it was saved by job {meta.job_id!r}, this is job {self.job_id!r} (pass a session_id to "
                    "load checkpoints of another job)")
        return None

    def _advertised_parts(self) -> dict[tuple[int, str], Holding]:
        """Reads the header of every part (a part's data is verified when a load reads it) and
        starts reading the newest own part whole in a thread (see ``_prefetched``). Runs in
        find_latest's reader thread while the training thread creates tasd's groups."""
        out: dict[tuple[int, str], Holding] = {}
        self._prefetched = None
        newest_own: tuple[Path, tuple[int, int, int]] | None = None
        for (iteration, owner), path in sorted(self._scan().items(), reverse=True):
            known = self._known_part(path)
            if known is None and self._is_unchanged(path, self._damaged.get(path)):
                logger.warning("rank %d skips %s: found damaged when it was last read", self.rank, path)
                continue
            if known is None:
                try:
                    identity = self._identity(path)
                    header = read_header(path)
                except (CorruptCheckpointError, OSError) as e:
                    logger.warning("rank %d skips iteration %d: %s", self.rank, iteration, e)
                    continue
                why = self._foreign(header.meta, iteration, owner)
                if why is not None:
                    logger.warning("rank %d skips %s: %s", self.rank, path, why)
                    continue
                known = (header.meta, False)
                self._known[path] = (identity, *known)
            if owner == self.rank and newest_own is None:
                newest_own = (path, self._known[path][0])
            meta, checked = known
            out.setdefault((iteration, meta.save_id), Holding({}, meta.replication)).owners[owner] = checked
        if newest_own is not None and self._kept_part(newest_own[0]):
            newest_own = None  # the next load reuses the kept result: nothing to read
        if newest_own is not None:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="tasd-prefetch")
            self._prefetched = (*newest_own, self._prefetcher.submit(read_part, newest_own[0]))
        return out

    def find_latest(self) -> int:
        latest = super().find_latest()
        if self._prefetched is not None and self._prefetched[0] != self._path(latest, self.rank):
            self._prefetched = None  # not the part load will read: do not hold its memory
        if self._last_load is not None and self._last_load.key != self._chosen_key():
            self._last_load = None  # another checkpoint was chosen: let the kept one go
        return latest

    # -- repeat loads (keep_loaded) ---------------------------------------------------------------
    def _chosen_key(self) -> tuple[int, str] | None:
        latest = self._latest
        return None if latest is None or latest.iteration < 0 else (latest.iteration, identity.save_id(latest.save_id))

    def _kept_part(self, path: Path) -> bool:
        """Whether the kept result is the checkpoint the own part at ``path`` belongs to."""
        kept, known = self._last_load, self._known.get(path)
        return kept is not None and known is not None and (known[1].iteration, known[1].save_id) == kept.key

    def save(self, ta_state_dict: TensorAwareStateDict, iteration: int, is_async: bool = False) -> Any:
        self._last_load = None  # lets the kept load go before staging
        return super().save(ta_state_dict, iteration, is_async=is_async)

    save.__doc__ = BaseCheckpointManager.save.__doc__

    def load(self) -> tuple[TensorAwareStateDict, CkptID]:
        """See BaseCheckpointManager.load. With ``keep_loaded`` a load of the checkpoint the
        previous load returned (same iteration and save, chosen by find_latest again or not
        searched since) is served from what that load kept, on every rank or on none (one small
        all_reduce decides): no file is read and no part moves. Collective."""
        self._settle(keep=0)
        self.wait_for_cleanup()
        if self._latest is None:
            self.find_latest()
        again = self._load_again()
        if again is not None:
            return again
        self._loading = None
        try:
            sd, ckpt_id = super().load()
            loaded = self._loading
        finally:
            self._loading = None
        if self.keep_loaded and loaded is not None and self._chosen_key() is not None:
            self._last_load = LoadedCopy(self._chosen_key(), ckpt_id, *loaded)
        return sd, ckpt_id

    def _load_again(self) -> tuple[TensorAwareStateDict, CkptID] | None:
        """The kept result, when every rank can serve this load from its own (collective when a
        result is kept, which is the same on every rank); None otherwise (the kept one is let go)."""
        kept, self._last_load = self._last_load, None
        if kept is None:
            return None
        sd = None
        try:
            if kept.key == self._chosen_key() and kept.intact():
                sd = kept.take()
        except Exception:  # reuse is an optimization: read the checkpoint instead
            logger.warning("rank %d: could not reuse the last load; reading the checkpoint again", self.rank,
                           exc_info=True)
            sd = None
        try:
            everyone = collectives.all_reduce(torch.tensor([int(sd is not None)], dtype=torch.int64), "min",
                                              self._groups_ready())
        except Exception as e:
            raise PeerUnreachableError(f"load: rank {self.rank} could not reach the other ranks (a peer died or "
                                       f"timed out): {e}") from e
        if not int(everyone[0]):
            logger.info("rank %d: the last load cannot be reused on every rank; reading the checkpoint", self.rank)
            return None
        logger.info("rank %d: iteration %d served from the last load (no file read, no part moved)", self.rank,
                    kept.key[0])
        return sd, kept.ckpt_id

    def _load_part(self, iteration: int, part: LoadedPart) -> TensorAwareStateDict:
        hollow = hollow_copy(part.hollow) if self.keep_loaded else None
        sd = super()._load_part(iteration, part)
        if hollow is not None:
            self._loading = (hollow, part.tensors())
        return sd

    def _check_save_id(self, path: Path, meta: PartMeta, save_id: str) -> None:
        if meta.save_id != save_id:
            raise CorruptCheckpointError(f"checkpoint file {path} belongs to save {meta.save_id}, not to save "
                                         f"{save_id} of iteration {meta.iteration} (replaced since find_latest?)")

    def _read_part(self, iteration: int, owner: int, save_id: str) -> LoadedPart:
        path = self._path(iteration, owner)
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == path and self._is_unchanged(path, prefetched[1]):
            with self._reading(path, prefetched[1]):  # handed out once: a second load reads the file again
                part = prefetched[2].result()
            self._known[path] = (prefetched[1], part.header.meta, True)
        else:
            part = self._read(path, read_part)
        self._check_save_id(path, part.header.meta, save_id)
        return part

    def _open_outgoing(self, iteration: int, owner: int, save_id: str) -> tuple[OutgoingPart, Callable[[], None]]:
        path = self._path(iteration, owner)
        with self._reading(path) as identity:
            reader = open_raw_part(path)
        try:
            self._check_save_id(path, reader.header.meta, save_id)
        except BaseException:
            reader.close()
            raise

        def fill(start: int, stop: int) -> None:
            with self._reading(path, identity):
                reader.fill(start, stop)
            if reader.verified:
                self._known[path] = (identity, reader.header.meta, True)
        return OutgoingPart(reader.prefix, reader.buffer, fill), reader.close

    def _read(self, path: Path, reader: Callable[[Path], Any]) -> Any:
        """``reader(path)``: a part read whole, all its checksums verified (remembered as such
        while the file is unchanged). See :meth:`_reading` for errors."""
        with self._reading(path) as identity:
            part = reader(path)
        self._known[path] = (identity, part.header.meta, True)
        return part

    @contextlib.contextmanager
    def _reading(self, path: Path, identity: tuple[int, int, int] | None = None) -> Iterator[tuple[int, int, int]]:
        """Around reading ``path`` (whose identity it yields): OSError becomes
        CheckpointingException naming the rank; CorruptCheckpointError marks the file damaged (not
        advertised again while it is unchanged) and propagates."""
        try:
            if identity is None:
                identity = self._identity(path)
            yield identity
        except OSError as e:
            raise CheckpointingException(f"rank {self.rank} could not read {path}: {e}") from e
        except CorruptCheckpointError:
            self._known.pop(path, None)
            self._damaged[path] = identity
            raise

    def _remove_iteration(self, iteration: int) -> None:
        if not self.local_ckpt_dir.is_dir():
            return
        for entry in os.scandir(self.local_ckpt_dir):
            name = parse_part_name(entry.name)
            if name is not None and name.iteration == iteration:
                _unlink(Path(entry.path), "part of a failed save")
                self._known.pop(Path(entry.path), None)

    def _cleanup(self, keep: int) -> None:
        doomed = [path for (iteration, _), path in self._scan().items() if iteration != keep]
        for path in doomed:
            self._known.pop(path, None)
        if doomed:
            if self._janitor is None:
                self._janitor = ThreadPoolExecutor(1, thread_name_prefix="tasd-cleanup")
            self._pending_cleanup = self._janitor.submit(_unlink_all, doomed)

    def wait_for_cleanup(self) -> None:
        pending, self._pending_cleanup = self._pending_cleanup, None
        if pending is not None:
            pending.result()
