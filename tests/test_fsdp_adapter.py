"""tasd.adapters.fsdp.FSDPCheckpointer driven as a training script drives it: FSDP2 models
(``fully_shard`` on a CPU device mesh) on real ranks joined by gloo, real files, fresh processes for
every restart. Multi-rank bodies are module-level functions run by ``ranks``.

The model, data stream and training step are the demo's (``tasd.fsdp_demo``): an MLP with Adam, a
StepLR scheduler and a stateful synthetic data stream, whose state a resume must restore too.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasd.adapters.fsdp import FSDPCheckpointer, WorldSizeMismatchError, model_mesh
from tasd.fsdp import MeshMismatchError
from tasd.fsdp_demo import PRELOAD, SyntheticBatches, build_model, snapshot, train_step
from tasd.managers import CheckpointingException, ReplicationConfig
from tests.test_basic_state_dict import assert_same

SESSION = "adapter"


def run(ranks, fn, world, *args):
    return ranks(fn, world, *args, preload=PRELOAD, timeout_s=90)


def setup(world: int, seed: int = 0, dim: str = "shard"):
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(dim,))
    return (mesh, *build_model(mesh, seed=seed))


def plain_copy(x):
    """A CPU clone of a tensor in plain data (the extra state holds torch's RNG state)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: plain_copy(v) for k, v in x.items()}
    return x


# -- 1. save, train further, restore in place; resume in fresh processes -------------------------------

def save_train_restore(rank, world, root):
    mesh, model, optim, sched = setup(world)
    data = SyntheticBatches(rank)
    params = list(model.parameters())
    with FSDPCheckpointer(model, optim, root, session_id=SESSION) as ckpt:  # async, persistent worker
        assert ckpt.mesh is mesh and ckpt.load(extra_state={"scheduler": sched}) == -1 and ckpt.extra_state is None
        for step in range(1, 4):
            ckpt.finalize()
            train_step(model, optim, sched, next(data))
        torch.manual_seed(100 + rank)
        extra = {"scheduler": sched, "data": data, "rng": torch.get_rng_state(), "note": f"rank {rank}"}
        ckpt.save(3, extra_state=extra)
        saved, saved_extra = snapshot(model, optim, sched, data), plain_copy(
            {"scheduler": sched.state_dict(), "data": data.state_dict(), "rng": torch.get_rng_state()})
        uninterrupted = [train_step(model, optim, sched, next(data)) for _ in range(3)]  # steps 4-6
        assert [s.iteration for s in ckpt.finalize(blocking=True)] == [3] and ckpt.last_published == 3
        assert snapshot(model, optim, sched, data)["data"]["position"] == 6

        # Restore in the same process: in place, every reference the script holds stays valid.
        assert ckpt.load(extra_state={"scheduler": sched, "data": data}) == 3 == ckpt.loaded_iteration
        assert all(a is b for a, b in zip(params, model.parameters())), "the model's own parameters"
        assert all(a is b for a, b in zip(params, optim.param_groups[0]["params"])) and sched.optimizer is optim
        assert_same(snapshot(model, optim, sched, data), saved)  # parameters, Adam state, scheduler, data
        assert ckpt.extra_state["note"] == f"rank {rank}"
        assert_same(ckpt.extra_state["rng"], saved_extra["rng"])
        assert ckpt.extra_state["scheduler"] == saved_extra["scheduler"] and ckpt.extra_state["data"] == {
            "position": 3, "seed": 0, "rank": rank}
        again = [train_step(model, optim, sched, next(data)) for _ in range(3)]
    assert again == uninterrupted, "training from the restored state repeats the same losses"
    return saved, uninterrupted


def resume_fresh(rank, world, root):
    mesh, model, optim, sched = setup(world, seed=7)  # another initialization: the load must overwrite it
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, session_id=SESSION, persistent_worker=False) as ckpt:
        start = ckpt.load(extra_state={"scheduler": sched, "data": data})
        restored = snapshot(model, optim, sched, data)
        losses = [train_step(model, optim, sched, next(data)) for _ in range(3)]
    return start, restored, losses


