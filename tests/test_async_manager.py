"""Asynchronous local saves: LocalCheckpointManager.save(is_async=True) with both queue kinds, on
real ranks with real files. Multi-rank bodies are module-level functions run by ``ranks``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tasd import BasicTensorAwareStateDict
from tasd.managers import CheckpointingException, LocalCheckpointManager, ReplicationConfig
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest, abort_async_checkpoints
from tasd.staging import HostBufferPool
from tests.test_basic_state_dict import assert_same

SESSION = "async"
CLIQUE2 = {"strategy": "clique", "replication_jump": 1, "replication_factor": 2}
WAIT_S = 30.0  # every blocking wait in these tests ends by then
KINDS = pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "temporal"])


def state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {"w": torch.randn(50_000, generator=g), "layers": [torch.randn(33, 7, generator=g).to(torch.bfloat16)],
            "step": step, "note": f"rank {rank}"}


def manager(root, repl, **options) -> LocalCheckpointManager:
    strategy = None if repl is None else ReplicationConfig(**repl).build()
    return LocalCheckpointManager(root, SESSION, strategy, **options)


def save_async(m: LocalCheckpointManager, q: AsyncCallsQueue, sd: dict, step: int) -> int:
    req = m.save(BasicTensorAwareStateDict(sd), step, is_async=True)
    assert isinstance(req, AsyncRequest)
    return q.schedule_async_request(req)


def names(m: LocalCheckpointManager) -> list[str]:
    m.wait_for_cleanup()
    return sorted(os.listdir(m.local_ckpt_dir)) if m.local_ckpt_dir.exists() else []


def worker_pid(q: AsyncCallsQueue) -> int:
    caller = q._persistent_caller if q.persistent else q._calls[-1][1]
    return caller._proc.pid


# -- async equals sync, snapshot --------------------------------------------------------------------

def same_save(a: Path, b: Path) -> bool:
    """The two part files are byte for byte equal but for their save ids (random per save, fixed
    width) and the header checksum that covers them."""
    from dataclasses import replace
    from tasd.managers.partio import read_header
    ha, hb = read_header(a), read_header(b)
    rest_a, rest_b = a.read_bytes()[ha.hollow_offset:], b.read_bytes()[hb.hollow_offset:]
    return (ha.hollow_offset == hb.hollow_offset and rest_a == rest_b
            and replace(ha.meta, save_id="") == replace(hb.meta, save_id="") and ha.meta.save_id != hb.meta.save_id)


def async_equals_sync(rank, world, root, persistent, repl):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    sync_m, async_m = manager(Path(root) / "sync", repl), manager(Path(root) / "async", repl)
    for step in (1, 2):
        assert sync_m.save(BasicTensorAwareStateDict(state(rank, step)), step) is None
        live = state(rank, step)
        save_async(async_m, q, live, step)
        live["w"].mul_(-1)  # training goes on: in-place updates after save returned are not saved
        live["layers"][0].zero_()
        q.maybe_finalize_async_calls(blocking=True)
    stats = async_m.last_save
    assert stats.is_async and stats.iteration == 2 and 0 < stats.stall_s <= stats.total_s
    files = names(async_m)
    identical = all(same_save(async_m.local_ckpt_dir / n, sync_m.local_ckpt_dir / n) for n in files)
    q.close()
    sd, ckpt_id = manager(Path(root) / "async", repl).load()
    assert_same(sd.state_dict, state(rank, 2))
    return files, names(sync_m), identical, ckpt_id


@KINDS
@pytest.mark.parametrize("repl", [None, CLIQUE2], ids=["no-replication", "clique2"])
def test_async_save_equals_sync_and_is_a_snapshot(ranks, tmp_path, persistent, repl):
    for rank, (files, sync_files, identical, ckpt_id) in enumerate(ranks(async_equals_sync, 2, tmp_path,
                                                                          persistent, repl)):
        expected = [f"iter_0000002_{o}_local.tasd" for o in ([rank] if repl is None else [0, 1])]
        assert files == sync_files == expected, "published, older iteration cleaned up, nothing left over"
        assert identical, "async files are byte for byte the synchronous ones"
        assert ckpt_id == (2, rank, SESSION)


# -- failures ---------------------------------------------------------------------------------------

class BlockedFirst:
    """An async_fn that first blocks opening a FIFO for reading (nobody writes it), then runs ``fn``."""

    def __init__(self, fifo: str, fn):
        self.fifo, self.fn = fifo, fn

    def __call__(self, *args, **kwargs):
        with open(self.fifo, "rb"):
            pass
        return self.fn(*args, **kwargs)


def killed_worker(rank, world, root, persistent):
    m = manager(root, CLIQUE2)
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    save_async(m, q, state(rank, 1), 1)
    q.maybe_finalize_async_calls(blocking=True)
    req = m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True)
    if rank == 1:  # the writer blocks opening a FIFO until it is killed
        fifo = Path(root) / "stuck"
        os.mkfifo(fifo)
        req = req._replace(async_fn=BlockedFirst(str(fifo), req.async_fn))
    q.schedule_async_request(req)
    if rank == 1:
        time.sleep(0.5)
        os.kill(worker_pid(q), signal.SIGKILL)
    with pytest.raises(CheckpointingException) as info:
        q.maybe_finalize_async_calls(blocking=True)
    latest = m.find_latest()  # drops the failed save: its files go
    left = names(m)
    sd, _ = m.load()
    assert_same(sd.state_dict, state(rank, 1))
    save_async(m, q, state(rank, 3), 3)  # and saving goes on
    q.maybe_finalize_async_calls(blocking=True)
    q.close()
    return str(info.value), latest, left, names(m)


@KINDS
def test_worker_killed_mid_save_raises_everywhere_and_previous_loads(ranks, tmp_path, persistent):
    for err, latest, left, final in ranks(killed_worker, 2, tmp_path, persistent):
        assert "rank(s) [1]" in err and "SIGKILL" in err
        assert latest == 1
        assert left == ["iter_0000001_0_local.tasd", "iter_0000001_1_local.tasd"], "no trace of iteration 2"
        assert final == ["iter_0000003_0_local.tasd", "iter_0000003_1_local.tasd"]


def failing_writer(rank, world, root, persistent):
    m = manager(root, None)
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    save_async(m, q, state(rank, 1), 1)
    req = m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True)  # finalizes iteration 1 first
    blocker = m.local_ckpt_dir / "iter_0000002_1_local.tasd.pending.dirty"
    if rank == 1:  # opening the file to write raises IsADirectoryError in the worker
        blocker.mkdir()
    q.schedule_async_request(req)
    with pytest.raises(CheckpointingException) as info:
        q.maybe_finalize_async_calls(blocking=True)
    if rank == 1:
        blocker.rmdir()
    m.save(BasicTensorAwareStateDict(state(rank, 3)), 3)  # synchronous: the failed save is dropped first
    q.close()
    return str(info.value), names(m)


@KINDS
def test_exception_in_async_fn_surfaces_on_every_rank(ranks, tmp_path, persistent):
    for rank, (err, files) in enumerate(ranks(failing_writer, 2, tmp_path, persistent)):
        assert "rank(s) [1]" in err and "IsADirectoryError" in err and "store_own_part" in err
        assert files == [f"iter_0000003_{rank}_local.tasd"]


def abort_then_save(rank, world, root, persistent):
    m = manager(root, CLIQUE2)
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    save_async(m, q, state(rank, 1), 1)
    q.maybe_finalize_async_calls(blocking=True)
    save_async(m, q, state(rank, 2), 2)
    aborted = abort_async_checkpoints()  # e.g. training restarts in this process after a fault
    q2 = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    save_async(m, q2, state(rank, 3), 3)
    q2.maybe_finalize_async_calls(blocking=True)
    q2.close()
    sd, ckpt_id = manager(root, CLIQUE2).load()
    assert_same(sd.state_dict, state(rank, 3))
    return aborted, q.get_num_unfinalized_calls(), names(m), ckpt_id


@KINDS
def test_abort_then_save_again(ranks, tmp_path, persistent):
    for rank, (aborted, left_in_old_queue, files, ckpt_id) in enumerate(ranks(abort_then_save, 2, tmp_path,
                                                                              persistent)):
        assert aborted >= 1 and left_in_old_queue == 0
        assert files == ["iter_0000003_0_local.tasd", "iter_0000003_1_local.tasd"]
        assert ckpt_id == (3, rank, SESSION)


def _unrelated_failure(rank: int) -> None:  # module level: it runs in the queue's worker
    raise ValueError(f"unrelated failure on rank {rank}")


def earlier_call_fails(rank, world, root):
    m = manager(root, None)
    q = AsyncCallsQueue(persistent=False, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_unrelated_failure, (rank,), []))
    save_async(m, q, state(rank, 1), 1)
    with pytest.raises(CheckpointingException, match="unrelated failure"):
        m.find_latest()  # finalizing through the save's call meets the failed earlier call first
    latest = m.find_latest()  # the save stayed queued and pending: finalized now
    sd, _ = m.load()
    assert_same(sd.state_dict, state(rank, 1))
    q.close()
    return latest, names(m)


def test_failure_of_an_earlier_call_in_the_queue_keeps_the_save(ranks, tmp_path):
    for rank, (latest, files) in enumerate(ranks(earlier_call_fails, 2, tmp_path)):
        assert latest == 1 and files == [f"iter_0000001_{rank}_local.tasd"]


# -- saves in flight, unscheduled requests, execute_sync ---------------------------------------------

def in_flight(rank, world, root):
    m = manager(root, None, max_saves_in_flight=2)
    q = AsyncCallsQueue(persistent=False, wait_timeout_s=WAIT_S)
    save_async(m, q, state(rank, 1), 1)
    save_async(m, q, state(rank, 2), 2)
    two = (q.get_num_unfinalized_calls(), m.latest_iteration)
    save_async(m, q, state(rank, 3), 3)  # a third one finalizes the oldest first
    three = (q.get_num_unfinalized_calls(), m.latest_iteration)
    with pytest.raises(CheckpointingException, match="already saved or is saving iteration 3; iterations must increase"):
        m.save(BasicTensorAwareStateDict(state(rank, 3)), 3, is_async=True)  # 3 is in flight
    lost = m.save(BasicTensorAwareStateDict(state(rank, 4)), 4, is_async=True)  # never scheduled
    m.save(BasicTensorAwareStateDict(state(rank, 5)), 5)  # sync: finalizes 3, drops 4
    after_sync = (q.get_num_unfinalized_calls(), names(m))
    with pytest.raises(CheckpointingException, match="4 was not published: its request was never scheduled"):
        lost.finalize_fns[0]()  # a queue finalizing it late is told it was lost, not that it saved
    del lost
    m.save(BasicTensorAwareStateDict(state(rank, 6)), 6, is_async=True).execute_sync()
    q.close()
    return two, three, after_sync, m.latest_iteration, names(m)


def test_saves_in_flight_are_bounded_and_unscheduled_requests_dropped(ranks, tmp_path):
    for rank, (two, three, after_sync, latest, files) in enumerate(ranks(in_flight, 2, tmp_path)):
        assert two == (2, None)
        assert three == (2, 1), "the oldest save was finalized (published) before the third started"
        assert after_sync == (0, [f"iter_0000005_{rank}_local.tasd"]), "iteration 4 dropped, 3 superseded"
        assert latest == 6 and files == [f"iter_0000006_{rank}_local.tasd"]


def taken_elsewhere(rank, world, root):
    """Requests taken by a queue tasd does not hold (it freezes them and tells nothing else): one
    whose writer ran in that queue's forked worker is waited for and published by the next save;
    one whose writer never runs fails on every rank once the collective timeout passes (no hang),
    its buffer is never reused, and that queue's late finalize raises."""
    import multiprocessing as mp
    m = manager(root, CLIQUE2)
    first = m.save(BasicTensorAwareStateDict(state(rank, 1)), 1, is_async=True).freeze()  # "the other queue"
    worker = mp.get_context("fork").Process(target=first.async_fn, args=first.async_fn_args)
    worker.start()
    m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True).freeze()  # never runs
    published = m.latest_iteration  # save 2 waited for save 1's writer and published it
    worker.join(WAIT_S)
    first.finalize_fns[0]()  # the other queue finalizes save 1 later: nothing left to do
    t = time.monotonic()
    with pytest.raises(CheckpointingException, match="async writer did not finish within") as failed:
        m.find_latest()
    waited = time.monotonic() - t
    return published, str(failed.value), waited, m.find_latest(), names(m)


