"""The core under real conditions: tasd's own groups, one-rank failures, crashes mid-publish, save
identity, stale files. Each test reproduces a defect found by running the public API on real ranks.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tasd import BasicTensorAwareStateDict, HostBufferPool
from tasd.launch import RankFailure, run_ranks
from tasd.managers import CheckpointingException, LocalCheckpointManager
from tasd.managers.async_ckpt import AsyncCallsQueue
from tasd.managers.replication import LazyRingReplicationStrategy, RingReplicationStrategy
from tests.test_basic_state_dict import assert_same
from tests.test_local_manager import SESSION, part_files, rank_state


def state(rank: int, step: int) -> dict:
    return {"w": torch.full((4096,), float(rank * 100 + step)), "step": step}


def load(rank, world, root, session=SESSION, job_id=None, strategy=None):
    m = LocalCheckpointManager(root, session, strategy, job_id=job_id)
    latest = m.find_latest()
    if latest < 0:
        return latest, None
    sd, _ = m.load()
    return latest, float(sd.state_dict["w"][0])


# -- tasd's traffic runs on its own groups, created on the training thread ----------------------

def lazy_group_then_training_group(rank, world, root):
    m = LocalCheckpointManager(root, SESSION, LazyRingReplicationStrategy(1, 2))
    queue = AsyncCallsQueue(persistent=False)
    queue.schedule_async_request(m.save(BasicTensorAwareStateDict(state(rank, 1)), 1, is_async=True))
    # The training thread makes a group of its own while the replica exchange runs in the background.
    mine = dist.new_group()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=mine)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    return float(t)


def test_tasd_groups_leave_the_training_free_to_make_its_own(ranks, tmp_path):
    assert ranks(lazy_group_then_training_group, 2, tmp_path) == [3.0, 3.0]
    assert run_ranks(load, 2, tmp_path, strategy=LazyRingReplicationStrategy(1, 2)) == [(1, 1.0), (1, 101.0)]


def record_groups(rank, world, root):
    from tasd.managers import subgroups
    subgroups.TREE_FANOUT = 2  # agreements on a tree of 2-rank groups, as 64-rank ones at scale
    training, tasd_ops = [], []
    names = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "send", "recv", "isend",
             "irecv", "batch_isend_irecv", "new_group", "gather", "scatter", "reduce")
    real = {name: getattr(dist, name) for name in names}

    def spy(name):
        def call(*args, **kwargs):
            training.append(name)
            return real[name](*args, **kwargs)
        return call

    real_ops = {name: getattr(subgroups.Subgroup, name) for name in ("all_reduce", "broadcast", "send", "recv")}

    def spy_op(name):
        def call(self, *args, **kwargs):
            tasd_ops.append((name, self.purpose, self.size, type(self.pg).__name__))
            return real_ops[name](self, *args, **kwargs)
        return call

    for name in real:
        setattr(dist, name, spy(name))
    for name in real_ops:
        setattr(subgroups.Subgroup, name, spy_op(name))
    try:
        strategy = RingReplicationStrategy(1, 2)
        m = LocalCheckpointManager(root, SESSION, strategy)
        m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
        queue = AsyncCallsQueue(persistent=False)
        queue.schedule_async_request(m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True))
        queue.maybe_finalize_async_calls(blocking=True)
        fresh = LocalCheckpointManager(root, SESSION, strategy)
        fresh.find_latest()
        fresh.load()
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        for name, fn in real_ops.items():
            setattr(subgroups.Subgroup, name, fn)
    return training, tasd_ops


def test_tasd_never_uses_the_training_groups_nor_a_world_group(ranks, tmp_path):
    for training, tasd_ops in ranks(record_groups, 4, tmp_path):
        assert training == [], "tasd makes no call on torch.distributed's groups (the training's)"
        kinds = {name for name, _, _, _ in tasd_ops}
        assert kinds >= {"all_reduce", "broadcast", "send", "recv"}, kinds
        assert all(backend == "ProcessGroupGloo" for _, _, _, backend in tasd_ops)
        assert max(size for _, _, size, _ in tasd_ops) == 2, "no group of tasd spans more than its fanout or peers"


# -- a failure on one rank is an error on every rank, promptly, and the job stays usable ---------

class FailingPool(HostBufferPool):
    """Fails the ``fail_at``-th acquisition (1-based) with MemoryError."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError(f"cannot allocate {nbytes} bytes (injected)")
        return super().acquire(nbytes)


