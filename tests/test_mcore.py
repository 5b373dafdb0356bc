"""MCoreTensorAwareStateDict over hand-built megatron-core sharded state dicts: TP splits, DP replicas,
the distributed optimizer's DP-local flat buffers, ShardedObject, ShardedTensorFactory,
LocalNonpersistentObject and a common part with Megatron's args; both algorithms, through
LocalCheckpointManager with and without replication, sync and async. Multi-rank bodies are
module-level functions run by ``ranks`` (gloo, every collective bounded by its timeout)."""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
pytest.importorskip("megatron.core")

from megatron.core.dist_checkpointing.exchange_utils import determine_main_replica_uniform_distribution  # noqa: E402
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402
    LocalNonpersistentObject, ShardedObject, ShardedTensor, ShardedTensorFactory)
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.transformer.enums import AttnBackend, CudaGraphScope  # noqa: E402

from tasd.managers import CheckpointingException, LocalCheckpointManager, ReplicationConfig  # noqa: E402
from tasd.managers.async_ckpt import AsyncCallsQueue  # noqa: E402
from tasd.managers.subgroups import GroupTree, Subgroup  # noqa: E402
from tasd.mcore import FullyParallelMetadata, MCoreTensorAwareStateDict, ShardMismatchError  # noqa: E402
from tasd.serialization import UnsafeCheckpointError, add_safe_enums, dumps, safe_loads  # noqa: E402
from tasd.state_dict import TensorPlaceholder  # noqa: E402