def test_requests_taken_by_another_queue_are_waited_for_and_never_hang(ranks, tmp_path):
    for rank, (published, error, waited, latest, files) in enumerate(
            ranks(taken_elsewhere, 2, tmp_path, collective_timeout_s=4)):
        assert published == 1
        assert error.startswith(f"rank {rank}: the async save of iteration 2 failed: its async writer did not finish")
        assert 3.5 < waited < 15, waited
        assert latest == 1 and files == [f"iter_0000001_{r}_local.tasd" for r in (0, 1)]


def test_bad_options():
    with pytest.raises(ValueError, match="max_saves_in_flight"):
        LocalCheckpointManager("/tmp/unused", max_saves_in_flight=0)
    with pytest.raises(ValueError, match="shared=True"):
        LocalCheckpointManager("/tmp/unused", async_pool=HostBufferPool())
    with pytest.raises(TypeError, match="is_async"):
        LocalCheckpointManager("/tmp/unused").save(BasicTensorAwareStateDict({}), 1, is_async="yes")


# -- host memory stays flat ---------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def many_saves(rank, world, root):
    pool, async_pool = HostBufferPool(), HostBufferPool(shared=True)
    m = manager(root, CLIQUE2, pool=pool, async_pool=async_pool)
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S)
    sd = {"w": torch.randn(1 << 20), "step": 0}  # 4 MiB
    rss = []
    for step in range(1, 21):
        sd["step"] = step
        saved = sd["w"].clone()
        save_async(m, q, sd, step)
        sd["w"].add_(1)
        if step % 2:  # every other save is left for the next save to finalize
            q.maybe_finalize_async_calls(blocking=False)
        rss.append(_rss_bytes())
    q.maybe_finalize_async_calls(blocking=True)
    q.close()
    loaded, _ = manager(root, CLIQUE2).load()
    assert torch.equal(loaded.state_dict["w"], saved) and loaded.state_dict["step"] == 20
    return (async_pool.allocations, async_pool.reuses, async_pool.in_use_bytes, m.receive_pool.allocations,
            m.receive_pool.in_use_bytes, rss, names(m))


def test_twenty_async_saves_keep_host_memory_flat(ranks, tmp_path):
    for a_alloc, a_reuse, a_in_use, r_alloc, r_in_use, rss, files in ranks(many_saves, 2, tmp_path):
        assert (a_alloc, a_reuse, a_in_use) == (1, 19, 0), "one shared staging buffer, reused"
        assert (r_alloc, r_in_use) == (1, 0), "one receive buffer for the peer's part, reused"
        # Allocator warm-up settles within the first saves; a buffer leaked per save would add 40 MiB.
        growth = rss[-1] - rss[9]
        assert growth < 16 << 20, f"RSS grew {growth / 2**20:.1f} MiB over the last 10 saves of a 4 MiB state"
        assert files == ["iter_0000020_0_local.tasd", "iter_0000020_1_local.tasd"]