def receive_allocation_fails(rank, world, root):
    m = LocalCheckpointManager(root, SESSION, RingReplicationStrategy(1, 2))
    m.receive_pool = FailingPool(fail_at=2 if rank == 1 else 0)  # the receive buffer of the second save
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    t0 = time.monotonic()
    try:
        m.save(BasicTensorAwareStateDict(state(rank, 2)), 2)
        error = None
    except CheckpointingException as e:
        error = str(e)
    elapsed = time.monotonic() - t0
    t = torch.ones(1)
    dist.all_reduce(t)  # the training's own group still works
    m.save(BasicTensorAwareStateDict(state(rank, 3)), 3)  # and so does tasd's
    m.wait_for_cleanup()
    return error, elapsed, float(t), part_files(Path(root), rank)


def test_receive_allocation_failure_is_agreed_before_data_moves(ranks, tmp_path):
    out = ranks(receive_allocation_fails, 3, tmp_path)
    for rank, (error, elapsed, total, files) in enumerate(out):
        assert error is not None and ("rank(s) [1]" in error or "cannot allocate" in error), error
        assert elapsed < 10, f"rank {rank} took {elapsed:.1f}s: it waited for a timeout"
        assert total == 3.0
        assert files == [f"iter_0000003_{o}_local.tasd" for o in sorted({rank, (rank - 1) % 3})]


def frozen_peer(rank, world, root, pidfile):
    m = LocalCheckpointManager(root, SESSION, RingReplicationStrategy(1, 2))
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    if rank == 2:
        Path(pidfile).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not dead
    t0 = time.monotonic()
    try:
        m.save(BasicTensorAwareStateDict(state(rank, 2)), 2)
    except CheckpointingException as e:
        elapsed = time.monotonic() - t0
        Path(root, f"survivor{rank}").write_text(f"{elapsed}\n{e}")
    if rank == 0:
        for r in (1,):
            while not Path(root, f"survivor{r}").exists():
                time.sleep(0.1)
        os.kill(int(Path(pidfile).read_text()), signal.SIGKILL)


def test_frozen_peer_is_reported_within_one_timeout(tmp_path):
    timeout = 4.0
    with pytest.raises(RankFailure):
        run_ranks(frozen_peer, 3, tmp_path, str(tmp_path / "pid"), collective_timeout_s=timeout, timeout_s=60)
    for r in (0, 1):
        elapsed, message = (tmp_path / f"survivor{r}").read_text().split("\n", 1)
        assert float(elapsed) < 1.6 * timeout, f"rank {r} reported after {float(elapsed):.1f}s: {message}"


class Raising:
    """An async_fn that raises (a writer that fails), module-level so it pickles."""

    def __call__(self, *args, **kwargs):
        raise OSError(28, "No space left on device (injected)")


def failed_async_save_is_cleaned_at_once(rank, world, root, persistent):
    from tasd import HostBufferPool
    pool = HostBufferPool(shared=True)
    m = LocalCheckpointManager(root, SESSION, RingReplicationStrategy(1, 2), async_pool=pool)
    queue = AsyncCallsQueue(persistent=persistent)
    queue.schedule_async_request(m.save(BasicTensorAwareStateDict(state(rank, 1)), 1, is_async=True))
    queue.maybe_finalize_async_calls(blocking=True)
    request = m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True)
    if rank == 1:
        request = request._replace(async_fn=Raising())
    queue.schedule_async_request(request)
    try:
        queue.maybe_finalize_async_calls(blocking=True)
        error = None
    except CheckpointingException as e:
        error = str(e)
    # No manager call since: what the failed save stored and staged is gone already.
    left = sorted(os.listdir(m.local_ckpt_dir))
    in_use = pool.in_use_bytes
    queue.close()
    return error, left, in_use


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "temporal"])
def test_failed_async_save_is_removed_when_it_raises(ranks, tmp_path, persistent):
    for rank, (error, left, in_use) in enumerate(ranks(failed_async_save_is_cleaned_at_once, 2, tmp_path,
                                                       persistent)):
        assert error and "rank(s) [1]" in error and "No space left" in error
        assert left == [f"iter_0000001_{o}_local.tasd" for o in (0, 1)], "no trace of iteration 2"
        assert in_use == 0, "the staging buffer went back to its pool"


