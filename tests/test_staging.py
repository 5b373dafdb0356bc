"""Staging, the host buffer pool and the host allocations of tasd.device (all on CPU).

The page-locking path (cudaHostRegister) is exercised here with the two CUDA entry points of
tasd.device replaced by recorders; tests/gpu/ runs it for real where CUDA exists.
"""

from __future__ import annotations

import gc
import random
import threading

import pytest
import torch

from tasd import BasicTensorAwareStateDict, HostBufferPool, device
from tasd.staging import MAX_OVERSIZE, Layout, TensorLayout, check_stageable, plan_layout, stage

MiB = 1 << 20


def mapped(ptr: int) -> bool:
    """Whether address ``ptr`` lies in a mapping of this process (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


# -- the pool: best fit, superseded buffers dropped, counters, bound -----------------------------

def test_alternating_sizes_settle_on_one_buffer():
    pool = HostBufferPool(pin=False)
    ptrs = set()
    for n in (3000, 4000) * 4:
        buf = pool.acquire(n)
        assert buf.numel() == n and buf.dtype == torch.uint8 and buf.dim() == 1
        ptrs.add(buf.data_ptr())
        pool.release(buf)
    # 3000 is allocated, then 4000 (3000 is dropped: superseded), then every save reuses 4000.
    assert (pool.allocations, pool.allocated_bytes, pool.reuses) == (2, 7000, 6)
    assert (pool.pooled_bytes, pool.in_use_bytes) == (4000, 0), "one buffer kept, not two"
    assert len(ptrs) == 2


def test_smaller_request_gets_an_exact_size_view_at_the_start_of_a_larger_buffer():
    pool = HostBufferPool(pin=False)
    big = pool.acquire(4096)
    ptr = big.data_ptr()
    pool.release(big)
    small = pool.acquire(3000)
    assert small.numel() == 3000 and small.data_ptr() == ptr and small.storage_offset() == big.storage_offset()
    assert (pool.allocations, pool.reuses) == (1, 1)
    assert (pool.in_use_bytes, pool.pooled_bytes) == (4096, 0), "the whole buffer is held"
    with pytest.raises(ValueError):
        pool.release(small[:10])  # not what was handed out
    pool.release(small)
    assert (pool.in_use_bytes, pool.pooled_bytes) == (0, 4096)
    again = pool.acquire(4096)
    assert again.numel() == 4096 and again.data_ptr() == ptr, "the full buffer comes back whole"
    pool.release(again)


def test_best_fit_prefers_the_smallest_buffer_that_fits():
    pool = HostBufferPool(pin=False)
    bufs = [pool.acquire(n) for n in (1000, 1500, 1900)]
    ptr = {b.numel(): b.data_ptr() for b in bufs}
    for b in bufs:
        pool.release(b)
    got = [pool.acquire(n) for n in (1400, 1000, 1900)]
    assert [g.data_ptr() for g in got] == [ptr[1500], ptr[1000], ptr[1900]]
    assert (pool.allocations, pool.reuses) == (3, 3)


def test_a_small_request_does_not_take_a_much_larger_buffer():
    """Handing a 16 GiB buffer to a 1 KiB request would make the next 16 GiB request allocate."""
    pool = HostBufferPool(pin=False)
    pool.release(pool.acquire(10_000))
    small = pool.acquire(100)
    assert (pool.allocations, pool.reuses, pool.pooled_bytes) == (2, 0, 10_000)
    pool.release(small)
    pool.release(pool.acquire(10_000))
    assert pool.reuses == 1


def test_zero_byte_buffers():
    pool = HostBufferPool(pin=False)
    pool.release(pool.acquire(100))
    z = pool.acquire(0)
    assert z.numel() == 0 and pool.pooled_bytes == 100, "a zero-byte request takes no real buffer"
    z2 = pool.acquire(0)
    pool.release(z)
    pool.release(z2)
    with pytest.raises(ValueError):
        pool.release(z)


def test_default_bound_keeps_at_most_twice_what_was_in_use_at_once():
    """Free bytes never exceed MAX_OVERSIZE times the peak of in_use_bytes (random sequences)."""
    rng = random.Random(0)
    pool, held, peak, acquired = HostBufferPool(pin=False), [], 0, 0
    for _ in range(400):
        if held and (len(held) > 3 or rng.random() < 0.5):
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(pool.acquire(rng.choice([0, 100, 700, 1000, 1300, 5000])))
            acquired += 1
        peak = max(peak, pool.in_use_bytes)
        assert pool.pooled_bytes <= MAX_OVERSIZE * peak
    for b in held:
        pool.release(b)
    assert pool.in_use_bytes == 0 and pool.allocations + pool.reuses == acquired
    assert pool.pooled_bytes <= MAX_OVERSIZE * peak


def test_counters_under_concurrent_use():
    pool = HostBufferPool(pin=False)
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(50):
                buf = pool.acquire(rng.choice([512, 800, 1024]))
                buf.fill_(seed)
                assert bool((buf == seed).all())
                pool.release(buf)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.allocations + pool.reuses == 200 and pool.in_use_bytes == 0
    assert pool.allocations <= 16 and pool.pooled_bytes <= 4 * 1024


# -- tasd.device host allocations ---------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 3 * MiB + 5])
def test_empty_host_is_exact_size_and_aligned(nbytes):
    t = device.empty_host(nbytes, pin=False)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,)
    if nbytes:
        assert t.data_ptr() % device.HOST_ALIGNMENT == 0
    if nbytes >= MiB:
        assert t.untyped_storage().nbytes() == nbytes, "a mapping of exactly the bytes asked for"
    s = device.empty_host(nbytes, shared=True, pin=False)
    assert s.shape == (nbytes,) and s.is_shared()
    if nbytes:
        assert s.data_ptr() % device.HOST_ALIGNMENT == 0


def test_unpinned_mapping_is_unmapped_when_its_last_view_dies():
    t = device.empty_host(2 * MiB, pin=False)
    ptr = t.data_ptr()
    view = t[100:]
    del t
    gc.collect()
    assert mapped(ptr), "a view keeps the memory"
    del view
    gc.collect()
    assert not mapped(ptr), "the memory goes back to the system"


class FakeCuda:
    """Stands in for cudaHostRegister/cudaHostUnregister; records calls and whether the memory was
    still mapped when it was unregistered."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[tuple[int, bool]] = []
        self.fail = fail
        monkeypatch.setattr(device, "cuda_available", lambda: True)
        monkeypatch.setattr(device, "_cuda_host_register", self.register)
        monkeypatch.setattr(device, "_cuda_host_unregister", self.unregister)

    def register(self, ptr: int, nbytes: int) -> int:
        self.registered.append((ptr, nbytes))
        return 1 if self.fail else 0

    def unregister(self, ptr: int) -> int:
        self.unregistered.append((ptr, mapped(ptr)))
        return 0


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("nbytes", [10, 3 * 4096 + 5, 3 * MiB + 5])
def test_pinned_buffers_are_exact_size_registered_and_unregistered_before_freeing(monkeypatch, nbytes, shared):
    cuda = FakeCuda(monkeypatch)
    t = device.empty_host(nbytes, pin=True, shared=shared)
    ptr = t.data_ptr()
    assert t.shape == (nbytes,) and ptr % device.HOST_ALIGNMENT == 0
    assert cuda.registered == [(ptr, nbytes)], "page-locked as asked: no power-of-two rounding"
    if not shared:
        assert t.untyped_storage().nbytes() == nbytes
    view = t[3:]
    del t
    gc.collect()
    assert cuda.unregistered == [], "still in use through a view"
    del view
    gc.collect()
    assert cuda.unregistered == [(ptr, True)], "unregistered once, before the memory is unmapped"
    assert not mapped(ptr) or shared  # torch's shared memory may be cached by its allocator


