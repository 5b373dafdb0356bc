"""Async checkpointing core: AsyncRequest, both callers through AsyncCallsQueue, abort, and
TorchAsyncCheckpoint. Multi-rank bodies are module-level functions run by the ``ranks`` fixture."""

from __future__ import annotations

import functools
import math
import os
import pickle
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tasd.managers.async_ckpt import (AsyncCallsQueue, AsyncRequest, TorchAsyncCheckpoint,
                                      abort_async_checkpoints, preload_tensors, wrap_for_async)
from tasd.managers.errors import CheckpointingException

KINDS = pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "temporal"])
WAIT_S = 20.0  # every blocking wait in these tests ends by then


def _fast_ranks(ranks, fn, world, *args):
    return ranks(fn, world, *args, timeout_s=60, collective_timeout_s=20)


# -- functions run in workers (module level: they must pickle for the persistent worker) ---------

def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _raise_on_rank(rank: int, path: str) -> None:
    if rank == 1:
        raise ValueError(f"boom on rank {rank}")
    _write_file(path, "ok")


def _kill_on_rank(rank: int, path: str) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _write_file(path, "ok")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _write_fifo(path: str) -> None:
    with open(path, "w") as f:  # blocks until a reader opens the FIFO: nobody does
        f.write("never")


def _gc_state() -> bool:
    import gc
    return gc.isenabled()


def _assert_gc_disabled() -> None:
    assert not _gc_state()


# -- helpers ----------------------------------------------------------------------------------

def _fifo(directory) -> str:
    path = os.path.join(str(directory), "stuck.fifo")
    os.mkfifo(path)
    return path


def _worker_pid(q: AsyncCallsQueue) -> int:
    """Pid of the worker running the queue's newest call."""
    caller = q._persistent_caller if q.persistent else q._calls[-1][1]
    return caller._proc.pid


def _gone(pid: int, within_s: float = 0.0) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited), waiting up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class _Recorder:
    """An AsyncRequest handle that records what the queue tells it, and whether the worker that
    ran its call was still alive when the call was dropped."""

    def __init__(self, fail: bool = False):
        self.events: list = []
        self.fail = fail
        self.pid: int | None = None

    def scheduled(self, queue, call_idx):
        caller = queue._calls[-1][1]
        proc = getattr(queue._persistent_caller if queue.persistent else caller, "_proc", None)
        self.pid = None if proc is None else proc.pid
        self.events.append(("scheduled", call_idx))
        if self.fail:
            raise RuntimeError("handle failure in scheduled")

    def dropped(self, reason):
        self.events.append(("dropped", reason, None if self.pid is None else not _gone(self.pid)))
        if self.fail:
            raise RuntimeError("handle failure in dropped")


# -- rank bodies ------------------------------------------------------------------------------