def copies_fail_after_the_agreement(rank, world, root, is_async):
    """Save 1, then save 2 where rank 1's device-to-host copies fail when waited for (as a CUDA
    error surfaces: after the agreement, which runs while the copies do)."""
    from tasd import staging
    pool = HostBufferPool(shared=True)
    m = LocalCheckpointManager(root, SESSION, RingReplicationStrategy(1, 2), pool=pool, async_pool=pool)
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    if rank == 1:
        def failing_wait(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        staging.Staged.wait = failing_wait
    queue = AsyncCallsQueue(persistent=False)
    try:
        if is_async:
            queue.schedule_async_request(m.save(BasicTensorAwareStateDict(state(rank, 2)), 2, is_async=True))
            queue.maybe_finalize_async_calls(blocking=True)
        else:
            m.save(BasicTensorAwareStateDict(state(rank, 2)), 2)
        error = None
    except CheckpointingException as e:
        error = str(e)
    queue.close()
    left = sorted(os.listdir(m.local_ckpt_dir))
    return error, left, pool.in_use_bytes, load(rank, world, root, strategy=RingReplicationStrategy(1, 2))


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_copies_failing_after_the_agreement_fail_the_save_everywhere(ranks, tmp_path, is_async):
    for rank, (error, left, in_use, loaded) in enumerate(ranks(copies_fail_after_the_agreement, 2, tmp_path,
                                                               is_async)):
        assert error and "rank 1" in error, error
        if rank == 1:
            assert "device-to-host copies of iteration 2 failed" in error and "illegal memory access" in error
        assert left == [f"iter_0000001_{o}_local.tasd" for o in (0, 1)], "no trace of iteration 2"
        assert in_use == 0, "the staging buffers went back to their pool"
        assert loaded == (1, rank * 100 + 1.0), "the last good checkpoint stays"


# -- a checkpoint is one save of one run ---------------------------------------------------------

def die_in_publish(rank, world, root, run, renames):
    """Run ``run``: load what there is, save 1 (run A only), then save 2 and die while publishing:
    ranks in ``renames`` die right after renaming their part, the others just before."""
    from tasd.managers import local_manager
    m = LocalCheckpointManager(root, SESSION)
    if m.find_latest() >= 0:
        m.load()
    if run == "A":
        m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    real = local_manager.LocalCheckpointManager._publish

    def publish(self, iteration, metas):
        if rank in renames:
            real(self, iteration, metas)
        os._exit(3)

    local_manager.LocalCheckpointManager._publish = publish
    m.save(BasicTensorAwareStateDict({"w": torch.full((4096,), float(ord(run) * 10 + rank)), "step": 2}), 2)


def test_parts_of_two_runs_never_combine(tmp_path):
    for run, renames in (("A", {0}), ("B", {1})):
        with pytest.raises(RankFailure):
            run_ranks(die_in_publish, 2, tmp_path, run, renames, collective_timeout_s=5, timeout_s=60)
    assert "iter_0000002_0_local.tasd" in part_files(tmp_path, 0)  # run A's
    assert "iter_0000002_1_local.tasd" in part_files(tmp_path, 1)  # run B's
    assert run_ranks(load, 2, tmp_path) == [(1, 1.0), (1, 101.0)], "iteration 2 mixes two runs: not loadable"


def save_with_job(rank, world, root, session, job_id):
    LocalCheckpointManager(root, session, job_id=job_id).save(BasicTensorAwareStateDict(state(rank, 7)), 7)


def load_in_job(rank, world, root, job):
    os.environ["SLURM_JOB_ID"] = job  # the job id comes from the environment by default
    return load(rank, world, root, "")


def test_default_session_loads_only_its_own_jobs_parts(ranks, tmp_path):
    ranks(save_with_job, 2, tmp_path, "", "job-A")
    assert ranks(load, 2, tmp_path, "", "job-B") == [(-1, None), (-1, None)], "another job's checkpoint"
    assert ranks(load, 2, tmp_path, "", "job-A") == [(7, 7.0), (7, 107.0)]
    assert ranks(load_in_job, 2, tmp_path, "job-A") == [(7, 7.0), (7, 107.0)]
    assert ranks(load_in_job, 2, tmp_path, "job-B") == [(-1, None), (-1, None)]
    # An explicit session is shared across jobs on purpose.
    ranks(save_with_job, 2, tmp_path, "shared", "job-A")
    assert ranks(load, 2, tmp_path, "shared", "job-C") == [(7, 7.0), (7, 107.0)]


def test_a_part_of_another_session_is_never_loaded(ranks, tmp_path):
    ranks(save_with_job, 2, tmp_path, "s1", None)
    for rank in range(2):
        dst = tmp_path / "s2" / str(rank)
        dst.mkdir(parents=True)
        for f in (tmp_path / "s1" / str(rank)).iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    assert ranks(load, 2, tmp_path, "s2") == [(-1, None), (-1, None)]


def resume_from_older_global(rank, world, root, crash_before_cleanup):
    from tasd.managers import local_manager
    if crash_before_cleanup:  # the process dies right after publishing: no background cleanup
        local_manager.LocalCheckpointManager._cleanup = lambda self, keep: None
    m = LocalCheckpointManager(root, SESSION)  # resumed from an older global checkpoint: no local load
    m.save(BasicTensorAwareStateDict(state(rank, 6)), 6)
    return part_files(Path(root), rank)


@pytest.mark.parametrize("crash_before_cleanup", [False, True])
def test_stale_newer_local_files_are_replaced(ranks, tmp_path, crash_before_cleanup):
    ranks(save_with_job, 2, tmp_path, SESSION, None)  # iteration 7 of an abandoned timeline
    files = ranks(resume_from_older_global, 2, tmp_path, crash_before_cleanup)
    assert files == [[f"iter_0000006_{r}_local.tasd"] for r in range(2)]
    assert ranks(load, 2, tmp_path) == [(6, 6.0), (6, 106.0)]


class NotAllowed:
    """A user class the restricted unpickler does not know."""

    def __init__(self, v):
        self.v = v


def save_unloadable(rank, world, root):
    m = LocalCheckpointManager(root, SESSION)
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 1)
    sd = state(rank, 2)
    if rank == 1:
        sd["config"] = NotAllowed(3)
    try:
        m.save(BasicTensorAwareStateDict(sd), 2)
        error = None
    except (TypeError, CheckpointingException) as e:
        error = f"{type(e).__name__}: {e}"
    return error, load(rank, world, root)