def test_save_train_restore_bitwise_and_resume_in_fresh_processes(ranks, tmp_path):
    saved = run(ranks, save_train_restore, 2, tmp_path)
    resumed = run(ranks, resume_fresh, 2, tmp_path)
    for rank, ((want, uninterrupted), (start, restored, losses)) in enumerate(zip(saved, resumed)):
        assert start == 3
        assert_same(restored, want)
        assert losses == uninterrupted, f"rank {rank}: resumed losses differ from the uninterrupted run's"
    assert saved[0][1] != saved[1][1], "ranks trained on different data"
    assert saved[0][0]["model"]["0.weight"].shape == (32, 16), "each rank saved its own shard"


# -- 2. replication: a lost node's part comes from a peer ---------------------------------------------

def save_replicated(rank, world, root):
    mesh, model, optim, sched = setup(world)
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, ReplicationConfig(strategy="ring"), async_save=False,
                          session_id=SESSION) as ckpt:
        for step in range(1, 5):
            train_step(model, optim, sched, next(data))
            if step % 2 == 0:
                ckpt.save(step, extra_state={"scheduler": sched, "data": data})
                assert [s.iteration for s in ckpt.finalize()] == [step], "a synchronous save is published at once"
        saved = snapshot(model, optim, sched, data)
        uninterrupted = [train_step(model, optim, sched, next(data)) for _ in range(2)]
    return saved, uninterrupted


def load_replicated(rank, world, root):
    mesh, model, optim, sched = setup(world, seed=3)
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, ReplicationConfig(strategy="ring"), session_id=SESSION) as ckpt:
        lost = not ckpt.manager.local_ckpt_dir.exists()
        start = ckpt.load(extra_state={"scheduler": sched, "data": data})
        restored = snapshot(model, optim, sched, data)
        losses = [train_step(model, optim, sched, next(data)) for _ in range(2)]
    return lost, start, restored, losses


def test_replication_recovers_a_lost_node(ranks, tmp_path):
    saved = run(ranks, save_replicated, 2, tmp_path)
    assert sorted(p.name for p in (tmp_path / SESSION / "1").iterdir()) == [
        "iter_0000004_0_local.tasd", "iter_0000004_1_local.tasd"], "rank 1 holds its own part and rank 0's"
    shutil.rmtree(tmp_path / SESSION / "0")  # rank 0's node and its local disk are gone
    loaded = run(ranks, load_replicated, 2, tmp_path)
    assert [r[0] for r in loaded] == [True, False]
    for (want, uninterrupted), (_, start, restored, losses) in zip(saved, loaded):
        assert start == 4
        assert_same(restored, want)
        assert losses == uninterrupted


# -- 3. async saves while training goes on; a save while the previous one is in flight ------------------

def async_while_training(rank, world, root):
    mesh, model, optim, sched = setup(world)
    data = SyntheticBatches(rank)
    published = []
    with FSDPCheckpointer(model, optim, root, ReplicationConfig(), session_id=SESSION,
                          persistent_worker=False) as ckpt:  # a process forked per save
        for step in range(1, 8):
            published += ckpt.finalize()
            train_step(model, optim, sched, next(data))
            if step in (4, 5):  # 5 starts right after 4: the manager publishes 4 first
                ckpt.save(step, extra_state={"data": data})
                at_save = snapshot(model, optim, sched, data)
        # Steps 6 and 7 changed parameters and Adam state in place while save 5 was written.
        assert_same(snapshot(model, optim, sched, data)["data"], {"position": 7, "seed": 0, "rank": rank})
        published += ckpt.finalize(blocking=True)
    files = sorted(p.name for p in (Path(root) / SESSION / str(rank)).iterdir())
    return [(s.iteration, s.is_async, s.stall_s <= s.total_s) for s in published], files, at_save


def load_latest(rank, world, root):
    mesh, model, optim, sched = setup(world, seed=5)
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, ReplicationConfig(), async_save=False, session_id=SESSION) as ckpt:
        start = ckpt.load(extra_state={"data": data})
        assert ckpt.extra_state == {"data": {"position": 5, "seed": 0, "rank": rank}}
        return start, snapshot(model, optim, sched, data)


