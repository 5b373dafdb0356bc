"""LocalCheckpointManager driven on real ranks (processes + gloo), each rank with its own directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from tasd import BasicTensorAwareStateDict, default_pool
from tasd.launch import RankFailure
from tasd.managers import CheckpointingException, LocalCheckpointManager
from tasd.managers import partio
from tests.test_basic_state_dict import assert_same, every_kind

SESSION = "job"


def rank_state(rank: int, step: int) -> dict:
    """Every kind of tensor and structure, with contents that depend on rank and step."""
    sd = every_kind()
    sd["rank_step"] = torch.full((1000,), rank * 1000 + step, dtype=torch.int64)
    sd["scalars"]["step"] = step
    return sd


def part_files(root: Path, rank: int) -> list[str]:
    d = root / SESSION / str(rank)
    return sorted(os.listdir(d)) if d.exists() else []


# -- round trip, restart, cleanup ------------------------------------------------------------

def save_steps(rank, world, root, steps):
    m = LocalCheckpointManager(root, SESSION)
    assert m.local_ckpt_dir == Path(root) / SESSION / str(rank)
    for step in steps:
        m.save(BasicTensorAwareStateDict(rank_state(rank, step)), step)
    m.wait_for_cleanup()
    return part_files(Path(root), rank), m.latest_iteration


def load_latest(rank, world, root, twice=False):
    m = LocalCheckpointManager(root, SESSION)
    latest = m.find_latest()
    if latest < 0:
        return latest, None
    sd, ckpt_id = m.load()
    assert ckpt_id == (latest, rank, SESSION)
    assert_same(sd.state_dict, rank_state(rank, latest))
    if twice:  # Megatron reads a local checkpoint twice
        sd2, _ = m.load()
        assert_same(sd2.state_dict, sd.state_dict)
    return latest, ckpt_id


def test_round_trip_restart_and_cleanup(ranks, tmp_path):
    out = ranks(save_steps, 3, tmp_path, [10, 20, 30])
    for rank, (files, latest) in enumerate(out):
        assert files == [f"iter_0000030_{rank}_local.tasd"], "older iterations are cleaned up"
        assert latest == 30
    # A restart: new processes, new managers.
    assert ranks(load_latest, 3, tmp_path, twice=True) == [(30, (30, r, SESSION)) for r in range(3)]


def test_point_in_time_snapshot(ranks, tmp_path):
    ranks(mutate_after_save, 2, tmp_path)


def mutate_after_save(rank, world, root):
    live = {"w": torch.zeros(100), "b": [torch.ones(4)]}
    m = LocalCheckpointManager(root, SESSION)
    sd = BasicTensorAwareStateDict(live)
    m.save(sd, 1)
    assert not sd.is_hollow and sd.state_dict["w"] is live["w"], "the caller's state dict is left as it was"
    live["w"].add_(5)
    live["b"][0].mul_(3)
    loaded, _ = LocalCheckpointManager(root, SESSION).load()
    assert torch.equal(loaded.state_dict["w"], torch.zeros(100))
    assert torch.equal(loaded.state_dict["b"][0], torch.ones(4))


# -- damage: find_latest skips what does not verify ---------------------------------------------

def keep_old_iteration(root: Path, world: int, iteration: int) -> dict[Path, bytes]:
    """Copies of every rank's files of ``iteration`` (put back later to stand for an older
    complete checkpoint that was not cleaned up yet)."""
    return {p: p.read_bytes() for r in range(world)
            for p in (root / SESSION / str(r)).glob(f"iter_{iteration:07d}_*")}


def find_latest_only(rank, world, root):
    return LocalCheckpointManager(root, SESSION).find_latest()


@pytest.mark.parametrize("damage", ["delete", "truncate", "bitflip"])
def test_damaged_part_is_skipped_and_load_falls_back(ranks, tmp_path, damage):
    ranks(save_steps, 2, tmp_path, [1])
    old = keep_old_iteration(tmp_path, 2, 1)
    ranks(save_steps, 2, tmp_path, [2])
    for path, data in old.items():
        path.write_bytes(data)
    victim = tmp_path / SESSION / "1" / "iter_0000002_1_local.tasd"
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        header = partio.read_header(victim)
        with open(victim, "r+b") as f:
            f.seek(header.data_offset + 4097)
            byte = f.read(1)
            f.seek(header.data_offset + 4097)
            f.write(bytes([byte[0] ^ 1]))
    # A header that fails its checks is skipped by find_latest; damage inside the data is found
    # when load reads the part (in the background from find_latest on), and load falls back.
    found = 2 if damage == "bitflip" else 1
    assert ranks(find_then_load, 2, tmp_path) == [(found, 1, None)] * 2
    # Without the older iteration there is nothing to load.
    for path in old:
        path.unlink()
    out = ranks(find_then_load, 2, tmp_path)
    if damage == "bitflip":
        assert all(f == 2 and it is None and "found damaged on rank(s) [1]" in err for f, it, err in out), out
    else:
        assert all(f == -1 and it is None and "cannot be recovered: no rank holds the part of rank 1" in err
                   for f, it, err in out), out


def find_then_load(rank, world, root):
    """(find_latest's answer, the iteration load returned or None, load's error or None)."""
    m = LocalCheckpointManager(root, SESSION)
    found = m.find_latest()
    try:
        sd, (iteration, _, _) = m.load()
    except CheckpointingException as e:
        return found, None, str(e)
    assert_same(sd.state_dict, rank_state(rank, iteration))
    return found, iteration, None


# -- failures on one rank become errors on every rank ------------------------------------------

def failing_save(rank, world, root, how):
    m = LocalCheckpointManager(root, SESSION)
    m.save(BasicTensorAwareStateDict(rank_state(rank, 1)), 1)
    state = rank_state(rank, 2)
    if rank == 1 and how == "hidden_tensor":
        state["bad"] = [type("Opaque", (), {})()]
        state["bad"][0].t = torch.ones(1)
    if rank == 1 and how == "disk_full":
        def full(*a, **k):
            raise OSError(28, "No space left on device")
        partio.os.fsync = full
    if how == "mismatched_iteration":
        step = 2 + rank
    else:
        step = 2
    try:
        m.save(BasicTensorAwareStateDict(state), step)
    except (CheckpointingException, TypeError) as e:
        error = f"{type(e).__name__}: {e}"
    else:
        error = None
    return error, part_files(Path(root), rank), load_latest(rank, world, root)


@pytest.mark.parametrize("how", ["hidden_tensor", "disk_full", "mismatched_iteration"])
def test_failure_on_one_rank_raises_everywhere_and_keeps_previous(ranks, tmp_path, how):
    out = ranks(failing_save, 2, tmp_path, how)
    (err0, files0, loaded0), (err1, files1, loaded1) = out
    assert err0 and err1, "every rank raises"
    if how == "hidden_tensor":
        assert err1.startswith("TypeError") and "bad[0]" in err1
        assert "rank(s) [1]" in err0 and "bad[0]" in err0
    elif how == "disk_full":
        assert "No space left" in err1 and "rank(s) [1]" in err0
    else:
        assert "different iterations" in err0 and "different iterations" in err1
    assert files0 == ["iter_0000001_0_local.tasd"] and files1 == ["iter_0000001_1_local.tasd"]
    assert loaded0 == (1, (1, 0, SESSION)) and loaded1 == (1, (1, 1, SESSION))


def crash_before_publish(rank, world, root, where):
    m = LocalCheckpointManager(root, SESSION)
    m.save(BasicTensorAwareStateDict(rank_state(rank, 1)), 1)
    if rank == 1:
        def die(*a, **k):
            os._exit(17)  # the node dies before its part of iteration 2 is published
        if where == "write":  # after writing the .dirty file, before renaming it
            partio.os.rename = die
        else:  # after storing the part unpublished, before publishing it
            LocalCheckpointManager._publish = die
    m.save(BasicTensorAwareStateDict(rank_state(rank, 2)), 2)


@pytest.mark.parametrize("where,leftover", [("write", "iter_0000002_1_local.tasd.pending.dirty"),
                                            ("publish", "iter_0000002_1_local.tasd.pending")])
def test_crash_before_publishing_keeps_previous_checkpoint(tmp_path, where, leftover):
    from tasd.launch import run_ranks
    with pytest.raises(RankFailure) as info:
        run_ranks(crash_before_publish, 2, tmp_path, where, collective_timeout_s=5, timeout_s=60)
    assert set(info.value.failures) == {0, 1}, "the survivor's collective fails instead of hanging"
    assert "exit code 17" in info.value.failures[1]
    assert (tmp_path / SESSION / "1" / leftover).exists()
    assert part_files(tmp_path, 0) == ["iter_0000001_0_local.tasd"], "the survivor removed what it stored"
    assert run_ranks(load_latest, 2, tmp_path, timeout_s=60) == [(1, (1, r, SESSION)) for r in range(2)]
    assert part_files(tmp_path, 1) == ["iter_0000001_1_local.tasd"], "the stale file is removed"


# -- staging reuse, validation, world size ------------------------------------------------------

def pool_counters(rank, world, root):
    pool = default_pool()
    m = LocalCheckpointManager(root, SESSION)
    counts = []
    for step in (1, 2, 3):
        m.save(BasicTensorAwareStateDict(rank_state(rank, step)), step)
        counts.append((pool.allocations, pool.reuses, pool.in_use_bytes))
    return counts


def test_second_save_allocates_no_host_memory(ranks, tmp_path):
    for counts in ranks(pool_counters, 2, tmp_path):
        (a1, r1, u1), (a2, r2, u2), (a3, r3, u3) = counts
        assert a1 == a2 == a3, "no new staging buffer after the first save"
        assert (r2, r3) == (r1 + 1, r1 + 2) and u1 == u2 == u3 == 0


def test_bad_arguments(tmp_path):
    for bad in ("..", ".", "a/b", "a\\b"):
        with pytest.raises(ValueError, match="session_id"):
            LocalCheckpointManager(tmp_path, bad)
    with pytest.raises(TypeError, match="bogus"):
        LocalCheckpointManager(tmp_path, "s", bogus=1)
    m = LocalCheckpointManager(tmp_path, "s")  # no process group: a world of one
    sd = BasicTensorAwareStateDict({"w": torch.ones(2)})
    with pytest.raises(TypeError):
        m.save({"w": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match="iteration"):
        m.save(sd, -1)
    m.save(sd, 5)
    with pytest.raises(CheckpointingException, match="iteration 5.*already saved or is saving iteration 5"):
        m.save(sd, 5)
    with pytest.raises(CheckpointingException, match="iteration 4.*already saved or is saving iteration 5"):
        m.save(sd, 4)
    fresh = LocalCheckpointManager(tmp_path, "s")  # a new run replaces what an earlier one left
    fresh.save(sd, 4)
    assert fresh.find_latest() == 4
    with pytest.raises(CheckpointingException, match="no checkpoint"):
        LocalCheckpointManager(tmp_path, "other").load()


def test_checkpoint_of_another_world_size_is_ignored(ranks, tmp_path, caplog):
    ranks(save_steps, 2, tmp_path, [3])
    with caplog.at_level(logging.WARNING, logger="tasd.managers"):
        assert LocalCheckpointManager(tmp_path, SESSION).find_latest() == -1  # world of one now
    assert "world size 2" in caplog.text


def corrupt_between_find_and_load(rank, world, root):
    ranks_root = Path(root)
    m = LocalCheckpointManager(root, SESSION)
    m.save(BasicTensorAwareStateDict(rank_state(rank, 4)), 4)
    m2 = LocalCheckpointManager(root, SESSION)
    assert m2.find_latest() == 4
    if rank == 0:
        victim = ranks_root / SESSION / "0" / "iter_0000004_0_local.tasd"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    try:
        m2.load()
    except CheckpointingException as e:
        return str(e)
    return None


def test_part_damaged_after_find_latest_fails_load_on_every_rank(ranks, tmp_path):
    err0, err1 = ranks(corrupt_between_find_and_load, 2, tmp_path)
    assert "checksum mismatch" in err0 and "iter_0000004_0_local.tasd" in err0
    assert "rank(s) [0]" in err1 and "checksum mismatch" in err1


def loaded_tensors_stand_alone(rank, world, root):
    rng = torch.get_rng_state()
    m = LocalCheckpointManager(root, SESSION)
    m.save(BasicTensorAwareStateDict({"pad": torch.ones(5000), "rng": rng, "w": torch.arange(10.0)}), 1)
    sd, _ = LocalCheckpointManager(root, SESSION).load()
    torch.set_rng_state(sd.state_dict["rng"])  # reads from its storage's start: must be the tensor's
    assert torch.equal(torch.get_rng_state(), rng)
    path = Path(root) / f"w{rank}.pt"
    torch.save(sd.state_dict["w"], path)
    return sd.state_dict["w"], path.stat().st_size  # a tensor result travels back to the parent


def test_loaded_tensors_have_their_own_storage(ranks, tmp_path):
    for w, size in ranks(loaded_tensors_stand_alone, 2, tmp_path):
        assert torch.equal(w, torch.arange(10.0))
        assert size < 5000, "torch.save of one loaded tensor must not write the whole part"


def test_restart_reads_the_part_once(tmp_path, monkeypatch):
    from tasd.managers import local_manager
    LocalCheckpointManager(tmp_path, SESSION).save(BasicTensorAwareStateDict(rank_state(0, 3)), 3)
    reads = []
    real = local_manager.read_part
    monkeypatch.setattr(local_manager, "read_part", lambda p: reads.append(p) or real(p))
    fresh = LocalCheckpointManager(tmp_path, SESSION)
    assert fresh.find_latest() == 3 and len(reads) == 1  # verified by reading it whole
    first, _ = fresh.load()
    assert len(reads) == 1, "load uses what find_latest read"
    second, _ = fresh.load()
    assert len(reads) == 2, "a second load reads again: its tensors are its own"
    first.state_dict["rank_step"].zero_()
    assert_same(second.state_dict, rank_state(0, 3))