def test_save_refuses_what_a_load_would_refuse(ranks, tmp_path):
    (err0, loaded0), (err1, loaded1) = ranks(save_unloadable, 2, tmp_path)
    assert err1.startswith("DisallowedGlobalError") and "tests.test_reliability.NotAllowed" in err1
    assert "tasd.add_safe_globals" in err1
    assert "rank(s) [1]" in err0 and "NotAllowed" in err0
    assert (loaded0, loaded1) == ((1, 1.0), (1, 101.0)), "the previous checkpoint stays"


# -- smaller defects -------------------------------------------------------------------------------

def manager_on_subgroup(rank, world, root):
    first, second = dist.new_group([0, 1]), dist.new_group([2, 3])  # every rank makes both
    dist.barrier(group=first if rank < 2 else second)  # both groups are up before anyone leaves
    try:
        LocalCheckpointManager(root, SESSION, group=first if rank < 2 else second)
        error = None
    except ValueError as e:
        error = str(e)
    dist.barrier()
    return error


def test_a_manager_on_a_subgroup_is_refused(ranks, tmp_path):
    for error in ranks(manager_on_subgroup, 4, tmp_path):
        assert error and "whole world" in error and "group of 2 of 4" in error


def huge_iteration(rank, world, root):
    m = LocalCheckpointManager(root, SESSION)
    try:
        m.save(BasicTensorAwareStateDict(state(rank, 1)), 10**20)
    except ValueError as e:
        error = str(e)
    m.save(BasicTensorAwareStateDict(state(rank, 1)), 2**62 - 1)
    return error, LocalCheckpointManager(root, SESSION).find_latest()


def test_iteration_beyond_int64_is_refused(ranks, tmp_path):
    for error, latest in ranks(huge_iteration, 2, tmp_path):
        assert "iteration must be an int in [0, 2**62), got 100000000000000000000" in error
        assert latest == 2**62 - 1


# -- failure reports stay small whatever fails --------------------------------------------------

def many_fail(rank, world):
    from tasd.managers import collectives
    collectives.MAX_FAILURE_REPORTS = 2  # as if more ranks failed than reports are carried
    error = None if rank == 0 else RuntimeError(f"rank {rank} broke: " + "é" * 3000)
    failures = collectives.gather_failures(error, collectives.agreement_group())
    return dict(failures), failures.describe()


def test_failure_reports_name_every_failed_rank_and_quote_a_bounded_few(ranks):
    from tasd.managers.collectives import MAX_FAILURE_TEXT, NOT_GATHERED
    out = ranks(many_fail, 4)
    assert all(o == out[0] for o in out), "every rank gets the same report"
    failures, text = out[0]
    assert sorted(failures) == [1, 2, 3]
    for r in (1, 2):
        assert failures[r].startswith(f"RuntimeError: rank {r} broke: é")
        assert len(failures[r].encode()) <= MAX_FAILURE_TEXT, "cut to MAX_FAILURE_TEXT bytes"
    assert failures[3] == NOT_GATHERED
    assert text.startswith("rank(s) [1, 2, 3] (3 in all): rank 1: RuntimeError") and "rank 3:" not in text