def test_pin_falls_back_to_pageable_memory_when_registration_fails(monkeypatch, caplog):
    cuda = FakeCuda(monkeypatch, fail=True)
    t = device.empty_host(5000, pin=True)
    assert t.shape == (5000,) and cuda.registered == [(t.data_ptr(), 5000)]
    assert "cudaHostRegister" in caplog.text
    del t
    gc.collect()
    assert cuda.unregistered == []


def test_pin_without_cuda_gives_pageable_memory():
    if device.cuda_available():
        pytest.skip("CUDA is present")
    t = device.empty_host(5000, pin=True)
    assert t.shape == (5000,) and not t.is_pinned()


def test_pinned_pool_hands_out_exact_size_buffers(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    pool = HostBufferPool(pin=True)
    buf = pool.acquire(MiB + 1)
    assert cuda.registered == [(buf.data_ptr(), MiB + 1)]
    pool.release(buf)
    del buf
    pool.release(pool.acquire(2 * MiB))  # supersedes the smaller buffer: it is dropped and freed
    gc.collect()
    assert [ptr for ptr, _ in cuda.unregistered] == [cuda.registered[0][0]]


# -- device synchronizations ---------------------------------------------------------------------

def test_sync_count_counts_synchronize_calls():
    before = device.sync_count()
    device.synchronize()
    device.synchronize()
    assert device.sync_count() == before + 2
    sd = BasicTensorAwareStateDict({"w": torch.ones(4)}, pool=HostBufferPool(pin=False))
    before = device.sync_count()
    sd.copy_tensors_to_cpu(non_blocking=True)
    assert device.sync_count() == before, "a non-blocking copy does not wait for the device"
    sd.copy_tensors_to_cpu(non_blocking=False)
    assert device.sync_count() == before, "copies of CPU tensors are done when copy_ returns: no sync"
    device.synchronize_stream()
    assert device.sync_count() == before + 1


# -- what can be staged ---------------------------------------------------------------------------

class MyTensor(torch.Tensor):
    pass


def test_tensor_subclasses_are_refused_naming_the_class():
    plain, param = torch.ones(3), torch.nn.Parameter(torch.ones(3))
    assert check_stageable(plain) is None and check_stageable(param) is None
    sub = torch.ones(3).as_subclass(MyTensor)
    reason = check_stageable(sub)
    assert reason and "MyTensor" in reason and "tensor subclass" in reason
    with pytest.raises(TypeError, match="MyTensor"):
        stage([plain, sub], HostBufferPool(pin=False))
    with pytest.raises(TypeError, match=r"'model\.w' is a MyTensor \(a tensor subclass\)"):
        BasicTensorAwareStateDict({"model": {"w": sub, "b": plain}}).pop_tensors()
    lazy = torch.nn.parameter.UninitializedParameter()
    assert "UninitializedParameter" in check_stageable(lazy)


def dtensor_is_refused(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(16.0).reshape(4, 4), mesh, [Shard(0)])
    assert "DTensor" in check_stageable(w)
    wrapped = torch.nn.Parameter(w)  # a Parameter around a DTensor is still a DTensor
    try:
        BasicTensorAwareStateDict({"model": {"w": wrapped}, "step": 1}).pop_tensors()
    except TypeError as e:
        return str(e)
    return "no error"


def test_dtensor_is_refused_with_the_key_path_and_the_fsdp_backend(ranks):
    for msg in ranks(dtensor_is_refused, 2):
        assert "'model.w' is a DTensor (a tensor subclass)" in msg
        assert "tasd.fsdp.FSDPTensorAwareStateDict" in msg


# -- the cached layout: staging the same structure again costs no planning and no new views ----
def test_a_structure_is_planned_once_and_its_layout_pickles_compactly():
    import pickle

    tensors = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, dtype=torch.float64)]
    layout = plan_layout(tensors)
    assert isinstance(layout, Layout) and len(layout) == 4
    assert [(lay.offset, lay.nbytes) for lay in layout] == [(0, 60), (64, 7), (128, 0), (128, 16)]
    assert layout.nbytes == 192
    assert plan_layout([torch.ones(3, 5), torch.ones(7, dtype=torch.int8), torch.ones(0),
                        torch.ones(2, dtype=torch.float64)]) is layout, "same dtypes and shapes: the same object"
    assert plan_layout([torch.zeros(3, 6), *tensors[1:]]) is not layout
    back = pickle.loads(pickle.dumps(layout))
    assert list(back) == list(layout) and back.nbytes == layout.nbytes
    many = plan_layout([torch.zeros(4)] * 5000)
    assert len(pickle.dumps(many)) < 40 * len(many), "one bytes object, not 5000 pickled dataclasses"
    assert isinstance(many[0], TensorLayout) and many[-1].offset == 4999 * 64


