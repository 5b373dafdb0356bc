"""Staging from CUDA tensors into pinned host buffers and back (needs a CUDA device).

Checks what the CPU tests can only fake: page-locking with cudaHostRegister of exact sizes (no
power-of-two rounding by torch's caching host allocator), unregistration when a buffer dies,
non-blocking device-to-host copies without a device sync, and tensors returning to their device.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from tasd import BasicTensorAwareStateDict, HostBufferPool, device
from tasd.staging import stage

MiB = 1 << 20


def host_allocator_bytes() -> dict:
    """Byte counters of torch's caching host (pinned) allocator."""
    return {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}


def cuda_state(dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(257, 33, generator=g).to(dev),
        "bf16": torch.randn(1000, generator=g).to(torch.bfloat16).to(dev),
        "t": torch.randn(64, 48, generator=g).to(dev).t(),  # not contiguous
        "i": torch.arange(11, dtype=torch.int64).to(dev),
        "cpu": torch.ones(3),
        "step": 5,
    }


def check_round_trip(dev: torch.device, non_blocking: bool) -> None:
    original = cuda_state(dev)
    expected = {k: v.cpu() for k, v in original.items() if isinstance(v, torch.Tensor)}
    sd = BasicTensorAwareStateDict(original, pool=HostBufferPool())
    syncs = device.sync_count()
    sd.copy_tensors_to_cpu(non_blocking=non_blocking)
    if non_blocking:
        assert device.sync_count() == syncs, "a non-blocking copy makes no device sync"
        device.synchronize()
    for k, want in expected.items():
        got = sd.state_dict[k]
        assert got.device.type == "cpu" and got.is_pinned(), k
        assert torch.equal(got, want), k
    original["w"].add_(1)  # the copies are a snapshot
    assert torch.equal(sd.state_dict["w"], expected["w"])
    sd.restore_tensor_device(non_blocking=True)
    device.synchronize()
    for k, want in expected.items():
        got = sd.state_dict[k]
        assert got.device == (dev if k != "cpu" else torch.device("cpu")), k
        assert torch.equal(got.cpu(), want), k


@pytest.mark.parametrize("non_blocking", [False, True])
def test_cuda_tensors_round_trip_through_pinned_buffers(non_blocking):
    check_round_trip(torch.device("cuda", 0), non_blocking)


def test_tensors_return_to_a_nonzero_device_index(cuda_device_count):
    if cuda_device_count < 2:
        pytest.skip("needs 2 or more GPUs")
    check_round_trip(torch.device("cuda", 1), non_blocking=True)


def test_restore_onto_a_missing_device_index_falls_back_to_the_current_device():
    t = torch.ones(3)
    moved = device.restore_device(t, f"cuda:{torch.cuda.device_count()}")
    assert moved.device == device.default_device()


def test_pinned_pool_buffers_are_exact_size_and_bypass_the_caching_host_allocator():
    torch.cuda.init()
    before = host_allocator_bytes()
    pool = HostBufferPool(pin=True)
    nbytes = 3 * MiB + 5  # torch's caching host allocator would take 4 MiB
    buf = pool.acquire(nbytes)
    assert buf.is_pinned() and buf.untyped_storage().nbytes() == nbytes
    assert buf.data_ptr() % device.HOST_ALIGNMENT == 0
    pool.release(buf)
    smaller = pool.acquire(nbytes - 100)
    assert smaller.is_pinned() and smaller.data_ptr() == buf.data_ptr() and pool.allocations == 1
    pool.release(smaller)
    assert host_allocator_bytes() == before, "no memory from torch's caching host allocator"


def test_pinned_buffer_is_unregistered_when_its_last_view_dies(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="tasd.device")
    real, calls = device._cuda_host_unregister, []

    def recording_unregister(ptr: int) -> int:
        calls.append((ptr, real(ptr)))
        return calls[-1][1]

    monkeypatch.setattr(device, "_cuda_host_unregister", recording_unregister)
    t = device.empty_host(2 * MiB, pin=True)
    ptr = t.data_ptr()
    view = t[MiB:]
    del t
    gc.collect()
    assert view.is_pinned() and calls == [], "still registered while a view lives"
    del view
    gc.collect()
    assert calls == [(ptr, 0)], "unregistered once, successfully"
    assert not caplog.records


def test_non_blocking_stage_of_cuda_tensors_makes_no_sync():
    src = [torch.randn(MiB, device="cuda"), torch.arange(7, device="cuda")]
    pool = HostBufferPool()
    syncs = device.sync_count()
    staged = stage(src, pool, non_blocking=True)
    assert device.sync_count() == syncs
    device.synchronize()
    for t, lay in zip(src, staged.layouts):
        assert torch.equal(lay.view(staged.buffer), t.cpu())
    assert staged.buffer.is_pinned()
    staged.release()
    syncs = device.sync_count()
    staged = stage(src, pool)  # blocking: one wait for the current stream, not per tensor
    assert device.sync_count() == syncs + 1
    for t, lay in zip(src, staged.layouts):
        assert torch.equal(lay.view(staged.buffer), t.cpu())
    staged.release()


def test_many_small_tensors_are_gathered_and_stay_snapshots_across_streams():
    """3,000 small tensors (mixed dtypes, some not contiguous) around large ones go through the
    bounce buffers (tasd.bounce); staging from two streams in turn keeps each staging a snapshot
    of the tensors as they were when it was queued."""
    from tasd import bounce

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(1)
    tensors = []
    for i in range(3000):
        if i % 1000 == 500:
            tensors.append(torch.randn(2 * MiB // 4, generator=g).to(dev))
        elif i % 7 == 0:
            tensors.append(torch.randn(12, 10, generator=g).to(dev).t())
        else:
            tensors.append(torch.randn(1 + i % 300, generator=g).to(torch.bfloat16 if i % 2 else torch.float32).to(dev))
    pool = HostBufferPool()
    streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
    for step in range(4):
        with torch.cuda.stream(streams[step % 2]):
            streams[step % 2].wait_stream(torch.cuda.default_stream(dev))
            expected = [t.cpu() for t in tensors]
            staged = stage(tensors, pool, non_blocking=True)
            for t in tensors:  # the training changes its tensors right after, on the same stream
                t.add_(1)
            staged.wait()
        got = [lay.view(staged.buffer) for lay in staged.layouts]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"step {step}"
        staged.release()
        torch.cuda.default_stream(dev).wait_stream(streams[step % 2])
    plan = bounce._plan(staged.layouts, tuple(t.device for t in tensors), dev)
    assert len(plan.runs) >= 1 and len(plan.direct) <= 3 + 1, "the small tensors went through bounce buffers"