def _rank_success(rank, world, tmp, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    log = []
    for i in range(2):
        path = os.path.join(tmp, f"r{rank}_{i}")
        q.schedule_async_request(AsyncRequest(_write_file, (path, f"{rank}-{i}"),
                                              [functools.partial(log.append, i)]))
    finalized = q.maybe_finalize_async_calls(blocking=True)
    assert q.get_num_unfinalized_calls() == 0
    assert q.maybe_finalize_async_calls(blocking=True) == []
    contents = [open(os.path.join(tmp, f"r{rank}_{i}")).read() for i in range(2)]
    q.close()
    return finalized, log, contents


def _rank_failure(rank, world, tmp, persistent, fn):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    log = []
    q.schedule_async_request(AsyncRequest(fn, (rank, os.path.join(tmp, f"r{rank}")),
                                          [functools.partial(log.append, "bad")]))
    try:
        q.maybe_finalize_async_calls(blocking=True)
        message = None
    except CheckpointingException as e:
        message = str(e)
    # The queue keeps working after a failure (a dead persistent worker is replaced).
    path = os.path.join(tmp, f"after{rank}")
    idx = q.schedule_async_request(AsyncRequest(_write_file, (path, "x"), [functools.partial(log.append, "good")]))
    finalized = q.maybe_finalize_async_calls(blocking=True)
    q.close()
    return message, log, finalized == [idx] and open(path).read() == "x"


def _rank_nonblocking(rank, world, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    log = []
    q.schedule_async_request(AsyncRequest(_sleep, (1.0 if rank == 1 else 0.0,), [functools.partial(log.append, 0)]))
    time.sleep(0.3)  # rank 1's call is still running (sleeps 1 s)
    early = q.maybe_finalize_async_calls()
    deadline, finalized = time.monotonic() + WAIT_S, []
    while not finalized and time.monotonic() < deadline:
        finalized = q.maybe_finalize_async_calls()
        time.sleep(0.05)
    q.close()
    return early, finalized, log


def _rank_process_group(rank, world):
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S)
    try:
        q.schedule_async_request(AsyncRequest(_sleep, (0.0, dist.group.WORLD), []))
        message = None
    except CheckpointingException as e:
        message = str(e)
    n = q.get_num_unfinalized_calls()
    try:  # the refused call holds its index: the next finalize reports it on every rank
        q.maybe_finalize_async_calls(blocking=True)
        reported = None
    except CheckpointingException as e:
        reported = str(e)
    n_after = q.get_num_unfinalized_calls()
    q.close()
    return message, n, reported, n_after


# -- tests ------------------------------------------------------------------------------------

def test_request_basics():
    a, b = AsyncRequest(None, (), []), AsyncRequest(None, (), [])
    assert a.async_fn_kwargs == {} and a.async_fn_kwargs is not b.async_fn_kwargs
    calls = []
    req = AsyncRequest(lambda x, y, z=0: calls.append((x, y, z)), (1, "stale"), [lambda: calls.append("fin")],
                       async_fn_kwargs={"z": 3}, preload_fn=lambda: "fresh")
    req.add_finalize_fn(lambda: calls.append("fin2"))
    frozen = req.freeze()
    assert frozen.is_frozen and not req.is_frozen
    with pytest.raises(CheckpointingException):
        frozen.add_finalize_fn(print)
    frozen.execute_sync()
    assert calls == [(1, "fresh", 3), "fin", "fin2"]
    wrapped = wrap_for_async(_assert_gc_disabled)
    pickle.loads(pickle.dumps(wrapped))()


def test_preload_tensors_snapshot():
    t = torch.arange(6.0).view(2, 3)
    sd = {"a": t, "b": [t[:, 1], (torch.tensor([1, 2]), "keep")], "n": 3}
    out = preload_tensors(sd)
    t.add_(100)
    assert torch.equal(out["a"], torch.arange(6.0).view(2, 3))
    assert torch.equal(out["b"][0], torch.tensor([1.0, 4.0]))
    assert out["b"][1][1] == "keep" and out["n"] == 3 and isinstance(out["b"][1], tuple)
    assert out["b"][1][0].data_ptr() != sd["b"][1][0].data_ptr()


@KINDS
def test_finalize_runs_once_in_order_on_every_rank(ranks, tmp_path, persistent):
    for finalized, log, contents in _fast_ranks(ranks, _rank_success, 2, str(tmp_path), persistent):
        assert finalized == [0, 1] and log == [0, 1]
    for r in range(2):
        assert [open(tmp_path / f"r{r}_{i}").read() for i in range(2)] == [f"{r}-0", f"{r}-1"]


@KINDS
def test_exception_on_one_rank_raises_everywhere(ranks, tmp_path, persistent):
    results = _fast_ranks(ranks, _rank_failure, 2, str(tmp_path), persistent, _raise_on_rank)
    for message, log, reused in results:
        assert message is not None and "boom on rank 1" in message and "[1]" in message
        assert log == ["good"] and reused


@KINDS
def test_killed_worker_raises_everywhere(ranks, tmp_path, persistent):
    results = _fast_ranks(ranks, _rank_failure, 2, str(tmp_path), persistent, _kill_on_rank)
    for message, log, reused in results:
        assert message is not None and "died with exit code -9" in message
        assert log == ["good"] and reused


@KINDS
def test_nonblocking_finalize_waits_for_every_rank(ranks, persistent):
    for early, finalized, log in _fast_ranks(ranks, _rank_nonblocking, 2, persistent):
        assert early == [] and finalized == [0] and log == [0]


@KINDS
def test_preload_fn_runs_at_schedule_and_replaces_arg1(tmp_path, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    seen = []
    q.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "p"), "stale"), [],
                                          preload_fn=lambda: seen.append(1) or "fresh"))
    assert seen == [1]  # in this process, before the worker runs (a lambda: not pickled)
    assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [0]
    assert (tmp_path / "p").read_text() == "fresh"
    q.close()