def test_restaging_a_structure_reuses_the_buffer_and_its_views():
    pool = HostBufferPool(pin=False)
    state = [torch.randn(100), torch.randn(3, 4, requires_grad=True), torch.arange(5)]
    first = stage(state, pool)
    views = pool.views(first.buffer, first.layouts)
    assert pool.views(first.buffer, first.layouts) is views, "asked again: the same views"
    first.release()
    state[0].add_(1)
    second = stage(state, pool)
    assert pool.reuses == 1 and pool.views(second.buffer, second.layouts) is views
    assert not second.buffer.requires_grad and all(not v.requires_grad for v in views)
    for t, lay in zip(state, second.layouts):
        assert torch.equal(lay.view(second.buffer), t.detach()), "the copies are the current values"
    other = stage([torch.randn(100), torch.randn(12), torch.arange(5)], pool)  # same bytes, another structure
    assert other.layouts is not second.layouts
    assert pool.views(other.buffer, other.layouts) is not views


def test_views_go_when_their_buffer_leaves_the_pool():
    import weakref
    pool = HostBufferPool(pin=False)
    staged = stage([torch.randn(64), torch.randn(8)], pool)
    buffer = weakref.ref(staged.buffer)
    pool.views(staged.buffer, staged.layouts)
    staged.discard()  # forgotten: a worker may still read it, the pool must not keep it alive
    gc.collect()
    assert buffer() is None, "cached views kept a forgotten buffer alive"
    staged = stage([torch.randn(64), torch.randn(8)], pool)
    buffer = weakref.ref(staged.buffer)
    staged.release()
    pool.clear()
    del staged
    gc.collect()
    assert buffer() is None, "cached views kept a cleared buffer alive"
    with pytest.raises(ValueError, match="not acquired"):
        pool.views(torch.empty(8, dtype=torch.uint8), plan_layout([torch.zeros(2)]))



