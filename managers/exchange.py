"""Moving whole checkpoint parts between ranks: the exchange layer over torch.distributed.

A part travels as two buffers: its *prefix* (preamble, header with checksums, hollow state dict,
padding: :func:`tasd.managers.fileformat.encode_prefix`) and its data section (the staging buffer
itself). So a part costs a fixed number of point-to-point operations whatever its tensor count:
one for its sizes, one for its prefix, one per data piece. Receivers validate what arrives with the
same checks as a file (header, hollow and chunk checksums) before anyone uses it.

Parts live in host memory, so exchanges run on a gloo process group of tasd's own (a strategy's
exchange group), never on the training's communicators and never through the GPU. The order of an
exchange, in :func:`exchange_parts`:

1. sizes: every sender tells its receivers the sizes of each part (a sender that failed to prepare
   sends -1);
2. receivers allocate their buffers;
3. agreement: one all_reduce over the group of "did any rank fail to prepare or allocate?"; if so,
   every rank raises before any data moves (no rank waits for a timeout, the group stays usable);
4. prefixes, then the data sections in pieces, each landed piece hashed while the next ones are in
   flight; then every received part is validated.

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
from tasd.managers import collectives
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError, PeerUnreachableError
from tasd.managers.fileformat import CHUNK_BYTES, RawPart, check_checksums, chunk_checksums, parse_prefix
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
    """The exchange was called off before any data moved because some rank failed to prepare."""


class TransferDamaged(CorruptCheckpointError):
    """Parts found damaged as they moved: by their sender as it read them, or by their receiver as
    it validated them. ``transfers``: which."""

    def __init__(self, transfers: list[Transfer], message: str):
        super().__init__(message)
        self.transfers = transfers


def _tag(owner: int, kind: int) -> int:
    return owner * 4 + kind  # kind: 0 sizes, 1 prefix, 2 data


def _run(ops: list[dist.P2POp]) -> list[Any]:
    """Post ``ops`` as one batch; returns the works (empty for no ops)."""
    return dist.batch_isend_irecv(ops) if ops else []


def _unreachable(rank: int, step: str, e: BaseException) -> PeerUnreachableError:
    return PeerUnreachableError(f"replica exchange ({step}): rank {rank} could not reach a peer "
                                f"(a peer died or timed out): {e}")


def exchange_parts(plan: Sequence[Transfer], outgoing: Mapping[int, OutgoingPart], group: Any = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, pool: HostBufferPool | None = None,
                   failure: BaseException | None = None) -> dict[int, RawPart]:
    """Execute ``plan``: send the parts this rank is the source of (from ``outgoing``, keyed by
    owner) and return those it receives, keyed by owner, validated (not decoded).

    Collective over ``group`` (a gloo group over the world; None: the world group, which must then
    be gloo): every rank calls it with the same plan,
    also ranks that send and receive nothing, and a rank that failed to prepare its outgoing parts
    calls it with ``failure`` set. Received data lands in fresh (pageable) host memory, or in
    buffers acquired from ``pool`` (the caller then releases them; on error they are released
    here). No CUDA call is made: it may run in a background thread.

    Raises, on every rank and before any data moves, when some rank failed to prepare or to
    allocate: the failing rank its ``failure`` (or its allocation error), the others
    ExchangeAborted. Raises ValueError when ``outgoing`` lacks a part this rank must send,
    CorruptCheckpointError when a received part fails validation, PeerUnreachableError when a peer
    dies or times out (after the group's timeout), TransferDamaged when an outgoing part's ``fill``
    found it damaged (on its sender, after sending it all) or a received part fails validation
    (on its receiver), and what an outgoing part's ``fill`` raised otherwise.
    """
    rank = dist.get_rank()
    if dist.get_backend(group) != "gloo":
        raise ValueError("exchange_parts moves host memory: it needs a gloo group (tasd's own), "
                         f"got backend {dist.get_backend(group)!r}")
    sends = sorted(t for t in plan if t.src == rank and t.dst != rank)
    recvs = sorted(t for t in plan if t.dst == rank and t.src != rank)
    if len({t.owner for t in recvs}) != len(recvs):
        raise ValueError(f"rank {rank} would receive the same owner's part more than once: {recvs}")
    missing = sorted({t.owner for t in sends} - set(outgoing))
    if failure is None and missing:
        failure = ValueError(f"rank {rank} must send the parts of owner(s) {missing} but does not hold them")

    # 1. sizes of each part's prefix and data (-1: the sender failed to prepare)
    sizes = {t: torch.empty(2, dtype=torch.int64) for t in recvs}
    ops = [dist.P2POp(dist.isend, torch.tensor([-1, -1] if failure is not None else
                                               [len(outgoing[t.owner].prefix), outgoing[t.owner].buffer.numel()],
                                               dtype=torch.int64), t.dst, group, _tag(t.owner, 0)) for t in sends]
    ops += [dist.P2POp(dist.irecv, sizes[t], t.src, group, _tag(t.owner, 0)) for t in recvs]
    try:
        for work in _run(ops):
            work.wait()
    except Exception as e:
        raise _unreachable(rank, "sizes", e) from e
    shape = {t: (int(sizes[t][0]), int(sizes[t][1])) for t in recvs}

    # 2. receive buffers (not for parts whose sender failed: it reports itself in the agreement)
    buffers: dict[Transfer, torch.Tensor] = {}
    if failure is None:
        try:
            for t in recvs:
                if shape[t][0] >= 0 and shape[t][1] >= 0:
                    buffers[t] = device.empty_host(shape[t][1], pin=False) if pool is None else pool.acquire(shape[t][1])
        except Exception as e:  # MemoryError and the like: confined to this exchange
            failure = e
    # 3. agreement before any data moves
    try:
        try:
            failures = collectives.gather_failures(failure, group)
        except Exception as e:
            raise _unreachable(rank, "agreement", e) from e
        if failures:
            if failure is not None:
                raise failure
            raise ExchangeAborted(f"replica exchange called off on rank {rank} before any data moved, failed to "
                                  f"prepare or allocate on {failures.describe()}")
        return _move(rank, sends, recvs, outgoing, buffers, shape, group, chunk_bytes)
    except BaseException:
        if pool is not None:
            for buf in buffers.values():
                pool.release(buf)
        raise


def _move(rank: int, sends: list[Transfer], recvs: list[Transfer], outgoing: Mapping[int, OutgoingPart],
          buffers: dict[Transfer, torch.Tensor], shape: dict[Transfer, tuple[int, int]], group: Any,
          chunk_bytes: int) -> dict[int, RawPart]:
    """Steps 4 of :func:`exchange_parts`: prefixes, data pieces, validation."""
    prefixes = {t: torch.empty(shape[t][0], dtype=torch.uint8) for t in recvs}
    ops = [dist.P2POp(dist.isend, torch.frombuffer(bytearray(outgoing[t.owner].prefix), dtype=torch.uint8),
                      t.dst, group, _tag(t.owner, 1)) for t in sends]
    ops += [dist.P2POp(dist.irecv, prefixes[t], t.src, group, _tag(t.owner, 1)) for t in recvs]
    try:
        for work in _run(ops):
            work.wait()
    except Exception as e:
        raise _unreachable(rank, "prefixes", e) from e

    overlap = chunk_bytes % CHUNK_BYTES == 0  # landed pieces hold whole checksum chunks
    sums: dict[Transfer, list[Future]] = {t: [] for t in recvs}
    longest = max([outgoing[t.owner].buffer.numel() for t in sends] + [shape[t][1] for t in recvs], default=0)
    ops, landing, lazy = [], [], []
    for start in range(0, longest, chunk_bytes):  # host memory: every piece is posted at once...
        for t in sends:
            piece = outgoing[t.owner].buffer[start:start + chunk_bytes]
            if piece.numel() and outgoing[t.owner].fill is None:
                ops.append(dist.P2POp(dist.isend, piece, t.dst, group, _tag(t.owner, 2)))
                landing.append(None)
            elif piece.numel():  # ...but a piece still to be read: posted once read, below
                lazy.append((t, start, piece))
        for t in recvs:
            piece = buffers[t][start:start + chunk_bytes]
            if piece.numel():
                ops.append(dist.P2POp(dist.irecv, piece, t.src, group, _tag(t.owner, 2)))
                landing.append((t, piece))
    send_errors: dict[Transfer, BaseException] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="tasd-verify") as hasher:
        try:
            works = _run(ops)
            for t, start, piece in lazy:  # read piece k while pieces before it are in flight
                if t not in send_errors:
                    try:
                        outgoing[t.owner].fill(start, start + piece.numel())
                    except Exception as e:  # sent anyway: its receiver must not wait for it
                        send_errors[t] = e
                works.append(dist.isend(piece, t.dst, group, _tag(t.owner, 2)))
                landing.append(None)
            for work, landed in zip(works, landing):
                work.wait()
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