SESSION = "mcore"
CLIQUE2 = {"strategy": "clique", "replication_jump": 1, "replication_factor": 2}
RING2 = {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
WAIT_S = 30.0
NORM = "decoder.final_layernorm.weight"


# -- a Megatron-like sharded state dict ----------------------------------------------------------------

def _glu_build(key, t, replica_id, flattened_range):
    half = t.shape[0] // 2
    return {"w": ShardedTensor.from_rank_offsets(key + ".w", t[:half], replica_id=replica_id),
            "v": ShardedTensor.from_rank_offsets(key + ".v", t[half:], replica_id=replica_id)}


def _glu_merge(sub):
    return torch.cat([sub["w"], sub["v"]])


def sharded_sd(rank: int, world: int, tp: int, step: int, fill: float | None = None, layers: int = 3,
               width: int = 4) -> dict:
    """Rank ``rank``'s sharded state dict (rank = dp_rank * tp + tp_rank, Megatron's order): values
    depend on (tp_rank, step) so DP replicas hold the same data, except the distributed optimizer's
    DP-local flat shards; with ``fill`` the same structure holding ``fill`` (a model before a load)."""
    tp_rank, dp_rank, dp = rank % tp, rank // tp, world // tp
    g = torch.Generator().manual_seed(1000 * step + tp_rank)
    g_dp = torch.Generator().manual_seed(1000 * step + 100 * tp_rank + dp_rank + 7)

    def t(*shape, dtype=torch.float32, gen=g):
        x = torch.randn(*shape, generator=gen).to(dtype)
        return x if fill is None else torch.full_like(x, fill)

    rid_split, rid_repl = (0, 0, dp_rank), (0, tp_rank, dp_rank)
    model = {"embedding.word_embeddings.weight": ShardedTensor.from_rank_offsets(
        "embedding.word_embeddings.weight", t(8, width), (0, tp_rank, tp), replica_id=rid_split)}
    for i in range(layers):
        key = f"decoder.layers.{i}.mlp.linear_fc1.weight"
        if i == 0:  # a GLU weight saved as two tensors (megatron's ShardedTensorFactory)
            model[key] = ShardedTensorFactory(key, t(2 * width, 3), _glu_build, _glu_merge, replica_id=rid_split)
        else:
            model[key] = ShardedTensor.from_rank_offsets(key, t(width, 3, dtype=torch.bfloat16), (1, tp_rank, tp),
                                                         replica_id=rid_split)
    model[NORM] = ShardedTensor.from_rank_offsets(NORM, t(width), replica_id=rid_repl)
    n_flat = 24 * dp  # the distributed optimizer's bucket, dp_reshardable: a DP-local slice each
    local = n_flat // dp
    bucket = f"optimizer.distributed.dp_group_idx_{tp_rank}.gbuf_idx_0.dtype_torch.float32.bucket_idx_0"
    param_state = {k: ShardedTensor(f"{bucket}.{k}", d, d.dtype, d.shape, (n_flat,), (dp_rank * local,),
                                    axis_fragmentations=None, replica_id=(0, 0, 0))
                   for k, d in (("exp_avg", t(local, gen=g_dp)), ("exp_avg_sq", t(local, gen=g_dp)))}
    param_state["padding"] = LocalNonpersistentObject(False)
    seed = 10 * step + tp_rank
    rng = {"random_rng_state": random.Random(seed).getstate(),
           "np_rng_state": np.random.RandomState(seed).get_state(),
           "torch_rng_state": torch.Generator().manual_seed(seed).get_state(),
           "rng_tracker_states": {"model-parallel-rng": torch.Generator().manual_seed(seed + 1).get_state()}}
    args = argparse.Namespace(tensor_model_parallel_size=tp, lr=1e-3, params_dtype=torch.bfloat16,
                              attention_backend=AttnBackend.auto, cuda_graph_scope=[CudaGraphScope.attn],
                              model_type=ModelType.encoder_or_decoder, save=None, data_path=["a", "b"],
                              exit_signal=signal.SIGTERM)  # Megatron-LM's validate_args sets it
    per_bucket = f"optimizer.distributed.dp_group_idx_{tp_rank}.per_bucket_numel"
    return {
        "args": args, "checkpoint_version": 3.0, "iteration": step, "num_floating_point_operations_so_far": 1.5e12,
        "content_metadata": {"distrib_optim_sharding_type": "dp_reshardable", "dp_cp_group": dist.group.WORLD},
        "model": model,
        "optimizer": {"param_state": param_state,
                      "per_bucket_numel": ShardedObject(per_bucket, {0: {"torch.float32": [n_flat]}}, (1,), (0,),
                                                        replica_id=(0, 0, dp_rank)),
                      "optimizer": {"param_groups": [{"lr": 1e-3, "params": [0, 1, 2], "step": step}],
                                    "grad_scaler": {"scale": torch.tensor(65536.0 / step if step else 1.0)}}},
        "rng_state": ShardedObject("rng_state", [rng], (1, tp), (0, tp_rank), replica_id=dp_rank),
        "local_note": LocalNonpersistentObject(f"rank {rank}"),
    }


def expected(rank: int, world: int, tp: int, step: int, **kw) -> dict:
    """What to_state_dict must return after loading the save of ``step``."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
            return x.data
        if isinstance(x, LocalNonpersistentObject):
            return x.unwrap()
        return x
    out = plain(sharded_sd(rank, world, tp, step, **kw))
    del out["content_metadata"]["dp_cp_group"]  # a process group: megatron-core's cleaning drops it
    return out


def same(a, b, path="root"):
    """Equal structures (dict key order aside), tensors bitwise."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, argparse.Namespace):
        same(vars(a), vars(b), path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def dp_group(tp: int):
    """The parallelization group Megatron-LM passes: None (the world) when every rank is a DP rank,
    else megatron-core's data-parallel group (initialize_model_parallel runs on gloo)."""
    if tp == 1:
        return None
    from megatron.core import parallel_state as mpu
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    return mpu.get_data_parallel_group(with_context_parallel=True)


def manager(root, repl) -> LocalCheckpointManager:
    return LocalCheckpointManager(root, SESSION, None if repl is None else ReplicationConfig(**repl).build())


def part_sizes(m: LocalCheckpointManager) -> dict[str, int]:
    m.wait_for_cleanup()
    return {n: os.path.getsize(m.local_ckpt_dir / n) for n in sorted(os.listdir(m.local_ckpt_dir))}


# -- single process --------------------------------------------------------------------------------

def test_import_without_megatron_says_to_install_the_extra():
    code = "import sys; sys.modules['megatron'] = None\ntry:\n import tasd.mcore\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "megatron" in out.stdout and "extra" in out.stdout, out.stdout + out.stderr


def test_pop_insert_invariant_hollow_pickle_and_safe_decode():
    sd, meta = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="atomic")
    assert meta is None and not sd.is_hollow
    before = sd.state_dict
    tensors = sd.pop_tensors()
    assert sd.is_hollow and all(isinstance(t, torch.Tensor) for t in tensors)
    shapes = [tuple(t.shape) for t in tensors]
    # deterministic order: kept ShardedTensor data first (sharded state dict order), objects, common
    assert shapes[:3] == [(8, 4), (4, 3), (4, 3)] and shapes[-1] == ()
    hollow = dumps(sd)
    assert len(hollow) < 12_000, len(hollow)  # metadata only
    decoded = safe_loads(hollow)  # tasd's restricted decoder: plain data, allow-listed enums
    assert isinstance(decoded, MCoreTensorAwareStateDict) and decoded.is_hollow
    content = decoded.state_dict
    assert all(type(x) in (tuple, TensorPlaceholder) for x in content["shards"] + content["shard_data"])
    same(decoded.common_state_dict["args"], sharded_sd(0, 1, 1, 1)["args"])  # enums and dtypes round-trip
    with pytest.raises(ValueError, match="hollow"):
        sd.pop_tensors()
    with pytest.raises(TypeError, match="hollow"):
        pickle.dumps(MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="atomic")[0])
    sd.insert_tensors(tensors)
    assert not sd.is_hollow
    same(sd.state_dict, before)
    assert all(a is b for a, b in zip(sd.tensors, before["shard_data"]))
    decoded.insert_tensors([t.clone() for t in tensors])  # other tensor objects: equal, not identical
    same(decoded.state_dict, before)
    with pytest.raises(ValueError):
        decoded.insert_tensors(tensors)


