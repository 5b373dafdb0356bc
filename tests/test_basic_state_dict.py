"""BasicTensorAwareStateDict: pop/insert invariant, staging, pickling of hollow objects."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch

from tasd import BasicTensorAwareStateDict, HostBufferPool, TensorPlaceholder, add_safe_globals
from tasd.serialization import dumps, safe_loads

Point = collections.namedtuple("Point", "x y")
add_safe_globals([Point])  # user classes in a state dict must be allowed explicitly


def every_kind() -> dict:
    """One of each tensor kind and container the Basic backend must round-trip."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, 3, generator=g).half(),
        "f64": torch.randn(2, generator=g).double(),
        "int8": torch.randint(-128, 127, (17,), dtype=torch.int8, generator=g),
        "int64": torch.randint(0, 1 << 40, (4, 2), generator=g),
        "bool": torch.rand(11, generator=g) > 0.5,
        "complex": torch.randn(3, dtype=torch.complex64, generator=g),
        "zero_dim": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "non_contiguous": torch.randn(6, 8, generator=g).t()[::2],
        "nested": {"list": [torch.ones(2), 3, "x", None], "tuple": (torch.zeros(1), 2.5),
                   "named": Point(torch.arange(3), "y"), "od": collections.OrderedDict(a=torch.ones(1))},
        "scalars": {"int": 7, "float": 1.5, "str": "s", "bytes": b"b", "none": None, "dtype": torch.float16,
                    "size": torch.Size([2, 3]), "set": {1, 2}},
    }


def assert_same(a, b, path="root"):
    """Structures equal, tensors equal bitwise with the same dtype and shape."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                           b.reshape(-1).view(torch.uint8) if b.numel() else b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_pop_insert_invariant_and_hollow_pickle():
    original = every_kind()
    sd = BasicTensorAwareStateDict(original)
    tensors = sd.pop_tensors()
    assert sd.is_hollow and len(tensors) == 15
    hollow = safe_loads(dumps(sd))  # small, picklable, decoded by the restricted unpickler
    assert hollow.is_hollow and len(dumps(sd)) < 4096
    assert isinstance(hollow.state_dict["f32"], TensorPlaceholder)
    sd.insert_tensors(tensors)
    assert not sd.is_hollow
    assert_same(sd.state_dict, original)
    assert_same(list(sd.tensors), tensors)
    hollow.insert_tensors(tensors)
    assert_same(hollow.state_dict, original)


def test_caller_structure_is_not_mutated():
    original = {"a": [torch.ones(2)], "b": (torch.zeros(1),)}
    sd = BasicTensorAwareStateDict(original)
    sd.pop_tensors()
    assert isinstance(original["a"][0], torch.Tensor)


def test_hidden_tensor_raises_type_error_with_key_path():
    class Holder:
        def __init__(self):
            self.t = torch.ones(1)

    sd = BasicTensorAwareStateDict({"optimizer": {"state": [1, Holder()]}})
    with pytest.raises(TypeError, match=r"optimizer\.state\[1\]"):
        sd.pop_tensors()


def test_misuse_raises():
    sd = BasicTensorAwareStateDict({"a": torch.ones(2)})
    with pytest.raises(ValueError):
        sd.insert_tensors([torch.ones(2)])
    with pytest.raises(TypeError):
        pickle.dumps(sd)  # not hollow
    sd.pop_tensors()
    with pytest.raises(ValueError):
        sd.pop_tensors()
    with pytest.raises(ValueError, match="'a'"):
        sd.insert_tensors([torch.ones(3)])
    with pytest.raises(ValueError):
        sd.insert_tensors([torch.ones(2), torch.ones(2)])
    with pytest.raises(TypeError):
        BasicTensorAwareStateDict(torch.ones(1))
    with pytest.raises(TypeError, match="sparse"):
        BasicTensorAwareStateDict({"s": torch.eye(2).to_sparse()}).pop_tensors()


def test_init_tensors_allocates_matching_tensors():
    sd = BasicTensorAwareStateDict(every_kind())
    tensors = sd.pop_tensors()
    sd.init_tensors()
    for got, want in zip(sd.tensors, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"


def test_copy_tensors_to_cpu_is_a_snapshot_and_reuses_buffers():
    pool = HostBufferPool()
    live = {"w": torch.arange(10.0), "b": [torch.ones(3, dtype=torch.bfloat16)]}
    sd = BasicTensorAwareStateDict(live, pool=pool)
    sd.copy_tensors_to_cpu()
    live["w"].add_(100)  # the caller keeps training
    assert torch.equal(sd.state_dict["w"], torch.arange(10.0))
    assert pool.allocations == 1 and pool.reuses == 0
    for _ in range(3):
        sd2 = BasicTensorAwareStateDict(live, pool=pool)
        sd2.copy_tensors_to_cpu()
        assert torch.equal(sd2.state_dict["w"], live["w"])
        del sd2  # the copies are dropped: the buffer returns to the pool
    assert pool.allocations == 2 and pool.reuses == 2  # sd still holds the first buffer
    sd.restore_tensor_device()
    assert sd.state_dict["w"].device.type == "cpu"


def test_pool_bound_drops_oldest_free_buffers():
    pool = HostBufferPool(max_pooled_bytes=1000)
    a, b = pool.acquire(600), pool.acquire(600)
    pool.release(a)
    pool.release(b)  # 1200 > 1000: the oldest free buffer is dropped
    assert pool.pooled_bytes == 600 and pool.in_use_bytes == 0
    with pytest.raises(ValueError):
        pool.release(a)


def test_restore_tensor_device_returns_tensors_to_their_recorded_device():
    """A part saved from CUDA tensors records their device; restoring on a machine without CUDA
    keeps them on CPU instead of failing (and moves them back to CUDA where it exists)."""
    sd = BasicTensorAwareStateDict({"w": torch.ones(3)})
    tensors = sd.pop_tensors()
    sd.state_dict["w"] = TensorPlaceholder(0, torch.float32, (3,), "cuda:0")  # as saved on a GPU node
    hollow = safe_loads(dumps(sd))
    hollow.insert_tensors(tensors)
    hollow.restore_tensor_device()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert hollow.state_dict["w"].device.type == expected
    assert torch.equal(hollow.state_dict["w"].cpu(), torch.ones(3))


# -- tied tensors (one tensor under two keys) ------------------------------------------------------

class TiedLM(torch.nn.Module):
    """Input embedding and output head share one weight, as in tied-embedding language models."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 1000, bias=False)
        self.head.weight = self.emb.weight


