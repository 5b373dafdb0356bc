"""LocalCheckpointManager with replication, on real ranks; deleting a rank's directory is losing
that node."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tasd import BasicTensorAwareStateDict
from tasd.launch import RankFailure, run_ranks
from tasd.managers import (CheckpointingException, LocalCheckpointManager, ReplicationConfig, ReplicationMismatchError)
from tasd.managers import partio
from tests.test_basic_state_dict import assert_same

SESSION = "repl"


def state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {"w": torch.randn(3000, generator=g), "layers": [torch.randn(17, 5, generator=g).to(torch.bfloat16)],
            "empty": torch.zeros(0, 4),  # e.g. an FSDP shard of a dimension smaller than the world
            "step": step, "rank": rank}


def manager(root, strategy):
    repl = None if strategy is None else ReplicationConfig(**strategy).build()
    return LocalCheckpointManager(root, SESSION, repl)


def files(root: Path, rank: int) -> list[str]:
    d = root / SESSION / str(rank)
    return sorted(os.listdir(d)) if d.exists() else []


def save_steps(rank, world, root, strategy, steps):
    m = manager(root, strategy)
    for step in steps:
        m.save(BasicTensorAwareStateDict(state(rank, step)), step)
    m.wait_for_cleanup()
    return files(Path(root), rank), m.repl_strategy.held_owners(rank, world) if m.repl_strategy else []


def restore(rank, world, root, strategy):
    m = manager(root, strategy)
    latest = m.find_latest()
    sd, ckpt_id = m.load()
    assert ckpt_id == (latest, rank, SESSION)
    assert_same(sd.state_dict, state(rank, latest))
    return latest


SETTINGS = [  # (world size, strategy settings, how many nodes may be lost at once)
    (2, {"strategy": "clique", "replication_jump": 1, "replication_factor": 2}, 1),
    (3, {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}, 1),
    (4, {"strategy": "ring", "replication_jump": 2, "replication_factor": 2}, 1),
    (3, {"strategy": "ring", "replication_jump": 1, "replication_factor": 3}, 2),
    (4, {"strategy": "clique", "replication_jump": 1, "replication_factor": 2}, 1),
    (4, {"strategy": "clique", "replication_jump": 2, "replication_factor": 2}, 1),
]


@pytest.mark.parametrize("world, strategy, tolerated", SETTINGS, ids=lambda v: str(v))
def test_every_tolerable_node_loss_is_recovered_bit_exactly(tmp_path, world, strategy, tolerated):
    saved = run_ranks(save_steps, world, tmp_path, strategy, [1, 2], timeout_s=120)
    for rank, (names, held) in enumerate(saved):
        assert names == sorted(f"iter_0000002_{o}_local.tasd" for o in [rank] + held), \
            "each rank keeps its own part and its peers' parts of the newest iteration only"
        assert len(held) == strategy["replication_factor"] - 1
    pristine = tmp_path.with_name(tmp_path.name + "-pristine")
    shutil.copytree(tmp_path, pristine)
    losses = [[r] for r in range(world)] + ([[0, 1]] if tolerated >= 2 else [])
    for lost in losses:
        shutil.rmtree(tmp_path)
        shutil.copytree(pristine, tmp_path)
        for r in lost:
            shutil.rmtree(tmp_path / SESSION / str(r))  # the node and its local disk are gone
        assert run_ranks(restore, world, tmp_path, strategy, timeout_s=120) == [2] * world, f"lost {lost}"


def save_with_ring_pairs(rank, world, root, strategy, steps):
    names, held = save_steps(rank, world, root, strategy, steps)
    m = manager(root, strategy)
    m.find_latest()  # makes the lazy strategy's groups, as the saves did in the first manager
    return names, held, sorted({g.ranks for g in m.repl_strategy.exchange_groups.values()})


def test_ring_of_three_on_four_ranks_replicates_and_recovers_on_pair_groups(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 3}
    saved = run_ranks(save_with_ring_pairs, 4, tmp_path, strategy, [1, 2], timeout_s=120)
    for rank, (names, held, groups) in enumerate(saved):
        assert held == sorted([(rank - 1) % 4, (rank - 2) % 4])
        assert names == sorted(f"iter_0000002_{o}_local.tasd" for o in [rank] + held)
        assert groups == sorted(tuple(sorted((rank, p))) for p in range(4) if p != rank), \
            "one 2-rank group per peer (three peers here), none over the world"
    pristine = tmp_path.with_name(tmp_path.name + "-pristine")
    shutil.copytree(tmp_path, pristine)
    for lost in ([2], [0, 1], [1, 3]):  # up to F-1 = 2 nodes
        shutil.rmtree(tmp_path)
        shutil.copytree(pristine, tmp_path)
        for r in lost:
            shutil.rmtree(tmp_path / SESSION / str(r))
        assert run_ranks(restore, 4, tmp_path, strategy, timeout_s=120) == [2] * 4, f"lost {lost}"


def restart_recording_group_threads(rank, world, root, strategy, lose):
    import threading
    from tasd.managers import subgroups
    made, real = [], subgroups.subgroups

    def record(specs, *args, **kwargs):
        specs = list(specs)
        made.extend((purpose.split("/")[0], threading.current_thread().name) for purpose, _ in specs)
        return real(specs, *args, **kwargs)

    subgroups.subgroups = record
    try:
        latest = -1
        for _ in range(2):  # the groups are cached for the process: a second manager creates none
            m = manager(root, strategy)
            latest = m.find_latest()
            sd, _ = m.load()
            assert_same(sd.state_dict, state(rank, latest))
            m._background().submit(lambda: None).result()  # the background creation has run
    finally:
        subgroups.subgroups = real
    return latest, made, sorted(p for p, _ in subgroups._cache if p.endswith("-exchange"))


@pytest.mark.parametrize("lose", [False, True])
def test_a_restart_creates_the_exchange_groups_off_the_training_thread(tmp_path, lose):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    run_ranks(save_steps, 2, tmp_path, strategy, [1, 2])
    if lose:
        shutil.rmtree(tmp_path / SESSION / "1")
    for latest, made, exchange_groups in run_ranks(restart_recording_group_threads, 2, tmp_path, strategy, lose):
        assert latest == 2
        exchange = [thread for purpose, thread in made if purpose.endswith("-exchange")]
        agreement = [thread for purpose, thread in made if purpose.startswith("agree")]
        assert exchange and all(t.startswith("tasd-replicate") for t in exchange), made
        assert agreement and all(t == "MainThread" for t in agreement), made
        assert exchange_groups == ["ring-exchange"], "created once per process (one ring pair group on 2 ranks)"


def find_then_load(rank, world, root, strategy):
    m = manager(root, strategy)
    latest = m.find_latest()
    searches = []
    real = m._advertised_parts
    m._advertised_parts = lambda: searches.append(1) or real()
    try:
        m.load()
    except CheckpointingException as e:
        assert not searches, "load must use what find_latest found, not search again"
        return latest, type(e).__name__, str(e)
    return latest, None, None


def test_loss_beyond_the_factor_falls_back_or_fails_clearly(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    run_ranks(save_steps, 3, tmp_path, strategy, [1])
    old = {p: p.read_bytes() for p in (tmp_path / SESSION).rglob("*.tasd")}
    run_ranks(save_steps, 3, tmp_path, strategy, [2])
    for p, data in old.items():  # iteration 1 still on disk, as if its cleanup had not run yet
        p.write_bytes(data)
    # ring factor 2: rank 1 holds rank 0's replica; losing nodes 0 and 1 loses rank 0's part of 2
    (tmp_path / SESSION / "0" / "iter_0000002_0_local.tasd").unlink()
    (tmp_path / SESSION / "1" / "iter_0000002_0_local.tasd").unlink()
    assert [r[0] for r in run_ranks(find_then_load, 3, tmp_path, strategy)] == [1, 1, 1], "falls back to 1"
    for p in old:
        p.unlink()
    for latest, kind, message in run_ranks(find_then_load, 3, tmp_path, strategy):
        assert latest == -1 and kind == "NoReplicasAvailableError"
        assert "iteration 2" in message and "rank 0" in message


def test_corrupt_replica_is_skipped_for_a_good_copy(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 3}  # 3 copies of each
    run_ranks(save_steps, 3, tmp_path, strategy, [5])
    shutil.rmtree(tmp_path / SESSION / "0")
    victim = tmp_path / SESSION / "1" / "iter_0000005_0_local.tasd"
    header = partio.read_header(victim)
    with open(victim, "r+b") as f:
        f.seek(header.data_offset + 10)
        f.write(b"\xff\xff")
    assert run_ranks(restore, 3, tmp_path, strategy) == [5, 5, 5]


def expect_mismatch(rank, world, root, strategy):
    with pytest.raises(ReplicationMismatchError) as info:
        manager(root, strategy).find_latest()
    return str(info.value)


@pytest.mark.parametrize("loaded_with", [
    {"strategy": "clique", "replication_jump": 1, "replication_factor": 2},
    {"strategy": "ring", "replication_jump": 1, "replication_factor": 4},
    {"strategy": "ring", "replication_jump": 3, "replication_factor": 2},
    None,
])
def test_mismatched_settings_raise_on_every_rank(tmp_path, loaded_with):
    saved_with = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    run_ranks(save_steps, 4, tmp_path, saved_with, [3])
    for message in run_ranks(expect_mismatch, 4, tmp_path, loaded_with):
        assert "iteration 3" in message and "ring, factor 2, jump 1" in message
        assert (ReplicationConfig(**loaded_with).describe() if loaded_with else "no replication") in message


def failing_replicated_save(rank, world, root, strategy):
    m = manager(root, strategy)
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    bad = state(rank, 2)
    if rank == 2:
        bad["opaque"] = type("Opaque", (), {})()
        bad["opaque"].t = torch.ones(1)
    try:
        m.save(BasicTensorAwareStateDict(bad), 2)
    except (TypeError, CheckpointingException) as e:
        error = str(e)
    else:
        error = None
    return error, files(Path(root), rank)


def test_failed_replicated_save_keeps_the_previous_checkpoint_everywhere(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    out = run_ranks(failing_replicated_save, 3, tmp_path, strategy)
    for rank, (error, names) in enumerate(out):
        assert error and "opaque" in error
        assert all(n.startswith("iter_0000001_") for n in names) and len(names) == 2
    assert run_ranks(restore, 3, tmp_path, strategy) == [1, 1, 1]


def dies_in_save(rank, world, root, strategy):
    m = manager(root, strategy)
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    if rank == 1:
        os._exit(9)  # the node dies before the next save's exchange
    m.save(BasicTensorAwareStateDict(state(rank, 2)), 2)


def test_dead_peer_during_replicated_save_is_an_error_not_a_hang(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    with pytest.raises(RankFailure) as info:
        run_ranks(dies_in_save, 3, tmp_path, strategy, collective_timeout_s=5, timeout_s=60)
    assert "exit code 9" in info.value.failures[1]
    for r in (0, 2):
        assert "timed out after 60s and was killed" not in info.value.failures[r]  # failed on its own
        assert "PeerUnreachableError" in info.value.failures[r]  # a CheckpointingException
    assert run_ranks(restore, 3, tmp_path, strategy) == [1, 1, 1]


def pool_counts(rank, world, root, strategy):
    from tasd import default_pool
    pool, m, counts = default_pool(), manager(root, strategy), []
    for step in (1, 2, 3):
        m.save(BasicTensorAwareStateDict(state(rank, step)), step)
        counts.append((pool.allocations, pool.in_use_bytes, m.receive_pool.allocations, m.receive_pool.in_use_bytes))
    return counts


def test_replicated_saves_reuse_receive_buffers(tmp_path):
    strategy = {"strategy": "ring", "replication_jump": 1, "replication_factor": 3}  # 3 buffers at once
    for counts in run_ranks(pool_counts, 3, tmp_path, strategy):
        assert counts[0] == counts[1] == counts[2], "no host memory allocated after the first save"
        assert counts[0] == (1, 0, 2, 0), "own part + two received parts (pageable), all released"


def write_paths(rank, world, root, strategy, direct_io, is_async):
    """Which parts were written with O_DIRECT: owner -> direct_io flag as the writers got it."""
    from tasd.managers import local_manager
    from tasd.managers.async_ckpt import AsyncCallsQueue
    got = {}
    real_encoded = local_manager.write_encoded

    def encoded(path, offset, buffer, prefix, direct_io):
        got[int(Path(path).name.split("_")[2])] = direct_io
        return real_encoded(path, offset, buffer, prefix, direct_io=direct_io)
    local_manager.write_encoded = encoded
    m = LocalCheckpointManager(root, SESSION, ReplicationConfig(**strategy).build(), direct_io=direct_io)
    if is_async:
        queue = AsyncCallsQueue()  # forks: the worker's write_part call is seen through its arguments
        req = m.save(BasicTensorAwareStateDict(state(rank, 1)), 1, is_async=True)
        got[rank] = req.async_fn_args[-1]
        queue.schedule_async_request(req)
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    else:
        m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    local_manager.write_encoded = real_encoded
    return got


@pytest.mark.parametrize("is_async", [False, True])
def test_own_part_goes_through_the_page_cache_and_replicas_direct_by_default(ranks, tmp_path, is_async):
    ring = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    for direct_io, own, replica in ((None, False, True), (True, True, True), (False, False, False)):
        root = tmp_path / str(direct_io)
        out = ranks(write_paths, 2, root, ring, direct_io, is_async)
        assert out == [{0: own, 1: replica}, {1: own, 0: replica}], f"direct_io={direct_io}"