def test_async_saves_while_training_goes_on(ranks, tmp_path):
    results = run(ranks, async_while_training, 2, tmp_path)
    for rank, (published, files, _) in enumerate(results):
        assert published == [(4, True, True), (5, True, True)], published
        assert files == ["iter_0000005_0_local.tasd", "iter_0000005_1_local.tasd"], "iteration 4 removed"
    loaded = run(ranks, load_latest, 2, tmp_path)
    for (_, _, at_save), (start, restored) in zip(results, loaded):
        assert start == 5
        restored["scheduler"], at_save["scheduler"] = None, None  # not in this checkpoint's extra state
        assert_same(restored, at_save)  # the state when save returned, not after steps 6 and 7


# -- 4. another world size or device mesh is refused on every rank -------------------------------------

def save_two(rank, world, root):
    mesh, model, optim, sched = setup(world)
    with FSDPCheckpointer(model, optim, root, async_save=False, session_id=SESSION) as ckpt:
        train_step(model, optim, sched, next(SyntheticBatches(rank)))
        ckpt.save(1)


def load_refused(rank, world, root, dim):
    mesh, model, optim, sched = setup(world, seed=9, dim=dim)
    before = snapshot(model, optim, sched, SyntheticBatches(rank))
    with FSDPCheckpointer(model, optim, root, async_save=False, session_id=SESSION) as ckpt:
        with pytest.raises(CheckpointingException) as e:
            ckpt.load()
        assert ckpt.loaded_iteration == -1 and ckpt.extra_state is None
    if isinstance(e.value, MeshMismatchError):
        assert_same(snapshot(model, optim, sched, SyntheticBatches(rank)), before)  # nothing was changed
    return type(e.value).__name__, str(e.value)


def test_another_world_size_or_mesh_is_refused_on_every_rank(ranks, tmp_path):
    run(ranks, save_two, 2, tmp_path)
    refused = run(ranks, load_refused, 3, tmp_path, "shard")
    for rank, (kind, msg) in enumerate(refused[:2]):
        assert kind == WorldSizeMismatchError.__name__, msg
        assert f"rank {rank}: {tmp_path / SESSION / str(rank)} holds checkpoints of session 'adapter'" in msg, msg
        assert "world size 2: iteration(s) [1]); this job has world size 3" in msg, msg
        assert "not resharded" in msg and "another session_id" in msg, msg
    kind, msg = refused[2]  # rank 2 has no directory: it is told which ranks failed, and why
    assert kind == "CheckpointingException" and "load failed on rank(s) [0, 1]" in msg, msg
    assert "WorldSizeMismatchError" in msg and "this job has world size 3" in msg, msg

    for rank, (kind, msg) in enumerate(run(ranks, load_refused, 2, tmp_path, "dp")):
        assert kind == "MeshMismatchError", msg
        assert f"rank {rank}: state dict entry 'model.0.weight' was saved on a device mesh of shape (2,) with " \
               "dimension names ('shard',)" in msg and "('dp',)" in msg and "dimension names differ" in msg, msg


# -- 5. the demo, as a user runs it ----------------------------------------------------------------------