@KINDS
def test_blocking_wait_times_out_and_kills_the_hung_writer(tmp_path, persistent):
    fifo = _fifo(tmp_path)
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=1.0)
    q.schedule_async_request(AsyncRequest(_write_fifo, (fifo,), []))  # a stuck disk: blocks forever
    hung_pid = _worker_pid(q)
    q.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "behind"), "x"), []))
    start = time.monotonic()
    with pytest.raises(CheckpointingException, match="call 0 did not finish within 1s"):
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    assert time.monotonic() - start < 10
    assert _gone(hung_pid), "the hung writer's worker was not killed"
    if persistent:  # the killed worker's other outstanding call failed with it
        with pytest.raises(CheckpointingException, match="call 0 did not finish"):
            q.maybe_finalize_async_calls(no_dist=True)
    else:
        assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [1]
    q.wait_timeout_s = WAIT_S  # a new persistent worker needs a moment to start
    idx = q.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "after"), "y"), []))
    assert _worker_pid(q) != hung_pid  # persistent: a new worker
    assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [idx]
    assert (tmp_path / "after").read_text() == "y"
    q.close()
    assert q.get_num_unfinalized_calls() == 0


def test_persistent_rejects_process_group(ranks):
    for message, n, reported, n_after in _fast_ranks(ranks, _rank_process_group, 2):
        assert message is not None and "cannot be sent to the persistent worker" in message
        assert n == 1 and n_after == 0
        assert reported is not None and "failed on rank(s) [0, 1]" in reported
        assert "cannot be sent to the persistent worker" in reported


def test_persistent_rejects_lambda():
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S)
    with pytest.raises(CheckpointingException, match="cannot be sent to the persistent worker"):
        q.schedule_async_request(AsyncRequest(lambda: None, (), []))
    assert q.get_num_unfinalized_calls() == 1  # recorded as failed: the queue keeps its index
    with pytest.raises(CheckpointingException, match="could not be started on rank 0"):
        q.maybe_finalize_async_calls(no_dist=True)
    assert q.get_num_unfinalized_calls() == 0
    assert q._persistent_caller is None or q._persistent_caller._proc is None, "nothing was started"
    q.close()


@KINDS
def test_abort_then_new_queue_works(tmp_path, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_sleep, (60.0,), [lambda: pytest.fail("finalized")]))
    start = time.monotonic()
    assert abort_async_checkpoints() >= 1
    assert time.monotonic() - start < 10
    assert q.get_num_unfinalized_calls() == 0
    q2 = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    done = []
    q2.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "f"), "fine"), [lambda: done.append(1)]))
    assert q2.maybe_finalize_async_calls(blocking=True, no_dist=True) == [0]
    assert done == [1] and (tmp_path / "f").read_text() == "fine"
    q2.close()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@KINDS