def test_copy_restore_init_values():
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="atomic")
    originals = list(sd.tensors)
    sd.copy_tensors_to_cpu()
    copies = list(sd.tensors)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(originals, copies))
    originals[0].add_(1)  # training goes on: the copies are a snapshot
    assert not torch.equal(originals[0], copies[0])
    sd.restore_tensor_device()
    assert all(t.device.type == "cpu" for t in sd.tensors)
    values = list(sd.values())
    assert values[0] == sd.common_state_dict["args"] and any(v is copies[0] for v in values)
    sd.pop_tensors()
    sd.init_tensors()
    assert [t.shape for t in sd.tensors] == [t.shape for t in copies]


def test_atomic_to_state_dict_in_one_process_and_megatron_common_only_load():
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="atomic")
    out = sd.to_state_dict(sharded_sd(0, 1, 1, 0, fill=0.0), algo="atomic")
    same(out, expected(0, 1, 1, 1))
    common = sd.to_state_dict(None, algo="fully_parallel")  # Megatron's first load: common part only
    assert set(common) == {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far",
                           "content_metadata", "optimizer"}


def test_from_state_dict_leaves_the_callers_dict_as_it_was():
    original = sharded_sd(0, 1, 1, 1)
    factory = original["model"]["decoder.layers.0.mlp.linear_fc1.weight"]
    MCoreTensorAwareStateDict.from_state_dict(original, algo="atomic")
    assert original["model"]["decoder.layers.0.mlp.linear_fc1.weight"] is factory
    assert "dp_cp_group" in original["content_metadata"]
    assert isinstance(original["local_note"], LocalNonpersistentObject)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown algo 'fully_paralel'"):
        MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="fully_paralel")
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), algo="atomic")
    with pytest.raises(ValueError, match="unknown algo 'parallel'"):
        sd.to_state_dict(sharded_sd(0, 1, 1, 0, fill=0.0), algo="parallel")
    renamed = sharded_sd(0, 1, 1, 0, fill=0.0)
    norm = renamed["model"].pop(NORM)
    renamed["model"]["decoder.final_norm.weight"] = ShardedTensor.from_rank_offsets("decoder.final_norm.weight",
                                                                                    norm.data)
    with pytest.raises(ShardMismatchError, match=r"rank 0.*'decoder.final_norm.weight'"):
        sd.to_state_dict(renamed, algo="atomic")
    wider = sharded_sd(0, 1, 1, 0, fill=0.0, width=5)
    with pytest.raises(CheckpointingException, match=r"rank 0.*'embedding.word_embeddings.weight'.*\(8, 4\)"):
        sd.to_state_dict(wider, algo="atomic")
    no_rng = sharded_sd(0, 1, 1, 0, fill=0.0)
    no_rng["rng_state"] = ShardedObject("rng_state", None, (1, 2), (0, 1))
    with pytest.raises(ShardMismatchError, match="ShardedObject 'rng_state'"):
        sd.to_state_dict(no_rng, algo="atomic")
    broken = sharded_sd(0, 1, 1, 1)
    broken["model"][NORM].data = torch.zeros(3)
    with pytest.raises(ValueError, match=NORM):
        MCoreTensorAwareStateDict.from_state_dict(broken, algo="atomic")
    stale = FullyParallelMetadata((0,), {})
    with pytest.raises(ValueError, match="cached_metadata does not cover"):
        MCoreTensorAwareStateDict.from_state_dict(sharded_sd(0, 1, 1, 1), cached_metadata=stale)
    sd.pop_tensors()
    with pytest.raises(ValueError, match="hollow"):
        sd.to_state_dict(sharded_sd(0, 1, 1, 0, fill=0.0))