def test_tasd_demo_backend_fsdp(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    tasd = Path(sys.executable).with_name("tasd")
    out = subprocess.run([str(tasd), "demo", "--backend", "fsdp", "--ranks", "2", "--steps", "4", "--save-every", "2",
                          "--dir", str(tmp_path), "--keep"], capture_output=True, text=True, timeout=120, env=env)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FSDPCheckpointer" in text and "replication: ring, factor 2, jump 1" in text
    assert "node of rank 1 lost" in text and "a peer" in text
    assert "losses of the redone steps" in text and text.count("bitwise") >= 2
    assert "demo OK: restored iteration 4 on 2 ranks (rank 1's part recovered from a peer)" in text
    assert not (tmp_path / "demo" / "1").exists()
    assert sorted(p.name for p in (tmp_path / "demo" / "0").iterdir()) == [
        "iter_0000004_0_local.tasd", "iter_0000004_1_local.tasd"]
    bad = subprocess.run([str(tasd), "demo", "--backend", "fsdp", "--tp", "2"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert bad.returncode == 2 and "--tp applies to --backend megatron only" in bad.stderr


# -- 6. in this process: a model without DTensors, arguments, misuse ------------------------------------

def test_plain_model_in_one_process_and_misuse(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    assert model_mesh(model) is None
    with pytest.raises(ValueError, match="full_state_dict"):
        FSDPCheckpointer(model, optim, tmp_path, state_dict_options=StateDictOptions(full_state_dict=True))
    with pytest.raises(TypeError, match="replication"):
        FSDPCheckpointer(model, optim, tmp_path, replication={"strategy": "ring"})
    with pytest.raises(TypeError, match="unknown LocalCheckpointManager option"):
        FSDPCheckpointer(model, optim, tmp_path, no_such_option=1)

    ckpt = FSDPCheckpointer(model, optim, tmp_path, async_save=False, session_id="one")
    assert ckpt.mesh is None and ckpt.load() == -1
    model(torch.ones(2, 4)).sum().backward()
    optim.step()
    sched.step()
    ckpt.save(1, extra_state={"scheduler": sched, "step": 1})
    want = copy.deepcopy(model.state_dict())
    momentum = optim.state[model.weight]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="iteration must be an int"):
        ckpt.save(-1)
    with pytest.raises(CheckpointingException, match="iterations must increase"):
        ckpt.save(1)
    with pytest.raises(TypeError, match="put a stateful object in a dict"):
        ckpt.save(2, extra_state=sched)
    with torch.no_grad():
        model.weight.add_(1.0)
    sched.step()
    with pytest.raises(TypeError, match="extra_state must be a dict"):
        ckpt.load(extra_state=[sched])
    with pytest.raises(CheckpointingException, match=r"has no extra state \['loader'\]"):
        ckpt.load(extra_state={"loader": SyntheticBatches(0)})
    assert ckpt.load(extra_state={"scheduler": sched}) == 1
    assert_same(model.state_dict(), want)
    assert torch.equal(optim.state[model.weight]["momentum_buffer"], momentum)
    assert sched.last_epoch == 1 and sched.get_last_lr() == [0.05] and ckpt.extra_state["step"] == 1
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ckpt.save(2)
    with pytest.raises(ValueError, match="closed"):
        ckpt.finalize()

    # A checkpoint of the model alone cannot restore an optimizer (and the other way round).
    with FSDPCheckpointer(model, None, tmp_path, async_save=False, session_id="one") as model_only:
        with pytest.raises(CheckpointingException, match="saved with optimizer state"):
            model_only.load()


# -- 7. HSDP: a 2-D mesh found from the model's parameters ---------------------------------------------

def restore_repeats_the_steps(ckpt, model, optim, sched, data) -> dict:
    """One step, save iteration 1, two more steps, load: the state equals the saved one and the
    next two steps repeat the losses of the two after the save. Returns the saved snapshot."""
    train_step(model, optim, sched, next(data))
    ckpt.save(1, extra_state={"scheduler": sched, "data": data})
    saved = snapshot(model, optim, sched, data)
    after = [train_step(model, optim, sched, next(data)) for _ in range(2)]
    assert ckpt.load(extra_state={"scheduler": sched, "data": data}) == 1
    assert_same(snapshot(model, optim, sched, data), saved)
    assert [train_step(model, optim, sched, next(data)) for _ in range(2)] == after
    return saved


def hsdp_round_trip(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, optim, sched = build_model(mesh)
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, ReplicationConfig(replication_jump=2), async_save=False,
                          session_id=SESSION) as ckpt:
        assert ckpt.mesh is mesh
        saved = restore_repeats_the_steps(ckpt, model, optim, sched, data)
    return saved["model"]["0.weight"].shape


def test_hsdp_mesh_from_the_model(ranks, tmp_path):
    shapes = run(ranks, hsdp_round_trip, 4, tmp_path)
    assert shapes == [(32, 16)] * 4, "sharded over 'shard' (2), replicated over 'replicate'"


# -- 8. FSDP1 given a device mesh ------------------------------------------------------------------------

def fsdp1_round_trip(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model = FullyShardedDataParallel(net, device_mesh=mesh, use_orig_params=True, device_id=torch.device("cpu"))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2)
    data = SyntheticBatches(rank)
    with FSDPCheckpointer(model, optim, root, async_save=False, session_id=SESSION) as ckpt:
        assert ckpt.mesh is mesh, "found on the FSDP1 module"
        restore_repeats_the_steps(ckpt, model, optim, sched, data)


def test_fsdp1_with_a_device_mesh(ranks, tmp_path):
    run(ranks, fsdp1_round_trip, 2, tmp_path)
