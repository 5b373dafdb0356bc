"""Fully parallel saves and loads of :mod:`tasd.mcore`: which rank keeps each replicated shard, and
how a rank gets the shards it did not keep from the ranks that did.

Everything here is collective over the *parallelization group* (Megatron passes its data-parallel
group) and runs on tasd's own gloo groups among its ranks, never on the training's
communicators (which may be NCCL, and whose failure would take the training down with them):

- metadata (which shards a rank has, which it misses, and any local failure) is gathered as JSON
  bytes with two all_reduces on the :func:`~tasd.managers.collectives.agreement_group` of the
  parallelization group's ranks (a tree of at most 8-rank groups): nothing received from a peer is
  ever unpickled;
- shards move with :func:`tasd.managers.exchange.exchange_parts` on a two-rank
  :class:`~tasd.managers.subgroups.Subgroup` per pair of ranks that exchange: everything one rank
  sends another is packed into one encoded part (its hollow is the list of shard ids, its data the
  tensors), so a pair costs a fixed number of point-to-point operations whatever the number of
  tensors, and the receiver checks the part's checksums before using it.

Which rank keeps a shard is megatron-core's own choice: its greedy
``distribute_shards_to_ranks``, fed the same inputs as ``determine_main_replica_uniform_distribution``
with ``ignore_groups=True`` (what megatron-core's fully parallel local checkpoints use). That
helper itself gathers pickled ShardedTensors with ``all_gather_object`` on the training's group,
so tasd gathers plain metadata on its own groups and calls the assignment step only.

A failure on one rank (bad input, a failed read or transfer) becomes an error on every rank of the
group: local failures travel with the gathered metadata, exchange failures are agreed afterwards
(:func:`tasd.managers.agreement.agree_or_raise`); every wait is bounded by the job's timeout.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingException as _MegatronCheckpointingException
from megatron.core.dist_checkpointing.exchange_utils import distribute_shards_to_ranks

from tasd.managers import collectives
from tasd.managers.agreement import agree_or_raise, raise_agreed
from tasd.managers.errors import CheckpointingException, PeerUnreachableError
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts
from tasd.managers.fileformat import PartMeta, dtype_name, encode_prefix
from tasd.managers.subgroups import GroupTree, subgroups
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, Staged, stage

logger = logging.getLogger(__name__)

#: A shard's identity, as megatron-core's ``_sharded_tensor_shard_id``:
#: (key, global_offset, (flattened start, stop) or None).
ShardId = tuple
#: Purpose of the two-rank groups that move shards (see :func:`tasd.managers.subgroups.name`).
PAIR_PURPOSE = "mcore-fp"
#: How many problems an error message lists.
SHOWN = 8


def describe(sid: ShardId) -> str:
    """A shard id as text for error messages: ``'key' at offset (0, 4)``."""
    flat = "" if sid[2] is None else f", flattened range {sid[2][0]}:{sid[2][1]}"
    return f"{sid[0]!r} at offset {tuple(sid[1])}{flat}"


def _encode_id(sid: ShardId) -> list:
    return [sid[0], list(sid[1]), None if sid[2] is None else list(sid[2])]


def _decode_id(x: Any) -> ShardId:
    """A shard id from gathered JSON; ValueError for anything else (peers' bytes are checked)."""
    if (not isinstance(x, list) or len(x) != 3 or not isinstance(x[0], str) or not isinstance(x[1], list)
            or not all(type(o) is int for o in x[1])
            or not (x[2] is None or (isinstance(x[2], list) and len(x[2]) == 2 and all(type(o) is int for o in x[2])))):
        raise ValueError(f"malformed shard id in gathered metadata: {x!r:.200}")
    return (x[0], tuple(x[1]), None if x[2] is None else tuple(x[2]))


def sort_key(sid: ShardId) -> tuple:
    """A total order on shard ids (None ranges first)."""
    return (sid[0], sid[1], () if sid[2] is None else sid[2])


class ShardMismatchError(CheckpointingException, _MegatronCheckpointingException):
    """The sharded state dict does not match what the checkpoint holds (a missing shard or object,
    another dtype or shape). Both tasd's and megatron-core's CheckpointingException."""


@dataclass(frozen=True)
class FullyParallelMetadata:
    """Which rank keeps each shard (``saver``: shard id -> global rank) among ``group_ranks``
    (the parallelization group's global ranks, ascending). What ``from_state_dict`` returns as
    its cacheable metadata; valid while the sharded state dict's structure and the group stay
    the same."""

    group_ranks: tuple[int, ...]
    saver: Mapping[ShardId, int]


def group_of(parallelization_group: Any) -> GroupTree | None:
    """tasd's agreement tree over the ranks of ``parallelization_group`` (a torch process group;
    None: the world), built on first use (collective over those ranks); None without
    torch.distributed (a world of one)."""
    return collectives.agreement_group(parallelization_group)


def current_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if collectives.is_distributed() else 0


def gather(payload: dict, tree: GroupTree, what: str) -> list[dict]:
    """Every member's ``payload`` (JSON-able), in the order of ``tree.ranks``: one all_reduce of the
    lengths, one of the bytes (each member fills its row). Collective over the tree. A member
    whose row is not a JSON object is reported as failed ({"error": ...})."""
    raw = json.dumps(payload, separators=(",", ":")).encode()
    n, me = tree.size, tree.index
    try:
        lengths = torch.zeros(n, dtype=torch.int64)
        lengths[me] = len(raw)
        tree.all_reduce(lengths, "max")
        rows = torch.zeros((n, int(lengths.max())), dtype=torch.uint8)
        rows[me, :len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        tree.all_reduce(rows.view(-1), "max")
    except Exception as e:
        raise PeerUnreachableError(f"{what}: rank {tree.rank} could not reach the other ranks of the "
                                   f"parallelization group (a peer died or timed out): {e}") from e
    out = []
    for i in range(n):
        try:
            row = json.loads(rows[i, :int(lengths[i])].numpy().tobytes())
            out.append(row if isinstance(row, dict) else {"error": "malformed metadata"})
        except ValueError:
            out.append({"error": "malformed metadata"})
    return out


def _raise_failures(rows: list[dict], tree: GroupTree, local: BaseException | None, what: str) -> None:
    """Raise on every member when any member reported an error in its gathered row."""
    failures = collectives.Failures({tree.ranks[i]: str(r["error"]) for i, r in enumerate(rows) if r.get("error")})
    raise_agreed(failures, tree.rank, local, what)


def _error_text(e: BaseException | None) -> str | None:
    return None if e is None else f"{type(e).__name__}: {e}"[:collectives.MAX_FAILURE_TEXT]


# -- save: who keeps which shard -----------------------------------------------------------------

def distribute(shards: Sequence[tuple[ShardId, int, bool, str, tuple]] | None, tree: GroupTree,
               local_error: BaseException | None) -> FullyParallelMetadata:
    """Decide which rank of ``tree`` keeps each shard. ``shards``: this rank's ShardedTensors as
    (shard id, size in bytes as megatron-core counts it, is main replica, dtype name, data shape);
    None with ``local_error`` when this rank failed to prepare them. Collective over the tree:
    raises on every member when any member failed, or when ranks disagree about a shard's dtype
    or shape (CheckpointingException naming the key and the ranks)."""
    what = "MCoreTensorAwareStateDict.from_state_dict (fully_parallel)"
    payload = {"error": _error_text(local_error),
               "shards": [[_encode_id(s), size, bool(main), dt, list(shape)]
                          for s, size, main, dt, shape in shards or ()]}
    rows = gather(payload, tree, what)
    _raise_failures(rows, tree, local_error, what)
    shard_to_ranks: dict[ShardId, list[int]] = defaultdict(list)
    size: dict[ShardId, int] = {}
    layout: dict[ShardId, tuple[str, list, int]] = {}
    has_main: set[ShardId] = set()
    problems = []
    for i, row in enumerate(rows):
        try:
            for enc, nbytes, main, dt, shape in row["shards"]:
                sid = _decode_id(enc)
                shard_to_ranks[sid].append(i)
                first = layout.setdefault(sid, (dt, shape, i))
                if (dt, shape) != first[:2]:
                    problems.append(f"shard {describe(sid)} is {first[0]} {first[1]} on rank {tree.ranks[first[2]]} "
                                    f"but {dt} {shape} on rank {tree.ranks[i]}")
                size.setdefault(sid, int(nbytes))
                if main:
                    has_main.add(sid)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"rank {tree.ranks[i]} sent malformed metadata ({e})")
    if problems:
        raise CheckpointingException(f"{what}: the ranks of the parallelization group disagree: "
                                     + "; ".join(problems[:SHOWN]) + (" ..." if len(problems) > SHOWN else ""))
    # ignore_groups=True: every shard present in the group is kept by one of its ranks; those
    # whose main replica lives in another group are placed last, as megatron-core does.
    assignment = distribute_shards_to_ranks(dict(shard_to_ranks), size, tree.size, set(shard_to_ranks) - has_main)
    return FullyParallelMetadata(tuple(tree.ranks), {sid: tree.ranks[i] for sid, i in assignment.items()})


def megatron_size(local_shape: Sequence[int], dtype: torch.dtype) -> int:
    """A shard's size as megatron-core's distribution counts it (its unflattened local shape)."""
    return math.prod(local_shape) * dtype.itemsize


# -- load: get the shards this rank did not keep ---------------------------------------------------

def _plan(rows: list[dict], tree: GroupTree) -> tuple[dict[tuple[int, int], list[ShardId]], list[str]]:
    """(src index, dst index) -> the shard ids src sends dst (sorted), and the problems that make
    the load impossible (a shard nobody holds, or holds with another dtype or shape). The same on
    every member: computed from the gathered rows only."""
    holders: dict[ShardId, list[tuple[int, str, list]]] = defaultdict(list)
    wants: list[tuple[int, ShardId, str, list]] = []
    problems: list[str] = []
    for i, row in enumerate(rows):
        try:
            for enc, dt, shape in row["held"]:
                holders[_decode_id(enc)].append((i, dt, shape))
            wants += [(i, _decode_id(enc), dt, shape) for enc, dt, shape in row["missing"]]
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"rank {tree.ranks[i]} sent malformed metadata ({e})")
    sent = [0] * len(rows)  # elements each rank sends so far: spread the senders
    plan: dict[tuple[int, int], list[ShardId]] = defaultdict(list)
    for dst, sid, dt, shape in sorted(wants, key=lambda w: (w[0], sort_key(w[1]))):
        fits = [h for h, hdt, hshape in holders.get(sid, ()) if (hdt, hshape) == (dt, shape)]
        if not fits:
            found = ", ".join(f"rank {tree.ranks[h]} has {hdt} {hshape}" for h, hdt, hshape in holders.get(sid, ()))
            problems.append(f"rank {tree.ranks[dst]} needs shard {describe(sid)} ({dt} {shape}) but "
                            + (found if found else "no rank of the parallelization group holds it"))
            continue
        src = min(fits, key=lambda h: (sent[h], h))
        sent[src] += math.prod(shape)
        plan[(src, dst)].append(sid)
    return plan, problems