def test_torch_async_save_matches_sync_and_snapshots(tmp_path, persistent):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w[0, 0] = math.nan
    state = {"w": w, "opt": {"step": 7, "m": [torch.randn(5, generator=g).to(torch.bfloat16),
                                              (torch.arange(10), "tag")]}}
    expected = {"w": w.clone(), "opt": {"step": 7, "m": [state["opt"]["m"][0].clone(),
                                                          (torch.arange(10), "tag")]}}
    ckpt = TorchAsyncCheckpoint(persistent_queue=persistent, wait_timeout_s=WAIT_S)
    ckpt.async_save(state, tmp_path / "async.pt")
    w.add_(1.0)  # training goes on right away
    state["opt"]["m"][1][0].zero_()
    assert ckpt.finalize_async_save(blocking=True) == [0]
    ckpt.save(expected, tmp_path / "sync.pt")
    ckpt.close()
    _assert_same(torch.load(tmp_path / "async.pt"), torch.load(tmp_path / "sync.pt"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@KINDS
def test_torch_async_save_reuses_one_staging_buffer_and_discards_failed_ones(tmp_path, persistent):
    from tasd.staging import HostBufferPool
    pool = HostBufferPool(shared=True)
    ckpt = TorchAsyncCheckpoint(persistent_queue=persistent, wait_timeout_s=WAIT_S, pool=pool)
    state = {"w": torch.randn(1 << 16), "step": 0}
    for step in range(4):
        state["step"] = step
        ckpt.async_save(state, tmp_path / f"{step}.pt")
        ckpt.finalize_async_save(blocking=True)
    assert (pool.allocations, pool.reuses, pool.in_use_bytes) == (1, 3, 0), "one buffer, reused"
    assert torch.load(tmp_path / "3.pt")["step"] == 3
    ckpt.async_save(state, tmp_path / "missing-dir" / "x.pt")  # the worker cannot write it
    with pytest.raises(CheckpointingException, match="No such file"):
        ckpt.finalize_async_save(blocking=True)
    assert pool.in_use_bytes == 0 and pool.pooled_bytes == 0, "a failed call's buffer is never reused"
    sparse = {"s": torch.eye(4).to_sparse(), "w": torch.ones(3)}  # not stageable: copied instead
    ckpt.async_save(sparse, tmp_path / "sparse.pt")
    ckpt.finalize_async_save(blocking=True)
    ckpt.close()
    loaded = torch.load(tmp_path / "sparse.pt")
    assert torch.equal(loaded["s"].to_dense(), torch.eye(4)) and torch.equal(loaded["w"], torch.ones(3))


def _rank_dies_with_a_call_pending(rank, world, tmp, persistent):
    dist.barrier()  # both ranks are connected before one of them dies
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_write_file, (os.path.join(tmp, f"r{rank}"), "x"), []))
    if rank == 1:
        with open(os.path.join(tmp, "worker.pid"), "w") as f:
            f.write(str(q._persistent_caller._proc.pid if persistent else 0))
        os._exit(3)  # the node dies before finalizing; its persistent worker is orphaned
    q.maybe_finalize_async_calls(blocking=True)


@KINDS
def test_dead_rank_fails_finalize_everywhere_and_orphaned_worker_exits(tmp_path, persistent):
    from tasd.launch import RankFailure, run_ranks
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_dies_with_a_call_pending, 2, str(tmp_path), persistent, timeout_s=60, collective_timeout_s=10)
    survivor = info.value.failures[0]
    assert "CheckpointingException" in survivor and "could not reach the other ranks" in survivor
    assert "exit code 3" in info.value.failures[1]
    pid = int((tmp_path / "worker.pid").read_text())
    if persistent:  # the orphan notices its parent is gone and exits
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}"), "persistent worker outlived its training process"


# -- the agreement runs on tasd's own gloo groups; idle polls and plain schedules are free ------------

def _rank_agreement_group(rank, world, tmp, persistent):
    from tasd import device
    from tasd.managers import subgroups
    used, training = [], []
    real_op, real_all_reduce = subgroups.Subgroup.all_reduce, dist.all_reduce

    def all_reduce(self, *args, **kwargs):
        used.append(self.purpose)
        return real_op(self, *args, **kwargs)

    def training_all_reduce(*args, **kwargs):
        training.append(kwargs.get("group"))
        return real_all_reduce(*args, **kwargs)

    subgroups.Subgroup.all_reduce, dist.all_reduce = all_reduce, training_all_reduce
    start = device.sync_count()  # every device wait (synchronize or synchronize_stream) is counted
    try:
        q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
        idle = (q.maybe_finalize_async_calls(), len(used), device.sync_count() - start)
        q.schedule_async_request(AsyncRequest(_raise_on_rank, (rank, os.path.join(tmp, f"r{rank}")), []))
        plain_schedule_syncs = device.sync_count() - start
        with pytest.raises(CheckpointingException, match="boom on rank 1"):  # the failure path gathers texts
            q.maybe_finalize_async_calls(blocking=True)
        q.schedule_async_request(AsyncRequest(_write_file, (os.path.join(tmp, f"p{rank}"), "stale"), [],
                                              preload_fn=lambda: "fresh"))
        preload_syncs = device.sync_count() - start - plain_schedule_syncs
        finalized = q.maybe_finalize_async_calls(blocking=True)
        q.close()
    finally:
        subgroups.Subgroup.all_reduce, dist.all_reduce = real_op, real_all_reduce
    return (idle, plain_schedule_syncs, preload_syncs, finalized, len(used) > 0,
            all(p.startswith("agree") for p in used), training)