def test_allow_listed_enums_are_looked_up_never_built():
    class Evil:
        def __reduce__(self):
            return (AttnBackend, ("x", [("a", 1)]))  # the functional Enum API, if it were called
    with pytest.raises(UnsafeCheckpointError, match="one plain value"):
        safe_loads(pickle.dumps(Evil(), protocol=5))
    with pytest.raises(TypeError, match="enum.Enum classes"):
        add_safe_enums([argparse.Namespace])
    assert safe_loads(dumps([AttnBackend.flash, CudaGraphScope.moe, ModelType.encoder_or_decoder, signal.SIGTERM])) == [
        AttnBackend.flash, CudaGraphScope.moe, ModelType.encoder_or_decoder, signal.SIGTERM]


# -- many ranks --------------------------------------------------------------------------------------

def save_steps(rank, world, root, tp, algo, repl, is_async):
    """Two saves (the second with the first's cached metadata), sync or async; returns this
    rank's part sizes and the keys of the shards it kept."""
    group = dp_group(tp)
    m = manager(root, repl)
    q = AsyncCallsQueue(persistent=True, wait_timeout_s=WAIT_S) if is_async else None
    cache, kept = None, None
    for step in (1, 2):
        sd, cache = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(rank, world, tp, step), algo=algo,
                                                              parallelization_group=group, cached_metadata=cache)
        kept = sorted(r[0] for r in sd.state_dict["shards"])
        req = m.save(sd, step, is_async=is_async)
        if q is not None:
            q.schedule_async_request(req)
            q.maybe_finalize_async_calls(blocking=True)
    if q is not None:
        q.close()
    assert (cache is None) == (algo == "atomic")
    return part_sizes(m), kept


def restore(rank, world, root, tp, algo, repl):
    group = dp_group(tp)
    m = manager(root, repl)
    latest = m.find_latest()
    common, _ = m.load()  # Megatron loads twice: the common part, then everything
    common_part = common.to_state_dict(None, algo=algo, parallelization_group=group)
    same(common_part["args"], expected(rank, world, tp, 2)["args"])
    loaded, ckpt_id = m.load()
    assert ckpt_id == (latest, rank, SESSION)
    out = loaded.to_state_dict(sharded_sd(rank, world, tp, 0, fill=0.0), algo=algo, parallelization_group=group)
    same(out, expected(rank, world, tp, 2))
    return latest


CASES = [  # world, tp, algo, replication, async, lost rank
    (2, 1, "atomic", None, False, None),
    (2, 1, "fully_parallel", None, False, None),
    (2, 1, "fully_parallel", CLIQUE2, True, 1),
    (4, 2, "fully_parallel", RING2, False, 2),
    (4, 2, "atomic", CLIQUE2, True, 3),
]


@pytest.mark.parametrize("world, tp, algo, repl, is_async, lost", CASES, ids=lambda v: str(v))
def test_round_trip_bit_exact_through_the_manager(ranks, tmp_path, world, tp, algo, repl, is_async, lost):
    saved = ranks(save_steps, world, tmp_path, tp, algo, repl, is_async)
    for rank, (sizes, _) in enumerate(saved):
        owners = {int(n.split("_")[2]) for n in sizes}
        assert rank in owners and all(n.startswith("iter_0000002_") for n in sizes)
        assert len(owners) == (1 if repl is None else repl["replication_factor"])
    if lost is not None:
        shutil.rmtree(tmp_path / SESSION / str(lost))  # the node and its local disk are gone
    assert ranks(restore, world, tmp_path, tp, algo, repl) == [2] * world


