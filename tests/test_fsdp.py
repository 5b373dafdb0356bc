"""FSDPTensorAwareStateDict on FSDP2 state dicts (DTensors), on real ranks joined by gloo (CPU).

The model's layer sizes are chosen so that shards are uneven: Linear(5, 7), Linear(7, 3) and
Linear(3, 1) sharded on dimension 0 give local shards of 4/3, 2/1 and 1/0 rows on 2 ranks, so a rank
holds an empty shard. Multi-rank bodies are module-level functions run by ``ranks``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tasd import TensorPlaceholder
from tasd.fsdp import DTensorPlaceholder, FSDPTensorAwareStateDict, MeshMismatchError
from tasd.launch import run_ranks
from tasd.serialization import UnsafeCheckpointError, dumps, safe_loads
from tests.test_basic_state_dict import assert_same

SESSION = "fsdp"
PRELOAD = ("tasd.fsdp", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict")
SIZES = (5, 7, 3, 1)  # Linear(5, 7), Linear(7, 3), Linear(3, 1)


def run(ranks, fn, world, *args):
    return ranks(fn, world, *args, preload=PRELOAD, timeout_s=90)


# -- helpers run inside the ranks ------------------------------------------------------------------

def build(mesh, seed: int = 0):
    """A tiny MLP with every Linear and the root fully_shard'ed on ``mesh`` (HSDP on a 2-D mesh), and Adam."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def train_step(model, optim, step: int, rank: int) -> float:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(8, SIZES[0], generator=g), torch.randn(8, SIZES[-1], generator=g)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item()


def trained(mesh, steps: int = 2):
    model, optim = build(mesh)
    for step in range(steps):
        train_step(model, optim, step, 0)
    return model, optim


def full_state(model, optim) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def snapshot(obj):
    """A plain, picklable copy: a DTensor becomes ("DTensor", local shard clone, placements,
    global shape, global stride, mesh dimension names, mesh shape), a tensor its clone."""
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        mesh = obj.device_mesh
        return ("DTensor", obj._local_tensor.detach().clone(), tuple(map(repr, obj.placements)), tuple(obj.shape),
                tuple(obj.stride()), mesh.mesh_dim_names, tuple(mesh.shape))
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def dtensor_paths(obj, path=""):
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in dtensor_paths(v, f"{path}.{k}" if path else str(k))]
    return []


def assert_on_mesh(sd_tree, mesh) -> int:
    """Every DTensor of ``sd_tree`` lives on ``mesh`` (or a sub-mesh of it); returns how many."""
    from torch.distributed.tensor import DTensor
    found = []

    def walk(x):
        if isinstance(x, DTensor):
            found.append(x)
            assert x.device_mesh is mesh or set(x.device_mesh.mesh_dim_names) < set(mesh.mesh_dim_names)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(sd_tree)
    return len(found)


# -- 1. pop / insert round trip, hollow pickling, live mesh --------------------------------------