@KINDS
def test_agreement_uses_tasd_groups_and_syncs_only_after_a_preload(ranks, tmp_path, persistent):
    for idle, plain_syncs, preload_syncs, finalized, any_used, all_agree, training in _fast_ranks(
            ranks, _rank_agreement_group, 2, str(tmp_path), persistent):
        assert idle == ([], 0, 0), "a poll with nothing pending makes no collective and no device sync"
        assert plain_syncs == 0, "schedule without a preload_fn must not wait for the device"
        assert preload_syncs == 1 and finalized == [1]
        assert any_used and all_agree, "every agreement collective runs on collectives.agreement_group()"
        assert training == [], "no collective on torch.distributed's (the training's) groups"


# -- a call that cannot start on one rank keeps the queues in step --------------------------------

def _rank_start_fails(rank, world, tmp, persistent):
    import errno
    import multiprocessing.process
    real_start = multiprocessing.process.BaseProcess.start

    def no_memory(self):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    if rank == 1:
        multiprocessing.process.BaseProcess.start = no_memory
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    handle = _Recorder()
    try:
        idx = q.schedule_async_request(AsyncRequest(_write_file, (os.path.join(tmp, f"r{rank}"), "x"), [],
                                                    handle=handle))
    finally:
        multiprocessing.process.BaseProcess.start = real_start
    try:
        q.maybe_finalize_async_calls(blocking=True)
        message = None
    except CheckpointingException as e:
        message = str(e)
    events_at_raise = list(handle.events)
    grad = torch.tensor([float(rank + 1)])
    dist.all_reduce(grad)  # the training's own collective pairs with its peer's
    again = q.schedule_async_request(AsyncRequest(_write_file, (os.path.join(tmp, f"again{rank}"), "y"), []))
    finalized = q.maybe_finalize_async_calls(blocking=True)
    q.close()
    return idx, message, events_at_raise, grad.item(), again, finalized


@KINDS
def test_failed_start_on_one_rank_fails_the_call_on_every_rank(ranks, tmp_path, persistent):
    for idx, message, events, grad, again, finalized in _fast_ranks(
            ranks, _rank_start_fails, 2, str(tmp_path), persistent):
        assert idx == 0
        assert message is not None and "failed on rank(s) [1]" in message
        assert "could not be started on rank 1" in message and "Cannot allocate memory" in message
        assert [e[0] for e in events] == ["scheduled", "dropped"] and events[0][1] == 0
        assert "Cannot allocate memory" in events[1][1]
        assert grad == 3.0 and again == 1 and finalized == [1]


# -- hung writers: bounded waits, no orphans --------------------------------------------------------

def _rank_hung_writer(rank, world, tmp, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(None, (), []))  # start a persistent worker (seconds on a busy machine)
    assert q.maybe_finalize_async_calls(blocking=True) == [0]
    q.wait_timeout_s = None  # from now on: the job's collective timeout (4 s here)
    target = _fifo(os.path.join(tmp, "hung")) if rank == 1 else os.path.join(tmp, "r0")
    q.schedule_async_request(AsyncRequest(_write_fifo if rank == 1 else _write_file,
                                          (target,) if rank == 1 else (target, "x"), []))
    pid = _worker_pid(q)
    start = time.monotonic()  # rank 0 enters the agreement at once and waits there, in rounds
    try:
        q.maybe_finalize_async_calls(blocking=True)
        message = None
    except CheckpointingException as e:
        message = str(e)
    waited = time.monotonic() - start
    killed = _gone(pid, within_s=2.0) if rank == 1 else True
    timeout = q.wait_timeout()
    q.wait_timeout_s = WAIT_S
    idx = q.schedule_async_request(AsyncRequest(_write_file, (os.path.join(tmp, f"after{rank}"), "y"), []))
    finalized = q.maybe_finalize_async_calls(blocking=True)
    q.close()
    return timeout, message, waited, killed, finalized == [idx]


@KINDS
def test_hung_writer_fails_on_every_rank_within_the_job_timeout(tmp_path, persistent):
    from tasd.launch import run_ranks
    os.makedirs(tmp_path / "hung")
    results = run_ranks(_rank_hung_writer, 2, str(tmp_path), persistent, timeout_s=60, collective_timeout_s=4)
    for rank, (timeout, message, waited, killed, reused) in enumerate(results):
        assert timeout == 4.0
        assert message is not None and "failed on rank(s) [1]" in message
        assert "did not finish within 4s" in message
        assert waited < 15 and killed and reused


