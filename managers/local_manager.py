"""LocalCheckpointManager: parts as files on node-local storage, one directory per rank.

Directory: ``root_local_ckpt_dir / session_id / str(rank)``; file of owner rank ``o`` at iteration
``i``: ``iter_{i:07d}_{o}_local.tasd``. A save stores parts as ``<name>.pending`` (written as
``<name>.pending.dirty``, fsync'd, renamed) and publishes them by renaming to ``<name>`` once every
rank stored its parts; only published names count for find_latest and load. Leftover ``.pending``
and ``.dirty`` files of an interrupted save are removed by the next scan.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tasd.managers.base_manager import Advertised, BaseCheckpointManager
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.fileformat import DIRTY_SUFFIX, LoadedPart, PartMeta, RawPart
from tasd.managers.partio import fsync_dir, read_part, read_raw_part, verify_part, write_encoded, write_part
from tasd.staging import HostBufferPool, Staged

logger = logging.getLogger(__name__)

_PART_RE = re.compile(r"^iter_(\d{7,})_(\d+)_local\.tasd((?:\.pending)?(?:\.dirty)?)$")
PENDING_SUFFIX = ".pending"


def part_name(iteration: int, owner: int) -> str:
    return f"iter_{iteration:07d}_{owner}_local.tasd"


def check_session_id(session_id: Any) -> str:
    """A session id must be a plain directory name (or empty); ValueError otherwise."""
    if not isinstance(session_id, str):
        raise ValueError(f"session_id must be a string, got {type(session_id).__name__}")
    if session_id in (".", "..") or any(c in session_id for c in "/\\\0"):
        raise ValueError(f"session_id {session_id!r} is not a plain directory name")
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
    parts, files named by their owner rank) or None. Options: ``group`` (process group, default the
    world), ``pool`` (a HostBufferPool for staging, default the process-wide one), ``async_pool``
    (a shared-memory HostBufferPool for async saves, default the process-wide one),
    ``max_saves_in_flight`` (unfinalized async saves allowed, default 1; see save), ``direct_io``
    (write the bulk with O_DIRECT where supported, default True). Unknown options raise TypeError.
    """

    def __init__(self, root_local_ckpt_dir: str | os.PathLike, session_id: str = "",
                 repl_strategy: Any = None, *, group: Any = None, pool: HostBufferPool | None = None,
                 async_pool: HostBufferPool | None = None, max_saves_in_flight: int = 1,
                 direct_io: bool = True, **options: Any):
        if options:
            raise TypeError(f"unknown LocalCheckpointManager option(s): {', '.join(sorted(options))}")
        super().__init__(check_session_id(session_id), repl_strategy=repl_strategy, group=group, pool=pool,
                         async_pool=async_pool, max_saves_in_flight=max_saves_in_flight)
        self.root = Path(root_local_ckpt_dir)
        self.local_ckpt_dir = self.root / session_id / str(self.rank)
        self.direct_io = direct_io
        # Parts this process wrote or fully verified: the file identity they had then, and the
        # replication settings in their header.
        self._verified: dict[Path, tuple[tuple[int, int, int], dict | None]] = {}
        # The newest own part, read whole while find_latest verified it, kept for the next load so
        # that a restart reads it once: (path, identity, part).
        self._prefetched: tuple[Path, tuple[int, int, int], LoadedPart] | None = None
        # Removal of superseded parts runs in one background thread (freeing a large file costs
        # ~0.15 s/GiB); every later storage operation waits for it first.
        self._janitor: ThreadPoolExecutor | None = None
        self._pending_cleanup: Future | None = None

    # -- helpers --------------------------------------------------------------------------------
    def _path(self, iteration: int, owner: int) -> Path:
        return self.local_ckpt_dir / part_name(iteration, owner)

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _scan(self) -> dict[tuple[int, int], Path]:
        """Published parts in this rank's directory, by (iteration, owner). Unpublished and
        ``.dirty`` files of saves not in flight are removed (left by an interrupted save)."""
        found: dict[tuple[int, int], Path] = {}
        if not self.local_ckpt_dir.is_dir():
            return found
        in_flight = self._in_flight_iterations()
        for entry in os.scandir(self.local_ckpt_dir):
            m = _PART_RE.match(entry.name)
            if m and not m.group(3):
                found[(int(m.group(1)), int(m.group(2)))] = Path(entry.path)
            elif (m and int(m.group(1)) not in in_flight) or (not m and entry.name.endswith(DIRTY_SUFFIX)):
                logger.warning("removing %s left by an interrupted save", entry.path)
                _unlink(Path(entry.path), "leftover of an interrupted save")
        return found

    # -- storage hooks ---------------------------------------------------------------------------
    def _pending_path(self, iteration: int, owner: int) -> Path:
        return self.local_ckpt_dir / (part_name(iteration, owner) + PENDING_SUFFIX)

    def _own_part_call(self, meta: PartMeta, hollow: bytes, staged: Staged) -> tuple[Callable[..., int], tuple]:
        self.local_ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self._pending_path(meta.iteration, meta.owner_rank)
        return store_own_part, (str(path), meta, hollow, staged.buffer, staged.layouts, self.direct_io)

    def _write_encoded(self, meta: PartMeta, prefix: bytes, buffer: Any) -> int:
        self.local_ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self._pending_path(meta.iteration, meta.owner_rank)
        try:
            return write_encoded(path, len(prefix), buffer, prefix, direct_io=self.direct_io)
        except OSError as e:
            raise CheckpointingException(f"rank {self.rank} could not write {path}: {e}") from e

    def _stored_size(self, meta: PartMeta) -> int | None:
        try:
            return self._pending_path(meta.iteration, meta.owner_rank).stat().st_size
        except FileNotFoundError:
            return None

    def _publish(self, iteration: int, owners: list[int]) -> None:
        self._prefetched = None
        for owner in owners:
            path = self._path(iteration, owner)
            try:
                os.rename(self._pending_path(iteration, owner), path)
            except OSError as e:
                raise CheckpointingException(f"rank {self.rank} could not publish {path}: {e}") from e
            self._verified[path] = (self._identity(path), self.replication)
        fsync_dir(self.local_ckpt_dir)

    def _is_unchanged(self, path: Path, identity: tuple[int, int, int] | None) -> bool:
        try:
            return identity is not None and identity == self._identity(path)
        except FileNotFoundError:
            return False

    def _is_verified(self, path: Path) -> bool:
        known = self._verified.get(path)
        return known is not None and self._is_unchanged(path, known[0])

    def _advertised_parts(self) -> dict[int, Advertised]:
        out: dict[int, Advertised] = {}
        self._prefetched = None
        for (iteration, owner), path in sorted(self._scan().items(), reverse=True):
            if not self._is_verified(path):
                try:
                    if owner == self.rank and self._prefetched is None:
                        part = read_part(path)  # verifies, and load will not read it again
                        header = part.header
                        self._prefetched = (path, self._identity(path), part)
                    else:
                        header = verify_part(path)
                except (CorruptCheckpointError, OSError) as e:
                    logger.warning("rank %d skips iteration %d: %s", self.rank, iteration, e)
                    continue
                meta = header.meta
                if (meta.iteration, meta.owner_rank) != (iteration, owner):
                    logger.warning("rank %d skips %s: its header says iteration %d owner %d",
                                   self.rank, path, meta.iteration, meta.owner_rank)
                    continue
                if meta.world_size != self.world_size:
                    logger.warning("rank %d skips %s: saved with world size %d, now %d",
                                   self.rank, path, meta.world_size, self.world_size)
                    continue
                self._verified[path] = (self._identity(path), meta.replication)
            out.setdefault(iteration, Advertised([], self._verified[path][1])).owners.append(owner)
        return out

    def find_latest(self) -> int:
        latest = super().find_latest()
        if self._prefetched is not None and self._prefetched[0] != self._path(latest, self.rank):
            self._prefetched = None  # not the part load will read: do not hold its memory
        return latest

    def _read_part(self, iteration: int, owner: int) -> LoadedPart:
        path = self._path(iteration, owner)
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == path and self._is_unchanged(path, prefetched[1]):
            return prefetched[2]  # handed out once: a second load reads the file again
        return self._read(path, read_part)

    def _read_raw_part(self, iteration: int, owner: int) -> RawPart:
        return self._read(self._path(iteration, owner), read_raw_part)

    def _read(self, path: Path, reader: Callable[[Path], Any]) -> Any:
        try:
            return reader(path)
        except OSError as e:
            raise CheckpointingException(f"rank {self.rank} could not read {path}: {e}") from e

    def _remove_iteration(self, iteration: int) -> None:
        if not self.local_ckpt_dir.is_dir():
            return
        for entry in os.scandir(self.local_ckpt_dir):
            m = _PART_RE.match(entry.name)
            if m and int(m.group(1)) == iteration:
                _unlink(Path(entry.path), "part of a failed save")
                self._verified.pop(Path(entry.path), None)

    def _cleanup(self, keep: int) -> None:
        doomed = [path for (iteration, _), path in self._scan().items() if iteration != keep]
        for path in doomed:
            self._verified.pop(path, None)
        if doomed:
            if self._janitor is None:
                self._janitor = ThreadPoolExecutor(1, thread_name_prefix="tasd-cleanup")
            self._pending_cleanup = self._janitor.submit(_unlink_all, doomed)

    def wait_for_cleanup(self) -> None:
        pending, self._pending_cleanup = self._pending_cleanup, None
        if pending is not None:
            pending.result()

    def _newest_local_iteration(self) -> int:
        return max((it for it, owner in self._scan() if owner == self.rank), default=-1)
