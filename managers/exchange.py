"""Moving whole checkpoint parts between ranks: the exchange layer over torch.distributed.

A part travels as two buffers: its *prefix* (preamble, header with checksums, hollow state dict,
padding: :func:`tasd.managers.fileformat.encode_prefix`) and its data section (the staging buffer
itself). So a part costs a fixed number of point-to-point operations whatever its tensor count:
one for its sizes, one for its prefix, one per data chunk. Receivers validate what arrives with the
same checks as a file (header, hollow and chunk checksums) before anyone uses it.

The communication device follows the group's backend (gloo: CPU, the host buffers are sent as
they are; NCCL: CUDA, each data chunk is copied through a device buffer of at most
``chunk_bytes``). Operations between the same two ranks are told apart by tags derived from the
owner rank, so one plan may move several parts between the same pair.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from tasd import device
from tasd.staging import HostBufferPool
from tasd.managers import collectives
from tasd.managers.fileformat import (CHUNK_BYTES, RawPart, check_checksums, chunk_checksums, parse_prefix,
                                      verify_data)

logger = logging.getLogger(__name__)

#: Largest piece of a data section moved by one operation (and device memory used per transfer):
#: a multiple of the file format's checksum chunk, so each landed piece is verified while the next
#: one is in flight.
DEFAULT_CHUNK_BYTES = 2 * CHUNK_BYTES


@dataclass(frozen=True, order=True)
class Transfer:
    """One entry of an exchange plan: ``src`` sends the part of ``owner`` to ``dst``."""

    owner: int
    src: int
    dst: int


@dataclass
class OutgoingPart:
    """A part ready to send: its encoded prefix and its data section (1-D uint8 host tensor)."""

    prefix: bytes
    buffer: torch.Tensor


def _tag(owner: int, kind: int) -> int:
    return owner * 4 + kind  # kind: 0 sizes, 1 prefix, 2 data


def _run(ops: list[dist.P2POp]) -> None:
    """Post ``ops`` as one batch and wait for all of them."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def exchange_parts(plan: Sequence[Transfer], outgoing: Mapping[int, OutgoingPart], group: Any = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, pool: HostBufferPool | None = None) -> dict[int, RawPart]:
    """Execute ``plan``: send the parts this rank is the source of (from ``outgoing``, keyed by
    owner) and return those it receives, keyed by owner, validated (not decoded).

    Received data lands in fresh host memory, or in buffers acquired from ``pool`` (reused across
    saves): the caller then releases them; on error they are released here.

    Collective over ``group`` in the sense that every rank named in the plan must call it with the
    same plan; ranks not in it may skip it. Raises ValueError when ``outgoing`` lacks a part this
    rank must send, CorruptCheckpointError when a received part fails validation, and the
    backend's error when a peer dies (after the process group's timeout).
    """
    rank = dist.get_rank()
    sends = sorted(t for t in plan if t.src == rank and t.dst != rank)
    recvs = sorted(t for t in plan if t.dst == rank and t.src != rank)
    missing = sorted({t.owner for t in sends} - set(outgoing))
    if missing:
        raise ValueError(f"rank {rank} must send the parts of owner(s) {missing} but does not hold them")
    if len({(t.owner, t.src) for t in recvs}) != len(recvs) or len({t.owner for t in recvs}) != len(recvs):
        raise ValueError(f"rank {rank} would receive the same owner's part more than once: {recvs}")
    dev = collectives.comm_device(group)

    # 1. sizes of each part's prefix and data
    sizes = {t: torch.empty(2, dtype=torch.int64, device=dev) for t in recvs}
    ops = [dist.P2POp(dist.isend, torch.tensor([len(outgoing[t.owner].prefix), outgoing[t.owner].buffer.numel()],
                                               dtype=torch.int64, device=dev), t.dst, group, _tag(t.owner, 0))
           for t in sends]
    ops += [dist.P2POp(dist.irecv, sizes[t], t.src, group, _tag(t.owner, 0)) for t in recvs]
    _run(ops)
    shape = {t: (int(sizes[t][0]), int(sizes[t][1])) for t in recvs}

    # 2. prefixes (small): one batch
    prefixes = {t: torch.empty(shape[t][0], dtype=torch.uint8, device=dev) for t in recvs}
    ops = [dist.P2POp(dist.isend, torch.frombuffer(bytearray(outgoing[t.owner].prefix), dtype=torch.uint8).to(dev),
                      t.dst, group, _tag(t.owner, 1)) for t in sends]
    ops += [dist.P2POp(dist.irecv, prefixes[t], t.src, group, _tag(t.owner, 1)) for t in recvs]
    _run(ops)

    # 3. data sections in pieces of at most chunk_bytes; then validation
    buffers = {t: device.empty_host(shape[t][1]) if pool is None else pool.acquire(shape[t][1]) for t in recvs}
    overlap = chunk_bytes % CHUNK_BYTES == 0  # landed pieces hold whole checksum chunks
    sums: dict[Transfer, list[Future]] = {t: [] for t in recvs}
    hasher = ThreadPoolExecutor(1, thread_name_prefix="tasd-verify")
    try:
        longest = max([outgoing[t.owner].buffer.numel() for t in sends] + [shape[t][1] for t in recvs], default=0)
        starts = list(range(0, longest, chunk_bytes))
        # On CPU every piece is posted at once (nothing to bound); through a device, one round of
        # pieces at a time bounds the device memory used.
        for round_starts in ([starts] if dev.type == "cpu" else [[x] for x in starts]):
            ops, landing = [], []
            for start in round_starts:
                for t in sends:
                    piece = outgoing[t.owner].buffer[start:start + chunk_bytes]
                    if piece.numel():
                        ops.append(dist.P2POp(dist.isend, piece.to(dev, non_blocking=True), t.dst, group,
                                              _tag(t.owner, 2)))
                        landing.append(None)
                for t in recvs:
                    piece = buffers[t][start:start + chunk_bytes]
                    if piece.numel():
                        on_dev = piece if dev.type == "cpu" else torch.empty_like(piece, device=dev)
                        ops.append(dist.P2POp(dist.irecv, on_dev, t.src, group, _tag(t.owner, 2)))
                        landing.append((t, piece, on_dev))
            if dev.type != "cpu":
                device.synchronize()  # host-to-device copies of the pieces to send
            for work, landed in zip(dist.batch_isend_irecv(ops) if ops else [], landing):
                work.wait()
                if landed is None:
                    continue
                t, piece, on_dev = landed
                if on_dev is not piece:
                    piece.copy_(on_dev)
                if overlap:  # hashed (GIL released) while the following pieces are in flight
                    sums[t].append(hasher.submit(chunk_checksums, memoryview(piece.numpy())))
        received = {}
        for t in recvs:
            origin = f"part of rank {t.owner} received by rank {rank} from rank {t.src}"
            prefix = prefixes[t].cpu().numpy().tobytes()
            header, hollow = parse_prefix(prefix, shape[t][1], origin)
            if overlap:
                check_checksums(header, [s for f in sums[t] for s in f.result()], origin)
            else:
                verify_data(header, buffers[t], origin)
            received[t.owner] = RawPart(header, prefix, hollow, buffers[t])
    except BaseException:
        if pool is not None:
            for buf in buffers.values():
                pool.release(buf)
        raise
    finally:
        hasher.shutdown(wait=True)
    logger.debug("rank %d sent %d and received %d parts", rank, len(sends), len(recvs))
    return received


def plan_retrieval(needs: Mapping[int, Sequence[int]], holders: Mapping[int, Sequence[int]]) -> list[Transfer]:
    """Who sends which missing part to whom. ``needs``: rank -> owners whose parts it lacks;
    ``holders``: owner -> ranks holding a verified copy. Senders are spread: each transfer goes to
    the holder with the fewest sends so far (ties: lowest rank), so no rank serves many. The same
    inputs give the same plan on every rank. Owners nobody holds are left out (the caller reports
    them)."""
    load: dict[int, int] = {}
    plan = []
    for dst in sorted(needs):
        for owner in sorted(needs[dst]):
            candidates = [h for h in holders.get(owner, ()) if h != dst]
            if not candidates:
                continue
            src = min(candidates, key=lambda h: (load.get(h, 0), h))
            load[src] = load.get(src, 0) + 1
            plan.append(Transfer(owner, src, dst))
    return plan