def replicated_sd(rank: int, n: int, numel: int, fill: float | None = None) -> dict:
    """``n`` tensors replicated on every rank (DP replicas, replica_id = rank), ``numel`` float32 in all."""
    g = torch.Generator().manual_seed(5)
    sizes = [numel // n + (i < numel % n) for i in range(n)]
    return {"step": 1, "model": {f"w{i}": ShardedTensor.from_rank_offsets(
        f"w{i}", torch.randn(s, generator=g) if fill is None else torch.full((s,), fill), replica_id=rank)
        for i, s in enumerate(sizes)}}


def fully_parallel_properties(rank, world, root):
    sd = replicated_sd(rank, 16, 1 << 18)
    # megatron-core's own distribution helper, run on the world gloo group here, chooses the same savers
    ours, meta = MCoreTensorAwareStateDict.from_state_dict(sd, algo="fully_parallel")
    theirs = determine_main_replica_uniform_distribution(save_preprocess(replicated_sd(rank, 16, 1 << 18), False)[0],
                                                         dist.group.WORLD, True)
    assert meta.saver == {sid: meta.group_ranks[r] for sid, r in theirs.main_rank_for_shard.items()}
    # cached metadata: no communication, the same choice
    again, same_meta = MCoreTensorAwareStateDict.from_state_dict(sd, algo="fully_parallel", cached_metadata=meta)
    assert same_meta is meta and again.state_dict["shards"] == ours.state_dict["shards"]
    sizes = {}
    for algo in ("atomic", "fully_parallel"):
        m = LocalCheckpointManager(root, algo)
        m.save(MCoreTensorAwareStateDict.from_state_dict(sd, algo=algo)[0], 1)
        sizes[algo] = sum(part_sizes(m).values())
        loaded = LocalCheckpointManager(root, algo).load()[0]
        same(loaded.to_state_dict(replicated_sd(rank, 16, 1 << 18, fill=0.0), algo=algo),
             {"step": 1, "model": {k: v.data for k, v in replicated_sd(rank, 16, 1 << 18)["model"].items()}})
    return sizes


def test_fully_parallel_keeps_each_replica_once_as_megatron_distributes(ranks, tmp_path):
    sizes = ranks(fully_parallel_properties, 2, tmp_path)
    atomic = sum(s["atomic"] for s in sizes)
    fully = sum(s["fully_parallel"] for s in sizes)
    assert abs(fully - atomic / 2) < 0.02 * atomic, (fully, atomic)  # about 1/DP of the replicated bytes
    assert all(abs(s["fully_parallel"] - fully / 2) < 0.1 * fully for s in sizes), sizes  # and spread evenly


def count_exchange_ops(rank, world, n_tensors):
    """Point-to-point and all_reduce operations of one fully parallel to_state_dict."""
    counts = {"p2p": 0, "all_reduce": 0}
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(replicated_sd(rank, n_tensors, 1 << 16), algo="fully_parallel")
    real = {"send": Subgroup.send, "recv": Subgroup.recv, "all_reduce": GroupTree.all_reduce}

    def counting(name, kind):
        def op(self, *a, **kw):
            counts[kind] += 1
            return real[name](self, *a, **kw)
        return op
    Subgroup.send, Subgroup.recv = counting("send", "p2p"), counting("recv", "p2p")
    GroupTree.all_reduce = counting("all_reduce", "all_reduce")
    try:
        out = sd.to_state_dict(replicated_sd(rank, n_tensors, 1 << 16, fill=0.0), algo="fully_parallel")
    finally:
        Subgroup.send, Subgroup.recv, GroupTree.all_reduce = real["send"], real["recv"], real["all_reduce"]
    same(out["model"], {k: v.data for k, v in replicated_sd(rank, n_tensors, 1 << 16)["model"].items()})
    return counts


def test_exchange_operation_count_does_not_grow_with_tensor_count(ranks):
    few, many = ranks(count_exchange_ops, 2, 4), ranks(count_exchange_ops, 2, 300)
    assert few == many, (few, many)
    assert all(c["p2p"] > 0 for c in few)  # shards did move


def mismatch_everywhere(rank, world):
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(sharded_sd(rank, world, 1, 1), algo="fully_parallel")
    seen = []
    # rank 1 asks for a key the checkpoint lacks: every rank raises, naming it and the rank
    asked = sharded_sd(rank, world, 1, 0, fill=0.0)
    if rank == 1:
        norm = asked["model"].pop(NORM)
        asked["model"]["decoder.final_norm.weight"] = ShardedTensor.from_rank_offsets(
            "decoder.final_norm.weight", norm.data, replica_id=norm.replica_id)
    with pytest.raises(ShardMismatchError, match=r"rank 1 needs shard 'decoder.final_norm.weight'") as e:
        sd.to_state_dict(asked, algo="fully_parallel")
    seen.append(str(e.value))
    # rank 0 asks for a shard it holds with another shape: it raises its own error, the others name it
    wider = sharded_sd(rank, world, 1, 0, fill=0.0, width=5 if rank == 0 else 4)
    with pytest.raises(CheckpointingException, match="rank 0") as e:
        sd.to_state_dict(wider, algo="fully_parallel")
    seen.append(str(e.value))
    # a bad sharded state dict on rank 1 at save fails the distribution on every rank
    bad = sharded_sd(rank, world, 1, 1)
    if rank == 1:
        bad["model"][NORM].data = torch.zeros(3)
    with pytest.raises((ValueError, CheckpointingException), match="rank 1") as e:
        MCoreTensorAwareStateDict.from_state_dict(bad, algo="fully_parallel")
    seen.append(str(e.value))
    # a hollow object on rank 1: every rank raises instead of waiting for it
    popped = sd.pop_tensors() if rank == 1 else None
    with pytest.raises((ValueError, CheckpointingException), match="hollow"):
        sd.to_state_dict(sharded_sd(rank, world, 1, 0, fill=0.0), algo="fully_parallel")
    if popped is not None:
        sd.insert_tensors(popped)
    # the groups still work: a matching load succeeds
    same(sd.to_state_dict(sharded_sd(rank, world, 1, 0, fill=0.0), algo="fully_parallel"), expected(rank, world, 1, 1))
    return seen


def test_mismatch_on_one_rank_raises_on_every_rank_naming_key_and_rank(ranks):
    for rank, (missing, shape, bad_save) in enumerate(ranks(mismatch_everywhere, 2)):
        assert "decoder.final_norm.weight" in missing
        assert ("(8, 4)" in shape) if rank == 0 else ("rank(s) [0]" in shape and "embedding" in shape)
        assert NORM in bad_save


def gpt_round_trip(rank, world, root):
    """A real megatron-core GPTModel (local layer spec, CPU): its own sharded_state_dict saved fully
    parallel on the DP group, restored into a freshly initialized model."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    group = mpu.get_data_parallel_group(with_context_parallel=True)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)

    def model(seed):
        torch.manual_seed(seed)
        return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                        max_sequence_length=16)
    trained = model(0)
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(trained.sharded_state_dict(), algo="fully_parallel",
                                                      parallelization_group=group)
    LocalCheckpointManager(root, "gpt").save(sd, 1)
    fresh = model(1)
    assert not torch.equal(fresh.state_dict()["embedding.word_embeddings.weight"],
                           trained.state_dict()["embedding.word_embeddings.weight"])
    loaded, _ = LocalCheckpointManager(root, "gpt").load()
    fresh.load_state_dict(loaded.to_state_dict(fresh.sharded_state_dict(), algo="fully_parallel",
                                               parallelization_group=group))
    want, got = trained.state_dict(), fresh.state_dict()
    mpu.destroy_model_parallel()
    same({k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
         {k: v for k, v in want.items() if isinstance(v, torch.Tensor)})
    return len(sd.state_dict["shards"])


def test_megatron_gpt_model_round_trip_fully_parallel(ranks, tmp_path):
    kept = ranks(gpt_round_trip, 2, tmp_path)
    assert all(k > 0 for k in kept)  # both DP ranks keep a share of the model