def fetch(held: Mapping[ShardId, torch.Tensor], missing: Mapping[ShardId, tuple[torch.dtype, tuple]],
          tree: GroupTree, local_error: BaseException | None, hint: str = "") -> dict[ShardId, torch.Tensor]:
    """Get the ``missing`` shards (id -> expected dtype and shape) from the members of ``tree``
    that hold them, sending in turn what this rank ``held`` that others miss. Collective over the
    tree (each pair that exchanges also creates its two-rank group). Returns the fetched tensors
    (CPU). Raises on every member when any member had a ``local_error``, when a needed shard is
    held by no member or with another dtype or shape (ShardMismatchError naming the shard and the
    rank, followed by ``hint``), or when a transfer fails or arrives damaged."""
    what = "MCoreTensorAwareStateDict.to_state_dict (fully_parallel)"
    payload = {"error": _error_text(local_error),
               "held": [[_encode_id(s), dtype_name(t.dtype), list(t.shape)] for s, t in held.items()],
               "missing": [[_encode_id(s), dtype_name(dt), list(shape)] for s, (dt, shape) in missing.items()]}
    rows = gather(payload, tree, what)
    _raise_failures(rows, tree, local_error, what)
    plan, problems = _plan(rows, tree)
    if problems:
        raise ShardMismatchError(f"{what}: the checkpoint does not hold what the sharded state dict asks for: "
                                 + "; ".join(problems[:SHOWN]) + (" ..." if len(problems) > SHOWN else "") + hint)
    n, me, ranks = tree.size, tree.index, tree.ranks
    transfers = [Transfer(src * n + dst, ranks[src], ranks[dst]) for (src, dst) in plan if me in (src, dst)]
    fetched: dict[ShardId, torch.Tensor] = {}
    if not plan:
        return fetched
    error: BaseException | None = None
    pool = HostBufferPool(max_pooled_bytes=0, pin=False)  # freed as soon as the exchange is done
    staged: list[Staged] = []
    try:
        peers = sorted({t.dst if t.src == ranks[me] else t.src for t in transfers})
        made = subgroups([(PAIR_PURPOSE, tuple(sorted((ranks[me], p)))) for p in peers]) if peers else []
        groups = dict(zip(peers, made))
        outgoing: dict[int, OutgoingPart] = {}
        failure = None
        try:
            for (src, dst), sids in plan.items():
                if src == me:
                    s = stage([held[sid] for sid in sids], pool)
                    staged.append(s)
                    meta = PartMeta(iteration=0, owner_rank=ranks[me], world_size=dist.get_world_size())
                    prefix = encode_prefix(meta, dumps(sids), s.layouts, s.buffer)
                    outgoing[src * n + dst] = OutgoingPart(prefix, s.buffer)
        except Exception as e:  # told to the receivers before any data moves
            failure = e
        received = exchange_parts(transfers, outgoing, groups, failure=failure)
        for owner, raw in sorted(received.items()):
            src = owner // n
            part = raw.decode(f"shards sent by rank {ranks[src]} to rank {ranks[me]}")
            fetched.update(_check_received(part.hollow, part.tensors(), plan[(src, me)], missing, ranks[src],
                                           ranks[me]))
    except Exception as e:
        error = e
    finally:
        for s in staged:
            s.release()
    agree_or_raise(error, 0, what, tree)
    logger.debug("rank %d fetched %d shard(s) in %d part(s)", ranks[me], len(fetched),
                 sum(1 for t in transfers if t.dst == ranks[me]))
    return fetched


def _check_received(ids: Any, tensors: list[torch.Tensor], expected: list[ShardId],
                    missing: Mapping[ShardId, tuple[torch.dtype, tuple]], src: int,
                    me: int) -> dict[ShardId, torch.Tensor]:
    """The received shards by id, after checking they are the ones asked for, as asked."""
    if list(ids) != expected or len(tensors) != len(expected):
        raise CheckpointingException(f"rank {me} received from rank {src} other shards than it asked for: "
                                     f"{[describe(s) for s in list(ids)[:SHOWN]]}")
    for sid, t in zip(expected, tensors):
        dt, shape = missing[sid]
        if t.dtype != dt or tuple(t.shape) != tuple(shape):
            raise CheckpointingException(f"rank {me} received shard {describe(sid)} from rank {src} as {t.dtype} "
                                         f"{tuple(t.shape)}, expected {dt} {tuple(shape)}")
    return dict(zip(expected, tensors))
