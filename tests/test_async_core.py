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


def _gc_state() -> bool:
    import gc
    return gc.isenabled()


def _assert_gc_disabled() -> None:
    assert not _gc_state()


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
    q.close()
    return message, n


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
def test_blocking_wait_times_out(persistent):
    q = AsyncCallsQueue(persistent=persistent, wait_timeout_s=0.5)
    q.schedule_async_request(AsyncRequest(_sleep, (30.0,), []))
    start = time.monotonic()
    with pytest.raises(CheckpointingException, match="did not finish within"):
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    q.close()
    assert time.monotonic() - start < 10 and q.get_num_unfinalized_calls() == 0


def test_persistent_rejects_process_group(ranks):
    for message, n in _fast_ranks(ranks, _rank_process_group, 2):
        assert message is not None and "cannot be sent to the persistent worker" in message
        assert n == 0


def test_persistent_rejects_lambda():
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S)
    with pytest.raises(CheckpointingException, match="cannot be sent to the persistent worker"):
        q.schedule_async_request(AsyncRequest(lambda: None, (), []))
    assert q.get_num_unfinalized_calls() == 0
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
