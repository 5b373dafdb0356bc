"""Moving whole checkpoint parts between ranks: the exchange layer over torch.distributed.

A part travels as two buffers: its *prefix* (preamble, header with checksums, hollow state dict,
padding: :func:`tasd.managers.fileformat.encode_prefix`) and its data section (the staging buffer
itself). So a part costs a fixed number of point-to-point operations whatever its tensor count:
one for its sizes, one for its receiver's ready flag, one for its prefix, one per data piece.
Receivers validate what arrives with the same checks as a file (header, hollow and chunk
checksums) before anyone uses it.

Parts live in host memory, so exchanges run on gloo groups of tasd's own among the peers that
exchange (a strategy's ``exchange_groups``: a group per clique, or per pair of ring peers), never on
the training's communicators, never through the GPU, and never on a group wider than the peers (no
rank connects to ranks it does not exchange with). The protocol is pairwise: a rank talks only to
the peers of its transfers, and there is no collective over any group. The order of an exchange,
in :func:`exchange_parts`:

1. sizes: every sender sends each of its receivers the sizes of the part (-1, -1 when it failed to
   prepare, or has a ``failure`` of its own);
2. receivers allocate their buffers;
3. ready flags: every receiver sends each of its senders 1, or 0 when it failed to allocate, has a
   ``failure`` of its own, or its sender sent -1. A transfer is *on* iff its sender prepared and its
   receiver is ready: after step 3 both of its ends know, so no rank ever waits for data that will
   not come, and a failure calls off only the failing rank's own transfers;
4. prefixes, then the data sections in pieces, of the transfers that are on, each landed piece
   hashed while the next ones are in flight; then every received part is validated.

Operations between the same two ranks are told apart by tags derived from the owner rank, so one
plan may move several parts between the same pair.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from tasd import device
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError, PeerUnreachableError
from tasd.managers.fileformat import CHUNK_BYTES, RawPart, check_checksums, chunk_checksums, parse_prefix
from tasd.managers.subgroups import Subgroup
from tasd.staging import HostBufferPool

logger = logging.getLogger(__name__)

#: Largest piece of a data section moved by one operation: a multiple of the file format's checksum
#: chunk, so each landed piece is verified while the next one is in flight.
DEFAULT_CHUNK_BYTES = 2 * CHUNK_BYTES


@dataclass(frozen=True, order=True)
class Transfer:
    """One entry of an exchange plan: ``src`` sends the part of ``owner`` to ``dst``."""

    owner: int
    src: int
    dst: int


@dataclass
class OutgoingPart:
    """A part to send: its encoded prefix and its data section (1-D uint8 host tensor).

    ``fill`` (optional): the data section is still to be read into ``buffer``; ``fill(start,
    stop)`` reads those bytes, called in order piece by piece just before each piece is sent, so
    that reading the next piece overlaps sending this one. It may raise: the piece is then sent as
    it is (its receiver must not wait for it), and the error is raised once the exchange's data
    has moved (CorruptCheckpointError as :class:`TransferDamaged`)."""

    prefix: bytes
    buffer: torch.Tensor
    fill: Callable[[int, int], None] | None = None


class ExchangeAborted(CheckpointingException):
    """Some of this rank's transfers were called off before their data moved because the rank at
    their other end failed (a sender to prepare, a receiver to allocate or with a failure of its
    own); that rank raises its own error. ``peers``: those ranks (sorted)."""

    def __init__(self, message: str, peers: Sequence[int] = ()):
        super().__init__(message)
        self.peers = sorted(peers)

    def __reduce__(self):
        return type(self), (str(self), self.peers)


class TransferDamaged(CorruptCheckpointError):
    """Parts found damaged as they moved: by their sender as it read them, or by their receiver as
    it validated them. ``transfers``: which."""

    def __init__(self, transfers: list[Transfer], message: str):
        super().__init__(message)
        self.transfers = transfers


def _tag(owner: int, kind: int) -> int:
    return owner * 4 + kind  # kind: 0 sizes, 1 prefix, 2 data, 3 ready flag


def _unreachable(rank: int, step: str, e: BaseException) -> PeerUnreachableError:
    return PeerUnreachableError(f"replica exchange ({step}): rank {rank} could not reach a peer "
                                f"(a peer died or timed out): {e}")


def _round(rank: int, step: str, ops: list[tuple[Subgroup, str, torch.Tensor, int, int]]) -> None:
    """Post ``ops`` ((group, "send" or "recv", tensor, peer, tag)) and wait for all of them, each
    bounded by its group's timeout; a gloo error (a peer died or timed out, when posting or
    waiting) as PeerUnreachableError."""
    try:
        works = [(getattr(g, op)(t, peer, tag), g) for g, op, t, peer, tag in ops]
        for work, g in works:
            work.wait(g.timeout)
    except Exception as e:
        raise _unreachable(rank, step, e) from e


def exchange_parts(plan: Sequence[Transfer], outgoing: Mapping[int, OutgoingPart], groups: Mapping[int, Subgroup],
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, pool: HostBufferPool | None = None,
                   failure: BaseException | None = None) -> dict[int, RawPart]:
    """Execute this rank's transfers of ``plan``: send the parts it is the source of (from
    ``outgoing``, keyed by owner) and return those it receives, keyed by owner, validated (not
    decoded). Transfers from a rank to itself are ignored.

    Pairwise (see the module docstring), not collective over any group: both ends of every
    transfer must call it with a plan that holds that transfer (the same plan on every rank, or
    each rank's own transfers), also a rank that failed to prepare its outgoing parts (with
    ``failure`` set); a rank in no transfer makes no call on any group (it returns ``{}``, or
    raises its ``failure``). ``groups`` maps each peer of this rank's transfers to a
    :class:`~tasd.managers.subgroups.Subgroup` holding both (a strategy's ``exchange_groups``), and
    must be symmetric: a peer's mapping gives it the same group for this rank. Received data lands
    in fresh (pageable) host memory, or in buffers acquired from ``pool`` (the caller then releases
    them; on error they are released here). No CUDA call is made: it may run in a background
    thread.

    A transfer moves iff its sender prepared and its receiver is ready. A rank with a failure
    (``failure``; or ``outgoing`` lacks a part it must send, it has no group with a peer, or the
    plan gives it the same owner's part more than once: a ValueError; or it failed to allocate a
    receive buffer) sends -1 sizes and 0 ready flags to all its peers from then on, so none of its
    transfers moves, except that a rank failing to allocate had already sent its sizes: its
    outgoing transfers still move to receivers that are ready. After the data of the transfers that
    are on has moved, this rank raises, in order of precedence: its own failure (also when a later
    step failed too); PeerUnreachableError as soon as a peer is found dead or does not answer
    within the group's timeout (at any step); what an outgoing part's ``fill`` raised
    (CorruptCheckpointError as TransferDamaged, on its sender, after sending it all) or
    TransferDamaged when a received part fails validation; ExchangeAborted (naming the peers and
    which side failed) when any of its transfers was called off by its other end. Only the ranks
    at the other end of a failing rank's transfers raise ExchangeAborted; the others complete
    theirs.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    sends = sorted({t for t in plan if t.src == rank and t.dst != rank})
    recvs = sorted({t for t in plan if t.dst == rank and t.src != rank})
    if not sends and not recvs:
        if failure is not None:
            raise failure
        return {}
    on, problem = _check(rank, sends, recvs, outgoing, groups)
    failure = failure if failure is not None else problem
    prepared = failure is None
    buffers: dict[Transfer, torch.Tensor] = {}
    received: dict[int, RawPart] = {}

    def release(bufs) -> None:
        if pool is not None:
            for buf in bufs:
                pool.release(buf)

    try:
        # 1. sizes of each part's prefix and data (-1: the sender failed to prepare)
        sizes = {t: torch.full((2,), -1, dtype=torch.int64) for t in recvs}
        _round(rank, "sizes", [
            (on[t.dst], "send", torch.tensor([len(outgoing[t.owner].prefix), outgoing[t.owner].buffer.numel()]
                                             if prepared else [-1, -1], dtype=torch.int64), t.dst, _tag(t.owner, 0))
            for t in sends if t.dst in on] + [
            (on[t.src], "recv", sizes[t], t.src, _tag(t.owner, 0)) for t in recvs if t.src in on])
        shape = {t: (int(sizes[t][0]), int(sizes[t][1])) for t in recvs}
        # 2. receive buffers (not for parts whose sender failed)
        if failure is None:
            try:
                for t in recvs:
                    if shape[t][0] >= 0 and shape[t][1] >= 0:
                        n = shape[t][1]
                        buffers[t] = device.empty_host(n, pin=False) if pool is None else pool.acquire(n)
            except Exception as e:  # MemoryError and the like: calls off this rank's receipts only
                failure = e
                release(buffers.values())
                buffers = {}
        # 3. ready flags: a transfer is on iff its sender prepared and its receiver is ready
        flags = {t: torch.zeros(1, dtype=torch.int64) for t in sends}
        _round(rank, "ready flags", [
            (on[t.src], "send", torch.tensor([int(t in buffers)], dtype=torch.int64), t.src, _tag(t.owner, 3))
            for t in recvs if t.src in on] + [
            (on[t.dst], "recv", flags[t], t.dst, _tag(t.owner, 3)) for t in sends if t.dst in on])
        go_sends = [t for t in sends if prepared and int(flags[t][0]) == 1]
        off = {t: f"rank {t.dst} (receiving the part of rank {t.owner}) was not ready"
               for t in sends if prepared and t not in go_sends}
        off.update({t: f"rank {t.src} (sending the part of rank {t.owner}) failed to prepare"
                    for t in recvs if failure is None and t not in buffers})
        # 4. the data of the transfers that are on
        if go_sends or buffers:
            received = _move(rank, go_sends, sorted(buffers), outgoing, buffers, shape, on, chunk_bytes)
    except BaseException as e:
        release(buffers.values())
        if failure is not None and isinstance(e, Exception):
            logger.debug("rank %d: replica exchange after its own failure (%s) also failed: %s", rank, failure, e)
            raise failure  # chained to e
        raise
    if failure is not None or off:
        release(p.buffer for p in received.values())
        if failure is not None:
            raise failure
        peers = sorted({t.src if t.dst == rank else t.dst for t in off})
        raise ExchangeAborted(f"replica exchange: rank {rank}'s transfers with rank(s) {peers} were called off "
                              f"before their data moved: {'; '.join(off.values())}", peers)
    return received


def _check(rank: int, sends: list[Transfer], recvs: list[Transfer], outgoing: Mapping[int, OutgoingPart],
           groups: Mapping[int, Subgroup]) -> tuple[dict[int, Subgroup], ValueError | None]:
    """This rank's group for each peer it has one with, and what makes it unable to take part (a
    ValueError naming the ranks), if anything."""
    on: dict[int, Subgroup] = {}
    lacking = []
    for peer in sorted({t.dst for t in sends} | {t.src for t in recvs}):
        g = groups.get(peer)
        if g is not None and peer in g.ranks and rank in g.ranks:
            on[peer] = g
        else:
            lacking.append(peer)
    missing = sorted({t.owner for t in sends} - set(outgoing))
    if len({t.owner for t in recvs}) != len(recvs):
        return on, ValueError(f"rank {rank} would receive the same owner's part more than once: {recvs}")
    if missing:
        return on, ValueError(f"rank {rank} must send the parts of owner(s) {missing} but does not hold them")
    if lacking:
        return on, ValueError(f"rank {rank} has no exchange group with peer rank(s) {lacking} (the ranks of a "
                              f"transfer must be peers of each other under the replication strategy)")
    return on, None


def _move(rank: int, sends: list[Transfer], recvs: list[Transfer], outgoing: Mapping[int, OutgoingPart],
          buffers: dict[Transfer, torch.Tensor], shape: dict[Transfer, tuple[int, int]],
          groups: Mapping[int, Subgroup], chunk_bytes: int) -> dict[int, RawPart]:
    """Step 4 of :func:`exchange_parts` for the transfers that are on: prefixes, data pieces,
    validation."""
    prefixes = {t: torch.empty(shape[t][0], dtype=torch.uint8) for t in recvs}
    _round(rank, "prefixes", [
        (groups[t.dst], "send", torch.frombuffer(bytearray(outgoing[t.owner].prefix), dtype=torch.uint8), t.dst,
         _tag(t.owner, 1)) for t in sends] + [
        (groups[t.src], "recv", prefixes[t], t.src, _tag(t.owner, 1)) for t in recvs])

    overlap = chunk_bytes % CHUNK_BYTES == 0  # landed pieces hold whole checksum chunks
    sums: dict[Transfer, list[Future]] = {t: [] for t in recvs}
    longest = max([outgoing[t.owner].buffer.numel() for t in sends] + [shape[t][1] for t in recvs], default=0)
    posts, landing, lazy = [], [], []  # posts: (group, "send"/"recv", piece, peer, tag)
    for start in range(0, longest, chunk_bytes):  # host memory: every piece is posted at once...
        for t in sends:
            piece = outgoing[t.owner].buffer[start:start + chunk_bytes]
            if piece.numel() and outgoing[t.owner].fill is None:
                posts.append((groups[t.dst], "send", piece, t.dst, _tag(t.owner, 2)))
                landing.append(None)
            elif piece.numel():  # ...but a piece still to be read: posted once read, below
                lazy.append((t, start, piece))
        for t in recvs:
            piece = buffers[t][start:start + chunk_bytes]
            if piece.numel():
                posts.append((groups[t.src], "recv", piece, t.src, _tag(t.owner, 2)))
                landing.append((t, piece))
    send_errors: dict[Transfer, BaseException] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="tasd-verify") as hasher:
        try:
            works = [(getattr(g, op)(piece, peer, tag), g) for g, op, piece, peer, tag in posts]
            for t, start, piece in lazy:  # read piece k while pieces before it are in flight
                if t not in send_errors:
                    try:
                        outgoing[t.owner].fill(start, start + piece.numel())
                    except Exception as e:  # sent anyway: its receiver must not wait for it
                        send_errors[t] = e
                works.append((groups[t.dst].send(piece, t.dst, _tag(t.owner, 2)), groups[t.dst]))
                landing.append(None)
            for (work, g), landed in zip(works, landing):
                work.wait(g.timeout)
                if landed is not None and overlap:  # hashed (GIL released) while later pieces fly
                    t, piece = landed
                    sums[t].append(hasher.submit(chunk_checksums, memoryview(piece.numpy())))
        except Exception as e:
            raise _unreachable(rank, "data", e) from e
        _raise_send_errors(rank, send_errors)
        received, damaged = {}, {}
        for t in recvs:
            origin = f"part of rank {t.owner} received by rank {rank} from rank {t.src}"
            try:
                prefix = prefixes[t].numpy().tobytes()
                header, hollow = parse_prefix(prefix, shape[t][1], origin)
                got = ([s for f in sums[t] for s in f.result()] if overlap
                       else chunk_checksums(memoryview(buffers[t].numpy())))
                check_checksums(header, got, origin)
            except CorruptCheckpointError as e:
                damaged[t] = e
                continue
            received[t.owner] = RawPart(header, prefix, hollow, buffers[t])
    if damaged:
        raise TransferDamaged(sorted(damaged), "; ".join(str(e) for e in damaged.values()))
    logger.debug("rank %d sent %d and received %d parts", rank, len(sends), len(recvs))
    return received


def _raise_send_errors(rank: int, errors: dict[Transfer, BaseException]) -> None:
    """Raise what reading outgoing parts raised, once all data moved: damaged parts as one
    TransferDamaged, any other error as it came."""
    other = [e for e in errors.values() if not isinstance(e, CorruptCheckpointError)]
    if other:
        raise other[0]
    if errors:
        raise TransferDamaged(sorted(errors), f"rank {rank} found part(s) it sent damaged: "
                                              + "; ".join(str(e) for e in errors.values()))
