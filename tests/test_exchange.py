"""The exchange layer: whole parts moved between real ranks (processes, gloo groups among peers)
and validated; the pairwise protocol calls off only a failing rank's own transfers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tasd import BasicTensorAwareStateDict
from tasd.launch import RankFailure, run_ranks
from tasd.managers import CorruptCheckpointError, subgroups
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


def pair_groups(rank: int, plan) -> dict:
    """peer -> a 2-rank tasd group, for every peer of ``rank``'s transfers in ``plan`` (as the ring
    strategy makes them; collective over each pair)."""
    peers = sorted({t.dst for t in plan if t.src == rank} | {t.src for t in plan if t.dst == rank} - {rank})
    return dict(zip(peers, subgroups.subgroups([("test-exchange", sorted((rank, p))) for p in peers])))


def exchange(plan, outgoing, **kw):
    return exchange_parts(plan, outgoing, pair_groups(dist.get_rank(), plan), **kw)


def ring_exchange(rank, world):
    plan = [Transfer(r, r, (r + 1) % world) for r in range(world)]
    got = exchange(plan, {rank: outgoing_part(rank, world)})
    (owner, part), = got.items()
    assert owner == (rank - 1) % world and part.header.meta.owner_rank == owner
    assert_same(as_state(part), state_of(owner))


def test_ring_exchange_moves_whole_parts(ranks):
    ranks(ring_exchange, 3)


def two_parts_one_pair(rank, world):
    # rank 0 holds its own part and a replica of rank 2's; it sends both to rank 1 in one plan
    plan = [Transfer(0, 0, 1), Transfer(2, 0, 1), Transfer(1, 1, 2)]
    mine = {0: {0: outgoing_part(0, world), 2: outgoing_part(2, world)}, 1: {1: outgoing_part(1, world)}, 2: {}}
    got = exchange(plan, mine[rank], chunk_bytes=512)  # small chunks: several rounds
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
        exchange([Transfer(0, 0, 1), Transfer(1, 1, 0)], {rank: part})
    except CorruptCheckpointError as e:
        return str(e)
    return None


def test_corruption_in_transit_is_detected(ranks):
    err0, err1 = ranks(tampered, 2)
    assert err0 is None
    assert "part of rank 0 received by rank 1 from rank 0" in err1 and "checksum mismatch" in err1


def count_ops(rank, world, n_tensors):
    counted = []
    plan = [Transfer(0, 0, 1), Transfer(1, 1, 0)]
    groups = pair_groups(rank, plan)
    real = {name: getattr(subgroups.Subgroup, name) for name in ("send", "recv", "all_reduce", "broadcast")}

    def spy(name):
        def call(self, *args, **kwargs):
            counted.append((name, self.size))
            return real[name](self, *args, **kwargs)
        return call
    for name in real:
        setattr(subgroups.Subgroup, name, spy(name))
    try:
        exchange_parts(plan, {rank: outgoing_part(rank, world, n_tensors)}, groups)
    finally:
        for name, fn in real.items():
            setattr(subgroups.Subgroup, name, fn)
    return counted


def test_operation_count_does_not_grow_with_tensor_count(ranks):
    few = ranks(count_ops, 2, 1)
    many = ranks(count_ops, 2, 2000)
    # sizes, ready flag, prefix, one data chunk: one send and one receive each; no collective
    for ops in few + many:
        assert sorted(ops) == sorted([("send", 2), ("recv", 2)] * 4), ops


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
        got = exchange([Transfer(0, 0, 1)], {0: part} if rank == 0 else {}, chunk_bytes=1024)
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


def spy_data(moved: list):
    """Record (src, dst) of every prefix or data send (tags 1, 2 mod 4) made on tasd groups;
    returns a function that undoes it."""
    real = subgroups.Subgroup.send

    def send(self, t, dst, tag):
        if tag % 4 in (1, 2):
            moved.append((self.rank, dst))
        return real(self, t, dst, tag)
    subgroups.Subgroup.send = send
    return lambda: setattr(subgroups.Subgroup, "send", real)


def run_failing(rank, world, plan, failing: int, where: str):
    """Run ``plan`` with rank ``failing`` failing to prepare (``failure`` given) or to allocate
    (its receive pool raises); returns (error, seconds, bytes left in the pool, parts received,
    (src, dst) of the prefix/data sends this rank made), then a clean exchange on the same pairs
    (nothing left in flight: the groups still pair their operations)."""
    import time
    groups = pair_groups(rank, plan)
    pool = FailingPool() if (where == "allocate" and rank == failing) else HostBufferPool()
    failure = ValueError("staging failed (injected)") if (where == "prepare" and rank == failing) else None
    outgoing = {} if failure else {t.owner: outgoing_part(t.owner, world) for t in plan if t.src == rank}
    moved: list = []
    undo = spy_data(moved)
    t0 = time.monotonic()
    got, error = {}, None
    try:
        got = exchange_parts(plan, outgoing, groups, pool=pool, failure=failure)
        for owner, part in got.items():
            assert_same(as_state(part), state_of(owner))
            pool.release(part.buffer)
    except Exception as e:
        error = (type(e).__name__, str(e), getattr(e, "peers", None))
    finally:
        undo()
    elapsed, in_use = time.monotonic() - t0, pool.in_use_bytes
    again = exchange_parts(plan, {t.owner: outgoing_part(t.owner, world) for t in plan if t.src == rank}, groups)
    return error, elapsed, in_use, sorted(got), moved, sorted(again)


class FailingPool(HostBufferPool):
    def acquire(self, nbytes):
        raise MemoryError(f"cannot allocate {nbytes} bytes (injected)")


@pytest.mark.parametrize("where", ["allocate", "prepare"])
def test_a_rank_that_cannot_prepare_calls_off_only_its_transfers(ranks, where):
    # two pairs, 0 <-> 1 and 2 <-> 3; rank 1 fails
    plan = [Transfer(0, 0, 1), Transfer(1, 1, 0), Transfer(2, 2, 3), Transfer(3, 3, 2)]
    out = ranks(run_failing, 4, plan, 1, where)
    for rank, (error, elapsed, in_use, got, moved, again) in enumerate(out):
        assert elapsed < 5, "no rank waits for a timeout"
        assert in_use == 0, "buffers acquired before the call-off are released"
        assert again == [{0: 1, 1: 0, 2: 3, 3: 2}[rank]], "the groups still work afterwards"
    (e0, *_, moved0, _), (e1, *_, moved1, _) = out[0], out[1]
    assert e1[0] == ("MemoryError" if where == "allocate" else "ValueError") and "injected" in e1[1]
    assert e0[0] == "ExchangeAborted" and e0[2] == [1] and "rank(s) [1]" in e0[1]
    assert moved0 == [], "rank 0 sends no data to a rank that is not ready"
    if where == "prepare":
        assert "rank 1 (sending the part of rank 1) failed to prepare" in e0[1]
        assert moved1 == [], "a rank that failed to prepare sends nothing"
    else:  # rank 1 prepared before it failed to allocate: its own part still goes to rank 0
        assert "rank 1 (receiving the part of rank 0) was not ready" in e0[1]
        assert moved1 and set(moved1) == {(1, 0)}
    for rank in (2, 3):
        error, _, _, got, moved, _ = out[rank]
        assert error is None and got == [5 - rank], "ranks that do not exchange with rank 1 complete theirs"
        assert moved and set(moved) == {(rank, 5 - rank)}


def test_a_receiver_that_cannot_allocate_calls_off_only_its_transfers(ranks):
    # a ring 0 -> 1 -> 2 -> 3 -> 0; rank 2 cannot allocate the part of rank 1
    plan = [Transfer(r, r, (r + 1) % 4) for r in range(4)]
    out = ranks(run_failing, 4, plan, 2, "allocate")
    errors = [o[0] for o in out]
    assert errors[2][0] == "MemoryError"
    assert errors[1][0] == "ExchangeAborted" and errors[1][2] == [2]
    assert "rank 2 (receiving the part of rank 1) was not ready" in errors[1][1]
    assert errors[0] is None and out[0][3] == [3], "3 -> 0 moved"
    assert errors[3] is None and out[3][3] == [2], "2 -> 3 moved: rank 2 prepared before it failed"
    assert out[1][3] == [], "rank 1 received rank 0's part but raises: nothing is returned"
    assert [o[4] and set(o[4]) for o in out] == [{(0, 1)}, [], {(2, 3)}, {(3, 0)}], "1 -> 2 did not move"
    for _, elapsed, in_use, *_ in out:
        assert elapsed < 5 and in_use == 0


def outside_the_plan(rank, world):
    """Rank 2 is in no transfer: it makes no call on any group (returns {}, or raises its own
    failure). Then ranks 0 and 1 exchange without groups for each other: both fail at once."""
    import time
    plan = [Transfer(0, 0, 1), Transfer(1, 1, 0)]
    groups = pair_groups(rank, plan)
    calls: list = []
    real = subgroups.Subgroup.send, subgroups.Subgroup.recv
    subgroups.Subgroup.send = lambda self, *a: calls.append("send") or real[0](self, *a)
    subgroups.Subgroup.recv = lambda self, *a: calls.append("recv") or real[1](self, *a)
    try:
        got = exchange_parts(plan, {rank: outgoing_part(rank, world)}, groups)
        own = None
        if rank == 2:
            try:
                exchange_parts(plan, {}, {}, failure=ValueError("injected"))
            except ValueError as e:
                own = str(e)
    finally:
        subgroups.Subgroup.send, subgroups.Subgroup.recv = real
    t0 = time.monotonic()
    try:
        exchange_parts(plan, {rank: outgoing_part(rank, world)}, {})
        lacking = None
    except ValueError as e:
        lacking = str(e)
    elapsed = time.monotonic() - t0
    dist.all_reduce(torch.ones(1))  # rank 2 would be done before the others finished joining the world
    return sorted(got), len(calls), own, lacking, elapsed


def test_a_rank_outside_the_plan_does_nothing_and_missing_groups_fail_promptly(ranks):
    out = ranks(outside_the_plan, 3)
    assert [o[0] for o in out] == [[1], [0], []]
    assert out[2][1] == 0 and out[2][2] == "injected"
    assert out[0][1] == out[1][1] == 8
    assert "rank 0 has no exchange group with peer rank(s) [1]" in out[0][3]
    assert "rank 1 has no exchange group with peer rank(s) [0]" in out[1][3]
    assert out[2][3] is None
    assert all(o[4] < 5 for o in out)


def dead_peer(rank, world):
    plan = [Transfer(0, 0, 1), Transfer(1, 1, 0)]
    groups = pair_groups(rank, plan)
    exchange_parts(plan, {rank: outgoing_part(rank, world)}, groups)  # both ends are connected and working
    if rank == 1:
        os._exit(3)  # the peer dies between two exchanges
    exchange_parts(plan, {rank: outgoing_part(rank, world)}, groups)


def test_dead_peer_fails_the_exchange_instead_of_hanging():
    with pytest.raises(RankFailure) as info:
        run_ranks(dead_peer, 2, collective_timeout_s=5, timeout_s=60)
    assert "exit code 3" in info.value.failures[1]
    assert "was killed" not in info.value.failures[0], "rank 0 must fail on its own, not be killed"
    assert "PeerUnreachableError" in info.value.failures[0]