def round_trip(rank, world):
    import tasd.fsdp
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = trained(mesh)
    original = {**full_state(model, optim), "meta": {"step": 2, "note": "x", "betas": (0.9, 0.999)}}
    original["tied"] = [original["model"]["0.weight"]]  # one DTensor object under two keys
    want = snapshot(original)
    paths = dtensor_paths(original)
    assert len(paths) == 3 * 2 * 3, "3 weights and 3 biases, each with exp_avg and exp_avg_sq"

    sd = FSDPTensorAwareStateDict(original)
    tensors = sd.pop_tensors()
    assert sd.is_hollow and all(type(t) is torch.Tensor for t in tensors)
    assert len(tensors) == 18 + 6, "18 local shards and 6 optimizer step tensors; the tied DTensor once"
    hollow = sd.state_dict
    w = original["model"]["0.weight"]
    ph = hollow["model"]["0.weight"]
    assert isinstance(ph, DTensorPlaceholder) and tensors[ph.index] is w._local_tensor
    assert (ph.placements, ph.global_shape, ph.global_stride) == ((("shard", 0),), (7, 5), (5, 1))
    assert ph.shape == ((4, 5) if rank == 0 else (3, 5))
    empty = hollow["model"]["4.weight"]  # Linear(3, 1): one row on 2 ranks
    assert empty.shape == ((1, 3) if rank == 0 else (0, 3)) and empty.global_shape == (1, 3)
    step = hollow["optim"]["state"]["0.weight"]["step"]
    assert type(step) is TensorPlaceholder
    assert sd.__getstate__()["meshes"] == [{"device_type": "cpu", "dim_names": ("shard",), "shape": (world,),
                                            "coordinate": (rank,), "world_size": world}]
    data = dumps(sd)
    assert len(data) < 8192, f"the hollow state dict is metadata only ({len(data)} bytes)"

    # Putting the very tensors back restores the caller's structure without a walk.
    saved_walks = tasd.fsdp.map_leaves, tasd.fsdp.map_tensors

    def no_walk(*a, **k):
        raise AssertionError("walked")
    tasd.fsdp.map_leaves = tasd.fsdp.map_tensors = no_walk
    try:
        sd.insert_tensors(tensors)
    finally:
        tasd.fsdp.map_leaves, tasd.fsdp.map_tensors = saved_walks
    assert not sd.is_hollow and sd.state_dict is original
    assert_same(snapshot(sd.state_dict), want)

    # Decoded by the safe unpickler: shards come back, DTensors only on a live mesh.
    loaded = safe_loads(data)
    assert isinstance(loaded, FSDPTensorAwareStateDict) and loaded.is_hollow
    loaded.insert_tensors([t.clone() for t in tensors])
    assert loaded.needs_mesh
    with pytest.raises(ValueError, match=r"'model\.0\.weight' on rank \d is a DTensor .* attach_mesh"):
        loaded.state_dict
    assert [t.shape for t in loaded.tensors] == [t.shape for t in sd.tensors]  # shards need no mesh
    assert loaded.attach_mesh(mesh) is loaded and not loaded.needs_mesh
    rebuilt = loaded.state_dict
    assert assert_on_mesh(rebuilt, mesh) == 18 + 1  # the tied one at two keys
    assert_same(snapshot(rebuilt), want)
    assert loaded.state_dict is rebuilt, "built once"
    assert rebuilt["tied"][0] is rebuilt["model"]["0.weight"], "one DTensor object at both keys"
    assert list(loaded.values())[2] == original["meta"]

    # The mesh may also be attached before the tensors are inserted.
    early = safe_loads(data).attach_mesh(mesh)
    early.insert_tensors([t.clone() for t in tensors])
    assert_same(snapshot(early.state_dict), want)

    # Invariant on an object that was loaded: pop / insert again.
    again = early.pop_tensors()
    early.insert_tensors(again)
    assert_same(snapshot(early.state_dict), want)

    # Staging: host copies of the shards, rebuilt as DTensors on the mesh they were popped from.
    sd.copy_tensors_to_cpu()
    with torch.no_grad():
        w._local_tensor.add_(1.0)  # training goes on: the copy is a point-in-time snapshot
    staged = sd.state_dict
    assert staged is not original and staged["model"]["0.weight"].device_mesh is mesh
    assert_same(snapshot(staged), want)
    sd.restore_tensor_device()  # CPU mesh: the shards stay on the CPU
    assert_same(snapshot(sd.state_dict), want)
    return len(data)


def test_pop_insert_round_trip_and_hollow_pickling(ranks):
    sizes = run(ranks, round_trip, 2)
    assert all(0 < n < 8192 for n in sizes)


# -- 2. save with a manager (sync and async), load in fresh processes, resume ---------------------

