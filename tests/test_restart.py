"""A restart reads what it needs once: its own part whole, replicas only when their owner lost its
part, and a replica found damaged when it is read is never used (another holder, or an older
checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasd.managers import CheckpointingException, partio
from tests.test_basic_state_dict import assert_same
from tests.test_replicated_manager import SESSION, manager, save_steps, state

RING2 = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}


def count_reads(rank, world, root, strategy):
    from tasd.managers import local_manager
    reads = {"whole": 0, "raw": 0, "header": 0}
    real = {"whole": local_manager.read_part, "raw": local_manager.open_raw_part,
            "header": local_manager.read_header}

    def counted(kind):
        def call(path, *args):
            reads[kind] += 1
            return real[kind](path, *args)
        return call

    local_manager.read_part, local_manager.open_raw_part, local_manager.read_header = (
        counted("whole"), counted("raw"), counted("header"))
    m = manager(root, strategy)
    latest = m.find_latest()
    sd, _ = m.load()
    assert_same(sd.state_dict, state(rank, latest))
    return latest, reads


def test_restart_reads_the_own_part_once_and_no_replica(ranks, tmp_path):
    ranks(save_steps, 3, tmp_path, RING2, [4])
    for latest, reads in ranks(count_reads, 3, tmp_path, RING2):
        assert latest == 4
        assert reads == {"whole": 1, "raw": 0, "header": 2}, "every header; the own part read whole once"


def test_recovery_reads_the_replica_once(ranks, tmp_path):
    ranks(save_steps, 3, tmp_path, RING2, [4])
    shutil.rmtree(tmp_path / SESSION / "0")  # node 0 lost: rank 1 holds its replica
    out = ranks(count_reads, 3, tmp_path, RING2)
    assert [latest for latest, _ in out] == [4, 4, 4]
    assert out[0][1] == {"whole": 0, "raw": 0, "header": 0}
    assert out[1][1] == {"whole": 1, "raw": 1, "header": 2}, "the holder reads the replica once, to send it"


def damage_data(path: Path) -> None:
    header = partio.read_header(path)
    with open(path, "r+b") as f:
        f.seek(header.data_offset + 10)
        f.write(b"\xff\xff\xff")


def load_what_there_is(rank, world, root, strategy):
    m = manager(root, strategy)
    found = m.find_latest()
    try:
        sd, (iteration, _, _) = m.load()
    except CheckpointingException as e:
        return found, None, str(e)
    assert_same(sd.state_dict, state(rank, iteration))
    return found, iteration, None


def test_damaged_replica_found_at_load_falls_back_to_an_older_checkpoint(ranks, tmp_path):
    ranks(save_steps, 3, tmp_path, RING2, [1])
    old = {p: p.read_bytes() for p in (tmp_path / SESSION).rglob("*.tasd")}
    ranks(save_steps, 3, tmp_path, RING2, [2])
    for p, data in old.items():  # iteration 1 still on disk, as if its cleanup had not run yet
        p.write_bytes(data)
    (tmp_path / SESSION / "0" / "iter_0000002_0_local.tasd").unlink()  # rank 0 lost its part of 2
    damage_data(tmp_path / SESSION / "1" / "iter_0000002_0_local.tasd")  # and its only replica is bad
    assert ranks(load_what_there_is, 3, tmp_path, RING2) == [(2, 1, None)] * 3, \
        "find_latest trusts the replica's header; load finds it damaged and falls back to iteration 1"
    for p in old:
        p.unlink()
    for found, loaded, error in ranks(load_what_there_is, 3, tmp_path, RING2):
        assert (found, loaded) == (2, None)
        assert "found damaged on rank(s) [1]" in error and "checksum mismatch" in error
        assert "no older complete checkpoint" in error


def test_damaged_replica_is_replaced_by_another_holder(ranks, tmp_path):
    ring3 = {"strategy": "ring", "replication_jump": 1, "replication_factor": 3}
    ranks(save_steps, 3, tmp_path, ring3, [5])
    shutil.rmtree(tmp_path / SESSION / "0")
    damage_data(tmp_path / SESSION / "1" / "iter_0000005_0_local.tasd")  # the first holder's copy
    assert ranks(load_what_there_is, 3, tmp_path, ring3) == [(5, 5, None)] * 3