def _rank_killed_while_writer_hangs(rank, world, tmp, persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_write_fifo, (_fifo(tmp),), []))
    pid = _worker_pid(q)
    time.sleep(1.0)  # the worker is blocked opening the FIFO
    with open(os.path.join(tmp, "worker.pid"), "w") as f:
        f.write(str(pid))
    os.kill(os.getpid(), signal.SIGKILL)


@KINDS
def test_worker_stuck_in_a_call_exits_when_its_rank_is_killed(tmp_path, persistent):
    from tasd.launch import RankFailure, run_ranks
    with pytest.raises(RankFailure):
        run_ranks(_rank_killed_while_writer_hangs, 1, str(tmp_path), persistent, timeout_s=60)
    pid = int((tmp_path / "worker.pid").read_text())
    try:
        assert _gone(pid, within_s=5.0), "a worker stuck in a call outlived its killed rank"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


# -- dropped calls: shared memory released, handles told after their worker is gone ----------------

def _shm_links() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += "/dev/shm/" in target or "torch_" in target
    return count


def test_dropped_request_releases_its_shared_memory(tmp_path):
    import gc
    import weakref
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_write_fifo, (_fifo(tmp_path),), []))  # the worker is stuck
    before = _shm_links()
    t = torch.ones(1 << 20)  # 4 MiB, sent through shared memory
    storage = weakref.ref(t.untyped_storage())
    q.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "never"), t), []))
    assert _shm_links() > before  # the descriptor waits in multiprocessing's resource sharer
    del t
    q.close(abort=True)  # the queued request is never unpickled
    gc.collect()
    assert storage() is None
    assert _shm_links() == before, "a dropped request's shared memory is still referenced by a descriptor"


@KINDS
def test_handle_protocol(tmp_path, persistent):
    ok = _Recorder()
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=WAIT_S)
    q.schedule_async_request(AsyncRequest(_write_file, (str(tmp_path / "ok"), "x"), [], handle=ok))
    assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [0]
    assert ok.events == [("scheduled", 0)], "a finalized call is never dropped"

    hung = _Recorder()
    q.wait_timeout_s = 1.0
    q.schedule_async_request(AsyncRequest(_write_fifo, (_fifo(tmp_path),), [], handle=hung))
    with pytest.raises(CheckpointingException, match="did not finish within"):
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    assert [e[0] for e in hung.events] == ["scheduled", "dropped"]
    assert "did not finish within" in hung.events[1][1] and hung.events[1][2] is False, \
        "dropped() was called while the worker could still run the call"
    q.wait_timeout_s = WAIT_S

    failing = _Recorder(fail=True)  # a handle that raises does not stop the queue
    idx = q.schedule_async_request(AsyncRequest(_raise_on_rank, (1, str(tmp_path / "f")), [], handle=failing))
    assert idx == 2
    with pytest.raises(CheckpointingException, match="boom on rank 1"):
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    assert [e[0] for e in failing.events] == ["scheduled", "dropped"] and q.get_num_unfinalized_calls() == 0

    aborted = _Recorder()
    os.remove(tmp_path / "stuck.fifo")
    q.schedule_async_request(AsyncRequest(_write_fifo, (_fifo(tmp_path),), [], handle=aborted))
    time.sleep(0.3)
    q.close(abort=True)
    assert [e[0] for e in aborted.events] == ["scheduled", "dropped"]
    assert "aborted" in aborted.events[1][1] and aborted.events[1][2] is False


def test_request_handle_field_is_nvrx_compatible():
    positional = AsyncRequest(_sleep, (0.0,), [], {}, None, False, 5)
    assert positional.handle is None and positional.call_idx == 5
    handle = _Recorder()
    req = AsyncRequest(_sleep, (0.0,), [], handle=handle)
    assert req.freeze().handle is handle and req._replace(call_idx=3).handle is handle
    copy = pickle.loads(pickle.dumps(req))
    assert copy.handle is None and copy.async_fn is _sleep and copy._replace(handle=1).handle == 1