def _vma_flags(ptr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds address ``ptr``."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def test_load_destinations_have_their_own_exact_storage_in_huge_pages_when_large():
    small = device.host_tensor((3, 5), torch.float32)
    assert small.shape == (3, 5) and small.untyped_storage().nbytes() == 60
    large = device.host_tensor((1024, 1024), torch.float64)  # 8 MiB
    assert large.shape == (1024, 1024) and large.dtype == torch.float64 and large.is_contiguous()
    assert large.untyped_storage().nbytes() == 8 << 20, "a storage of exactly its own bytes"
    large.fill_(1.5)
    assert float(large.sum()) == 1.5 * (1 << 20)
    if not device._huge_pages_possible():
        pytest.skip("this kernel gives no transparent huge pages")
    assert _vma_flags(large.data_ptr()).get("THPeligible") == "1", "large destinations ask for huge pages"


# -- many small device tensors in a few transfers (tasd.bounce) ------------------------------------

def test_small_tensors_are_cut_into_runs_of_bounded_span():
    from tasd.bounce import Run, plan_runs
    lays = plan_layout([torch.empty(n, dtype=torch.uint8) for n in (100, 100, 5000, 100, 64, 100, 100, 100)])
    small = [True, True, False, True, True, True, True, True]
    assert plan_runs(lays, small, max_span=10_000) == [
        Run(0, 1, 0, lays[1].offset + 100), Run(3, 7, lays[3].offset, lays[7].offset + 100)]
    # A span limit cuts runs; a run of one tensor is left to a direct copy.
    runs = plan_runs(lays, small, max_span=300)
    assert [(r.first, r.last) for r in runs] == [(0, 1), (3, 5), (6, 7)]
    assert all(r.end - r.start <= 300 for r in runs)
    assert plan_runs(lays, [False] * 8) == [] and plan_runs(lays, [i == 3 for i in range(8)]) == []


def test_gathered_copies_equal_the_tensors_and_follow_their_changes():
    """The gathering path, driven on CPU tensors as if they were a device's (the CUDA path is
    tests/gpu): mixed dtypes, a 0-d tensor, a non-contiguous one, an empty one and a large one
    between small ones; a second staging of the same structure reuses the plan and its buffer."""
    from tasd import bounce
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(300, generator=g), torch.randn(64, 48, generator=g).t(), torch.tensor(7, dtype=torch.int64),
               torch.randn(bounce.SMALL_BYTES // 4 + 1, generator=g), torch.zeros(0),
               torch.randn(1000, generator=g).to(torch.bfloat16), torch.rand(33, generator=g) > 0.5,
               torch.randn(5, 5, generator=g).double()]
    layout = plan_layout(tensors)
    cpu = torch.device("cpu")
    for step in range(2):
        buffer = torch.full((layout.nbytes,), 0xFF, dtype=torch.uint8)
        views = [lay.view(buffer) for lay in layout]
        bounce.copy_to_host(tensors, [t.device for t in tensors], layout, buffer, views, dev=cpu)
        for i, (view, t) in enumerate(zip(views, tensors)):
            assert torch.equal(view, t), (step, i)
        plan = bounce._plan(layout, tuple(t.device for t in tensors), cpu)
        assert [(r.first, r.last) for r in plan.runs] == [(0, 2), (5, 7)] and plan.direct == [3, 4]
        if step == 0:
            first_bounce = plan.bounce
            for t in tensors:
                t.add_(1) if t.dtype != torch.bool else t.logical_not_()
    assert plan.bounce is first_bounce, "the plan and its buffer are reused"
