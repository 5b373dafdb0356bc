"""One save in progress (:class:`SaveJob`) and what a save cost (:class:`SaveStats`).

A job carries a save from staging to publication: the hollow bytes and staged tensors of this
rank's part, the background replication (a Future) and its outcome. Synchronous saves create and
finish a job inside ``save``; asynchronous ones keep it pending until the request's finalize
function (or the manager, before a later save) finishes it. Plain data, no collectives.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from tasd.managers.fileformat import PartMeta
from tasd.staging import Staged


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


@dataclass(eq=False)
class SaveJob:
    """A save of ``meta.iteration`` by this rank, from staging to publication.

    ``owners``: owner ranks of the parts this rank stores (its own, then those it holds for
    peers). ``error``: the first local failure (staging, exchange or writes). ``replication``:
    the background exchange (None when synchronous or without replication). ``finalize_fn``: the
    function handed to the AsyncRequest (identifies the job's call in a queue). ``done``: finalized
    (published, or failed and cleaned up).
    """

    meta: PartMeta
    hollow: bytes
    staged: Staged
    started: float
    owners: list[int]
    stats: SaveStats
    own_call: tuple[Callable[..., int], tuple] | None = None  # stores the own part (see _own_part_call)
    prefix: bytes | None = None
    error: BaseException | None = None
    replication: Future | None = None
    finalize_fn: Callable[[], None] | None = None
    done: bool = False

    @property
    def iteration(self) -> int:
        return self.meta.iteration
