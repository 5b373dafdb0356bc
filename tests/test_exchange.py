"""The exchange layer: whole parts moved between real ranks (processes, gloo) and validated."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tasd import BasicTensorAwareStateDict
from tasd.launch import RankFailure, run_ranks
from tasd.managers import CorruptCheckpointError
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts
from tasd.managers.fileformat import PartMeta, encode_prefix
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, stage
from tests.test_basic_state_dict import assert_same


def state_of(owner: int, n_tensors: int = 3) -> dict:
    g = torch.Generator().manual_seed(owner)
    return {"owner": owner, "w": [torch.randn(257 + i, generator=g) for i in range(n_tensors)],
            "b": torch.arange(owner * 10, owner * 10 + 5, dtype=torch.int16)}


def outgoing_part(owner: int, world: int, n_tensors: int = 3) -> OutgoingPart:
    sd = BasicTensorAwareStateDict(state_of(owner, n_tensors))
    tensors = sd.pop_tensors()
    staged = stage(tensors, HostBufferPool())
    return OutgoingPart(encode_prefix(PartMeta(5, owner, world), dumps(sd), staged.layouts, staged.buffer),
                        staged.buffer)


def as_state(received) -> dict:
    part = received.decode("test")
    part.hollow.insert_tensors(part.tensors())
    return part.hollow.state_dict


def ring_exchange(rank, world):
    plan = [Transfer(r, r, (r + 1) % world) for r in range(world)]
    got = exchange_parts(plan, {rank: outgoing_part(rank, world)})
    (owner, part), = got.items()
    assert owner == (rank - 1) % world and part.header.meta.owner_rank == owner
    assert_same(as_state(part), state_of(owner))


def test_ring_exchange_moves_whole_parts(ranks):
    ranks(ring_exchange, 3)


def two_parts_one_pair(rank, world):
    # rank 0 holds its own part and a replica of rank 2's; it sends both to rank 1 in one plan
    plan = [Transfer(0, 0, 1), Transfer(2, 0, 1), Transfer(1, 1, 2)]
    mine = {0: {0: outgoing_part(0, world), 2: outgoing_part(2, world)}, 1: {1: outgoing_part(1, world)}, 2: {}}
    got = exchange_parts(plan, mine[rank], chunk_bytes=512)  # small chunks: several rounds
    expected = {0: [], 1: [0, 2], 2: [1]}[rank]
    assert sorted(got) == expected
    for owner in expected:
        assert_same(as_state(got[owner]), state_of(owner))


def test_several_parts_between_one_pair_and_chunked_data(ranks):
    ranks(two_parts_one_pair, 3)


def tampered(rank, world):
    part = outgoing_part(rank, world)
    if rank == 0:
        part.buffer[100] ^= 1  # the data no longer matches the checksums in the prefix
    try:
        exchange_parts([Transfer(0, 0, 1), Transfer(1, 1, 0)], {rank: part})
    except CorruptCheckpointError as e:
        return str(e)
    return None


def test_corruption_in_transit_is_detected(ranks):
    err0, err1 = ranks(tampered, 2)
    assert err0 is None
    assert "part of rank 0 received by rank 1 from rank 0" in err1 and "checksum mismatch" in err1


def count_ops(rank, world, n_tensors):
    counted = []
    real = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: counted.append(len(ops)) or real(ops)
    try:
        exchange_parts([Transfer(0, 0, 1), Transfer(1, 1, 0)], {rank: outgoing_part(rank, world, n_tensors)})
    finally:
        dist.batch_isend_irecv = real
    return sum(counted)


def test_operation_count_does_not_grow_with_tensor_count(ranks):
    few = ranks(count_ops, 2, 1)
    many = ranks(count_ops, 2, 2000)
    assert few == many == [6, 6]  # sizes, prefix, one data chunk: one send and one receive each


def lazily_filled(rank, world, fail):
    """Rank 0 sends its part with a fill that reads it piece by piece; ``fail`` makes the second
    piece's read fail (damage, or a disk error): its receiver must not hang, and both ranks say
    which transfer it was."""
    import time
    part = outgoing_part(rank, world, n_tensors=6)
    calls = []
    if rank == 0:
        whole = part.buffer.clone()
        part.buffer.zero_()

        def fill(start, stop):
            calls.append((start, stop))
            part.buffer[start:stop] = whole[start:stop]
            if fail and len(calls) == 2:
                raise (CorruptCheckpointError("chunk 3 fails its checksum (injected)") if fail == "damaged"
                       else OSError(5, "Input/output error (injected)"))
        part = OutgoingPart(part.prefix, part.buffer, fill)
    t0 = time.monotonic()
    try:
        got = exchange_parts([Transfer(0, 0, 1)], {0: part} if rank == 0 else {}, chunk_bytes=1024)
    except Exception as e:
        return calls, f"{type(e).__name__}: {e}", getattr(e, "transfers", None), time.monotonic() - t0
    if rank == 1:
        assert_same(as_state(got[0]), state_of(0, 6))
    return calls, None, None, time.monotonic() - t0


@pytest.mark.parametrize("fail", [None, "damaged", "oserror"])
def test_a_part_read_while_it_is_sent(ranks, fail):
    (calls, err0, tr0, t0), (_, err1, tr1, t1) = ranks(lazily_filled, 2, fail)
    assert calls[0][0] == 0 and all(a[1] == b[0] for a, b in zip(calls, calls[1:])), "pieces read in order"
    assert all(stop - start <= 1024 for start, stop in calls), "read piece by piece"
    assert len(calls) == (2 if fail else 7), "a failed part is not read further (its pieces still go)"
    assert max(t0, t1) < 5, "nobody waits for a timeout"
    if fail is None:
        assert err0 is None and err1 is None
        return
    assert tr1 == [Transfer(0, 0, 1)] and "TransferDamaged" in err1, "the receiver names the transfer"
    if fail == "damaged":
        assert tr0 == [Transfer(0, 0, 1)] and "TransferDamaged" in err0 and "injected" in err0
    else:
        assert err0.startswith("OSError") and "injected" in err0


class FailingPool(HostBufferPool):
    def acquire(self, nbytes):
        raise MemoryError(f"cannot allocate {nbytes} bytes (injected)")


def one_rank_cannot_prepare(rank, world, where):
    import time
    plan = [Transfer(r, r, (r + 1) % world) for r in range(world)]
    pool = FailingPool() if (where == "allocate" and rank == 1) else HostBufferPool()
    failure = ValueError("staging failed (injected)") if (where == "prepare" and rank == 1) else None
    outgoing = {} if failure else {rank: outgoing_part(rank, world)}
    t0 = time.monotonic()
    try:
        exchange_parts(plan, outgoing, pool=pool, failure=failure)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    else:
        error = None
    t = torch.ones(1)
    dist.all_reduce(t)  # nothing is left in flight: the group still pairs its collectives
    return error, time.monotonic() - t0, pool.in_use_bytes


@pytest.mark.parametrize("where", ["allocate", "prepare"])
def test_a_rank_that_cannot_prepare_calls_the_exchange_off_everywhere(ranks, where):
    out = ranks(one_rank_cannot_prepare, 3, where)
    for rank, (error, elapsed, in_use) in enumerate(out):
        assert elapsed < 5, "no rank waits for a timeout"
        assert in_use == 0, "buffers acquired before the call-off are released"
        if rank == 1:
            assert error.startswith("MemoryError" if where == "allocate" else "ValueError")
        else:
            assert error.startswith("ExchangeAborted") and "rank(s) [1]" in error and "injected" in error


def dead_peer(rank, world):
    if rank == 1:
        os._exit(3)
    exchange_parts([Transfer(0, 0, 1), Transfer(1, 1, 0)], {0: outgoing_part(0, world)})


def test_dead_peer_fails_the_exchange_instead_of_hanging():
    with pytest.raises(RankFailure) as info:
        run_ranks(dead_peer, 2, collective_timeout_s=5, timeout_s=60)
    assert "exit code 3" in info.value.failures[1]
    assert "was killed" not in info.value.failures[0], "rank 0 must fail on its own, not be killed"