def save_then_train(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from tasd.managers import LocalCheckpointManager
    from tasd.managers.async_ckpt import AsyncCallsQueue
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = build(mesh)
    for step in range(3):
        train_step(model, optim, step, rank)
    saved = snapshot(full_state(model, optim))
    LocalCheckpointManager(Path(root) / "sync", SESSION).save(
        FSDPTensorAwareStateDict(full_state(model, optim)), 3)
    queue = AsyncCallsQueue(persistent=True, wait_timeout_s=30)
    try:
        request = LocalCheckpointManager(Path(root) / "async", SESSION).save(
            FSDPTensorAwareStateDict(full_state(model, optim)), 3, is_async=True)
        queue.schedule_async_request(request)
        # Training goes on while the async save runs: its in-place updates must not be saved.
        losses = [train_step(model, optim, 3, rank)]
        queue.maybe_finalize_async_calls(blocking=True)
    finally:
        queue.close()
    losses += [train_step(model, optim, step, rank) for step in range(4, 6)]
    return saved, losses


def load_then_train(rank, world, root, repl):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from tasd.managers import LocalCheckpointManager
    from tasd.managers.replication import CliqueReplicationStrategy
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = build(mesh, seed=123)  # another initialization: the load must overwrite all of it
    strategy = CliqueReplicationStrategy.from_replication_params(1, 2) if repl else None
    manager = LocalCheckpointManager(root, SESSION, strategy)
    latest = manager.find_latest()
    sd, ckpt_id = manager.load()
    assert ckpt_id == (latest, rank, SESSION) and isinstance(sd, FSDPTensorAwareStateDict)
    assert sd.needs_mesh, "a loaded state dict knows no mesh"
    sd.attach_mesh(mesh)
    set_state_dict(model, optim, model_state_dict=sd.state_dict["model"], optim_state_dict=sd.state_dict["optim"])
    restored = snapshot(full_state(model, optim))
    # Loading twice (as Megatron-LM does) serves a kept copy: a new object, which needs the mesh too.
    twice, _ = manager.load()
    assert twice is not sd and twice.needs_mesh
    assert_same(snapshot(twice.attach_mesh(mesh).state_dict), snapshot(sd.state_dict))
    losses = [train_step(model, optim, step, rank) for step in range(latest, latest + 3)]
    return latest, restored, losses


def test_manager_save_sync_and_async_load_fresh_and_resume(ranks, tmp_path):
    saved = run(ranks, save_then_train, 2, tmp_path)
    for kind in ("sync", "async"):
        loaded = run(ranks, load_then_train, 2, tmp_path / kind, False)
        for rank, ((want, uninterrupted), (latest, restored, resumed)) in enumerate(zip(saved, loaded)):
            assert latest == 3
            assert_same(restored, want)  # parameters and optimizer state bitwise, structure included
            assert resumed == uninterrupted, f"{kind}, rank {rank}: resumed losses differ"
    assert saved[0][1] != saved[1][1], "ranks trained on different data"


# -- 3. uneven and empty shards -------------------------------------------------------------------

def uneven(rank, world):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = trained(mesh)
    state = full_state(model, optim)
    full = {k: v.full_tensor() for k, v in state["model"].items()}
    want = snapshot(state)
    sd = FSDPTensorAwareStateDict(state)
    tensors = sd.pop_tensors()
    shapes = {k: tuple(ph.shape) for k, ph in sd.state_dict["model"].items()}
    loaded = safe_loads(dumps(sd))
    loaded.insert_tensors([t.clone() for t in tensors])
    loaded.attach_mesh(mesh)
    assert_same(snapshot(loaded.state_dict), want)
    fresh, fresh_optim = build(mesh, seed=7)
    set_state_dict(fresh, fresh_optim, model_state_dict=loaded.state_dict["model"],
                   optim_state_dict=loaded.state_dict["optim"])
    after = full_state(fresh, fresh_optim)
    for k, v in after["model"].items():
        assert torch.equal(v.full_tensor(), full[k]), k
    assert_same(snapshot(after), want)
    return shapes


def test_uneven_and_empty_shards_round_trip_exactly(ranks):
    shapes = run(ranks, uneven, 3)
    # 7 rows on 3 ranks: 3/3/1; 3 rows: 1/1/1; 1 row: 1/0/0 (ranks 1 and 2 hold empty shards).
    assert [s["0.weight"] for s in shapes] == [(3, 5), (3, 5), (1, 5)]
    assert [s["4.weight"] for s in shapes] == [(1, 3), (0, 3), (0, 3)]
    assert [s["4.bias"] for s in shapes] == [(1,), (0,), (0,)]


# -- 4. a 2-D mesh (HSDP) -----------------------------------------------------------------------

def hsdp(rank, world):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, optim = trained(mesh)
    state = full_state(model, optim)
    # A DTensor on a named sub-mesh (as tensor parallelism would make) resolves against the 2-D mesh.
    state["extra"] = DTensor.from_local(torch.arange(3.0) + rank, mesh["shard"], [Shard(0)], run_check=False,
                                        shape=torch.Size([6]), stride=(1,))
    want = snapshot(state)
    sd = FSDPTensorAwareStateDict(state)
    tensors = sd.pop_tensors()
    ph = sd.state_dict["model"]["0.weight"]
    assert ph.placements == (("replicate",), ("shard", 0)) and ph.global_shape == (7, 5)
    meshes = sd.__getstate__()["meshes"]
    assert meshes == [
        {"device_type": "cpu", "dim_names": ("replicate", "shard"), "shape": (2, 2),
         "coordinate": (rank // 2, rank % 2), "world_size": 4},
        {"device_type": "cpu", "dim_names": ("shard",), "shape": (2,), "coordinate": (rank % 2,), "world_size": 4}]
    data = dumps(sd)
    loaded = safe_loads(data)
    loaded.insert_tensors([t.clone() for t in tensors])
    loaded.attach_mesh(mesh)
    assert_same(snapshot(loaded.state_dict), want)
    assert loaded.state_dict["model"]["0.weight"].device_mesh is mesh
    assert loaded.state_dict["extra"].device_mesh.mesh_dim_names == ("shard",)
    fresh, fresh_optim = build(mesh, seed=5)
    set_state_dict(fresh, fresh_optim, model_state_dict=loaded.state_dict["model"],
                   optim_state_dict=loaded.state_dict["optim"])
    after = snapshot(full_state(fresh, fresh_optim))
    assert_same(after, {k: v for k, v in want.items() if k != "extra"})

    # The same world size on a 1-D mesh: refused, naming both shapes; the object is unchanged.
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("replicate", ))
    other = safe_loads(data)
    other.insert_tensors([t.clone() for t in tensors])
    with pytest.raises(MeshMismatchError) as e:
        other.attach_mesh(flat)
    assert other.needs_mesh
    return str(e.value)


def test_hsdp_on_a_2d_mesh(ranks):
    errors = run(ranks, hsdp, 4)
    for rank, msg in enumerate(errors):
        assert f"rank {rank}: state dict entry 'model.0.weight'" in msg, msg
        assert "(2, 2)" in msg and "(4,)" in msg and "same mesh shape and world size" in msg, msg


# -- 5. replication: a lost node is recovered from its peer ----------------------------------------

def save_replicated_snapshot(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from tasd.managers import LocalCheckpointManager
    from tasd.managers.replication import CliqueReplicationStrategy
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = build(mesh)
    manager = LocalCheckpointManager(root, SESSION, CliqueReplicationStrategy.from_replication_params(1, 2))
    saved = None
    for step in range(2):
        train_step(model, optim, step, rank)
        saved = snapshot(full_state(model, optim))
        manager.save(FSDPTensorAwareStateDict(full_state(model, optim)), step + 1)
    manager.wait_for_cleanup()
    losses = [train_step(model, optim, step, rank) for step in range(2, 5)]
    return saved, losses


@pytest.fixture(scope="module")
def replicated_checkpoint(tmp_path_factory):
    """A checkpoint saved by 2 ranks with clique replication (factor 2): (root, per-rank (state
    saved at iteration 2, losses of the 3 steps after it))."""
    root = tmp_path_factory.mktemp("replicated")
    saved = run_ranks(save_replicated_snapshot, 2, root, preload=PRELOAD, timeout_s=90, collective_timeout_s=20)
    assert sorted(p.name for p in (root / SESSION / "1").iterdir()) == \
        ["iter_0000002_0_local.tasd", "iter_0000002_1_local.tasd"], "rank 1 holds its own part and rank 0's"
    return root, saved


@pytest.mark.parametrize("lost", [0, 1])  # rank 1 holds an empty shard of Linear(3, 1)
def test_replicated_save_survives_a_lost_node(ranks, replicated_checkpoint, tmp_path, lost):
    pristine, saved = replicated_checkpoint
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    shutil.rmtree(root / SESSION / str(lost))  # the node and its local disk are gone
    loaded = run(ranks, load_then_train, 2, root, True)
    for (want, uninterrupted), (latest, restored, resumed) in zip(saved, loaded):
        assert latest == 2
        assert_same(restored, want)
        assert resumed == uninterrupted


# -- 6. another world size or mesh shape is refused ----------------------------------------------

def hollow_on_two(rank, world):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    model, optim = trained(mesh)
    sd = FSDPTensorAwareStateDict(full_state(model, optim))
    tensors = sd.pop_tensors()
    data = dumps(sd)
    # Same shape and names, but the ranks in the other order: each rank would get its peer's shard.
    swapped = DeviceMesh("cpu", [1, 0], mesh_dim_names=("shard",))
    with pytest.raises(MeshMismatchError, match=r"coordinate \(1,\).*coordinate \(0,\)|coordinate \(0,\).*"
                                                r"coordinate \(1,\)"):
        safe_loads(data).attach_mesh(swapped)
    renamed = DeviceMesh("cpu", [0, 1], mesh_dim_names=("dp",))
    with pytest.raises(MeshMismatchError, match="dimension names differ"):
        safe_loads(data).attach_mesh(renamed)
    return data, tensors


def attach_elsewhere(rank, world, data, tensors):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    sd = safe_loads(data)
    sd.insert_tensors(tensors)
    with pytest.raises(MeshMismatchError) as e:
        sd.attach_mesh(mesh)
    assert sd.needs_mesh
    with pytest.raises(ValueError, match="attach_mesh"):
        sd.state_dict
    return str(e.value)


def test_other_world_size_or_mesh_shape_is_refused(ranks):
    (data, tensors), _ = run(ranks, hollow_on_two, 2)
    msg, = run(ranks, attach_elsewhere, 1, data, tensors)
    assert "state dict entry 'model.0.weight'" in msg and "rank 0" in msg, msg
    assert "shape (2,)" in msg and "shape (1,)" in msg, msg
    assert "world size differs (2 saved, 1 now)" in msg, msg
    assert "local checkpoints are per rank: restore onto the same mesh shape and world size" in msg, msg


# -- 7. legacy ShardedTensor refused; plain state dicts work ---------------------------------------

def legacy_and_plain(rank, world, root):
    from torch.distributed._shard.sharded_tensor import empty as sharded_empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec
    from tasd.managers import LocalCheckpointManager
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    legacy = FSDPTensorAwareStateDict({"model": {"layer.weight": sharded_empty(spec, 4, 3)}, "step": 1})
    with pytest.raises(TypeError) as e:
        legacy.pop_tensors()
    assert not legacy.is_hollow

    # A plain state dict (no DTensor) through a manager: no mesh needed.
    plain = {"w": torch.full((3, 2), float(rank)), "opt": {"step": torch.tensor(4.0), "lr": 0.1}, "names": ["a"]}
    manager = LocalCheckpointManager(root, SESSION)
    manager.save(FSDPTensorAwareStateDict(plain), 1)
    sd, _ = LocalCheckpointManager(root, SESSION).load()
    assert isinstance(sd, FSDPTensorAwareStateDict) and not sd.needs_mesh
    assert_same(sd.state_dict, plain)
    return str(e.value)


def test_legacy_sharded_tensor_is_refused_and_plain_state_dicts_work(ranks, tmp_path):
    for msg in run(ranks, legacy_and_plain, 2, tmp_path):
        assert "state dict entry 'model.layer.weight'" in msg and "legacy ShardedTensor" in msg, msg
        for hint in ("fully_shard", "device_mesh", "StateDictType.SHARDED_STATE_DICT", "get_state_dict"):
            assert hint in msg, msg


# -- in this process: plain tensors, ties, misuse, decoding ---------------------------------------

def test_plain_round_trip_ties_and_pickling():
    shared = torch.arange(6.0)
    original = {"a": shared, "tied": shared, "view": shared[1:3], "nested": [torch.ones(2), (torch.zeros(0), 3)],
                "note": "n"}
    sd = FSDPTensorAwareStateDict(original)
    tensors = sd.pop_tensors()
    assert len(tensors) == 4, "the tied tensor once"
    loaded = safe_loads(dumps(sd))
    assert not loaded.needs_mesh
    loaded.insert_tensors([t.clone() for t in tensors])
    assert loaded.state_dict["a"] is loaded.state_dict["tied"], "one tensor at both keys"
    assert_same(loaded.state_dict, original)
    assert_same(list(loaded.values()), list(original.values()))
    sd.insert_tensors(tensors)
    assert sd.state_dict is original
    sd.copy_tensors_to_cpu()
    copy = sd.state_dict
    assert copy["a"] is not shared and copy["a"] is copy["tied"]
    shared.add_(1)
    assert torch.equal(copy["a"], torch.arange(6.0)), "a point-in-time snapshot"
    sd.restore_tensor_device()
    assert sd.state_dict["a"].device.type == "cpu"
    empty = FSDPTensorAwareStateDict({"x": torch.ones(2, 3)})
    empty.pop_tensors()
    empty.init_tensors()
    assert empty.state_dict["x"].shape == (2, 3)


def test_misuse_and_unsupported_content_raise():
    class Wrapped(torch.Tensor):
        pass

    with pytest.raises(TypeError):
        FSDPTensorAwareStateDict(torch.ones(1))
    with pytest.raises(TypeError, match=r"'opt\.x\[1\]' on rank 0 is a Wrapped \(a tensor subclass\)"):
        FSDPTensorAwareStateDict({"opt": {"x": [1, torch.ones(2).as_subclass(Wrapped)]}}).pop_tensors()
    sd = FSDPTensorAwareStateDict({"a": torch.ones(2)})
    with pytest.raises(TypeError, match="hollow"):
        dumps(sd)
    with pytest.raises(ValueError, match="not hollow"):
        sd.insert_tensors([torch.ones(2)])
    with pytest.raises(TypeError, match="DeviceMesh"):
        sd.attach_mesh("cpu")
    sd.pop_tensors()
    with pytest.raises(ValueError, match="hollow"):
        sd.pop_tensors()
    with pytest.raises(ValueError, match="'a'"):
        sd.insert_tensors([torch.ones(3)])
    with pytest.raises(ValueError):
        sd.insert_tensors([torch.ones(2), torch.ones(2)])


def test_decoding_checks_placeholders_and_state():
    ph = DTensorPlaceholder(0, torch.float32, (2,), "cpu", 0, (("shard", 0),), (4,), (1,))
    assert safe_loads(dumps(ph)) == ph
    bad = object.__new__(DTensorPlaceholder)
    for name, value in zip(("index", "dtype", "shape", "device", "mesh", "placements", "global_shape",
                            "global_stride"), (0, torch.float32, (2,), "cpu", 0, (("shard", "0"),), (4,), (1,))):
        setattr(bad, name, value)
    with pytest.raises(UnsafeCheckpointError):
        safe_loads(dumps(bad))
    sd = FSDPTensorAwareStateDict({"a": torch.ones(1)})
    sd.pop_tensors()
    sd._meshes = [{"device_type": "cpu", "dim_names": ("x",), "shape": (2,), "coordinate": (0,), "world_size": 2}]
    good = dumps(sd)
    assert safe_loads(good).is_hollow
    with pytest.raises(UnsafeCheckpointError):
        safe_loads(good.replace(b"world_size", b"world_sizf"))


def test_a_fresh_process_decodes_without_importing_tasd_fsdp(tmp_path):
    """The safe decoder imports tasd.fsdp on demand (serialization.LIBRARY_MODULES), as a restarted
    rank receiving its part from a peer needs."""
    sd = FSDPTensorAwareStateDict({"w": torch.ones(2)})
    sd.pop_tensors()
    sd._hollow_tree = {"w": DTensorPlaceholder(0, torch.float32, (2,), "cpu", 0, (("shard", 0),), (3,), (1,))}
    sd._meshes = [{"device_type": "cpu", "dim_names": ("shard",), "shape": (2,), "coordinate": (0,),
                   "world_size": 2}]
    (tmp_path / "hollow").write_bytes(dumps(sd))
    code = ("import sys; from tasd.serialization import safe_loads; assert 'tasd.fsdp' not in sys.modules; "
            f"sd = safe_loads(open({str(tmp_path / 'hollow')!r}, 'rb').read()); "
            "print(type(sd).__module__, type(sd).__name__, sd.state_dict['w'].global_shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tasd.fsdp", "FSDPTensorAwareStateDict", "(3,)"]