def tied_state() -> dict:
    torch.manual_seed(0)
    sd = TiedLM().state_dict()  # a fresh detached tensor per key, both over the same storage
    assert sd["emb.weight"] is not sd["head.weight"]
    return {"model": sd, "step": 3}


def test_tied_tensors_are_popped_once_and_inserted_as_one_tensor():
    original = tied_state()
    sd = BasicTensorAwareStateDict(original)
    tensors = sd.pop_tensors()
    assert len(tensors) == 3, "emb/head weight once, norm weight, norm bias"
    ph = sd.state_dict["model"]
    assert ph["emb.weight"].index == ph["head.weight"].index == 0
    sd.insert_tensors(tensors)
    assert_same(sd.state_dict, original)
    for key in ("emb.weight", "head.weight"):  # the very tensors popped: the structure as it was
        assert sd.state_dict["model"][key] is original["model"][key]
    copies = [t.clone() for t in sd.pop_tensors()]
    sd.insert_tensors(copies)  # other tensors: one object at every key of its index
    assert sd.state_dict["model"]["emb.weight"] is sd.state_dict["model"]["head.weight"] is copies[0]
    other = BasicTensorAwareStateDict(original)
    other.pop_tensors()
    hollow = safe_loads(dumps(other))
    hollow.init_tensors()
    assert hollow.state_dict["model"]["emb.weight"] is hollow.state_dict["model"]["head.weight"]
    assert len(hollow.pop_tensors()) == 3
    with pytest.raises(ValueError, match="got 4 tensors for 3"):
        hollow.insert_tensors(tensors + [torch.ones(1)])
    with pytest.raises(ValueError, match="got 2 tensors"):
        hollow.insert_tensors(tensors[:2])


def test_aliases_that_are_not_the_same_view_stay_separate():
    base = torch.arange(12.0)
    state = {"a": base, "b": base[:6], "c": base.view(3, 4), "d": base.view(torch.int32),
             "e": torch.empty(0), "f": torch.empty(0), "p": torch.nn.Parameter(base), "g": base.detach()}
    sd = BasicTensorAwareStateDict(state)
    tensors = sd.pop_tensors()
    assert len(tensors) == 7, "only 'g' is the same view as 'a' (a Parameter is kept apart)"
    assert sd.state_dict["g"].index == sd.state_dict["a"].index
    sd.insert_tensors([t if isinstance(t, torch.nn.Parameter) else t.clone() for t in tensors])
    assert_same(sd.state_dict, {**state, "g": base})
    assert sd.state_dict["g"] is sd.state_dict["a"]


def test_copy_tensors_to_cpu_keeps_tied_tensors_tied():
    pool = HostBufferPool(pin=False)
    sd = BasicTensorAwareStateDict(tied_state(), pool=pool)
    sd.copy_tensors_to_cpu()
    model = sd.state_dict["model"]
    assert model["emb.weight"] is model["head.weight"]
    assert torch.equal(model["emb.weight"], tied_state()["model"]["emb.weight"])
    assert pool.allocated_bytes < 1.5 * 1000 * 16 * 4, "the shared weight is staged once"
    sd.restore_tensor_device()
    assert sd.state_dict["model"]["emb.weight"] is sd.state_dict["model"]["head.weight"]


def test_tied_tensors_survive_a_save_and_load(tmp_path):
    from tasd.managers import LocalCheckpointManager

    state = tied_state()
    m = LocalCheckpointManager(tmp_path, "tied")
    m.save(BasicTensorAwareStateDict(state), 1)
    files = list(m.local_ckpt_dir.iterdir())
    weight_bytes = 1000 * 16 * 4
    assert sum(f.stat().st_size for f in files) < 1.5 * weight_bytes, "the shared weight is written once"
    loaded, ckpt_id = LocalCheckpointManager(tmp_path, "tied").load()
    assert ckpt_id == (1, 0, "tied")
    model = loaded.state_dict["model"]
    assert model["emb.weight"] is model["head.weight"]
    assert_same(loaded.state_dict, state)
    lm = TiedLM()
    lm.load_state_dict(model)
    assert lm.head.weight is lm.emb.weight and torch.equal(lm.emb.weight, state["model"]["emb.weight"])