@KINDS
def test_global_abort_discards_a_pending_staging_buffer_at_once(tmp_path, persistent):
    from tasd.staging import HostBufferPool
    pool = HostBufferPool(shared=True)
    ckpt = TorchAsyncCheckpoint(persistent_queue=persistent, wait_timeout_s=WAIT_S, pool=pool)
    ckpt.queue.schedule_async_request(AsyncRequest(_write_fifo, (_fifo(tmp_path),), []))
    ckpt.async_save({"w": torch.randn(1 << 14)}, tmp_path / "w.pt")  # persistent: queued behind
    assert pool.in_use_bytes > 0
    abort_async_checkpoints()
    assert pool.in_use_bytes == 0 and pool.pooled_bytes == 0, "a dropped call's buffer is discarded"
    ckpt.close()


# -- the persistent worker does not run an unguarded training script again -------------------------

_UNGUARDED_SCRIPT = '''
import os, sys
with open(sys.argv[1], "a") as f:
    f.write("imported\\n")
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
from tasd.managers.errors import CheckpointingException

def local_fn(path):
    with open(path, "w") as f:
        f.write("local")

q = AsyncCallsQueue(persistent=True, wait_timeout_s=60)
q.schedule_async_request(AsyncRequest(os.mkdir, (sys.argv[2] + ".dir",), []))
assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [0]
q.schedule_async_request(AsyncRequest(local_fn, (sys.argv[2] + ".local",), []))
try:
    q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    result = "no error"
except CheckpointingException as e:
    result = str(e)
q.close()
with open(sys.argv[2], "w") as f:
    f.write(result)
'''


def test_unguarded_script_is_not_run_again_by_the_persistent_worker(tmp_path):
    import subprocess
    import sys
    script, marker, out = tmp_path / "train.py", tmp_path / "marker", tmp_path / "out"
    script.write_text(_UNGUARDED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(marker), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert marker.read_text() == "imported\n", "the worker imported the training script again"
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.dir").is_dir() and not (tmp_path / "out.local").exists()
    result = out.read_text()
    assert "async_fn must be importable" in result and "local_fn" in result


# -- a call's own report (CallStatus/TrackedCall), for queues tasd does not hold ---------------------

class _Frozen:
    def __init__(self):
        self.count = 0

    def frozen(self):
        self.count += 1


def _start_and_die(status) -> None:
    status.started()
    os._exit(3)  # a worker that dies in the middle of its call


def test_freeze_tells_the_handle_and_a_tracked_call_reports_from_its_worker(tmp_path):
    from multiprocessing.reduction import ForkingPickler
    import multiprocessing as mp
    from tasd.managers.async_ckpt.status import CallStatus, TrackedCall

    handle = _Frozen()
    req = AsyncRequest(_sleep, (0.0,), [], handle=handle)
    req.freeze()
    assert handle.count == 1, "every queue freezes what it schedules: the handle learns that a queue took it"

    ok, bad = CallStatus(), CallStatus()
    assert ok.outcome() == (False, None)
    assert TrackedCall(_write_file, ok)(str(tmp_path / "f"), "x") is None and ok.outcome() == (True, None)
    with pytest.raises(ValueError, match="boom on rank 1"):
        TrackedCall(_raise_on_rank, bad)(1, str(tmp_path / "g"))
    finished, text = bad.outcome()
    assert finished and "ValueError: boom on rank 1" in text and "_raise_on_rank" in text

    # torch's multiprocessing pickler (megatron-core's persistent worker receives requests so) shares the memory
    shared = CallStatus()
    copy = pickle.loads(bytes(ForkingPickler.dumps(TrackedCall(_sleep, shared))))
    copy(0.0)
    assert shared.outcome() == (True, None)

    slot = ok._slot  # a status is a row of a shared table: released, the row serves the next call, cleared
    ok.release()
    with pytest.raises(ValueError, match="released"):
        ok.outcome()
    again = CallStatus()
    assert again._slot == slot and again.outcome() == (False, None)

    dead = CallStatus()
    proc = mp.get_context("fork").Process(target=_start_and_die, args=(dead,))
    proc.start()
    proc.join(WAIT_S)
    finished, text = dead.outcome()
    assert finished and f"pid {proc.pid}" in text and "died" in text

    zombie = CallStatus()  # exited, not yet reaped by its parent (megatron-core joins its fork only when it finalizes)
    proc = mp.get_context("fork").Process(target=_start_and_die, args=(zombie,))
    proc.start()
    deadline = time.monotonic() + WAIT_S
    while not zombie.outcome()[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert zombie.outcome()[0], "an exited worker that is not yet reaped counts as dead"
    proc.join(WAIT_S)
