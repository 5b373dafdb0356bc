"""tasd.adapters.megatron and tasd.adapters.nvrx_compat: Megatron-LM's flags and rules, the manager
they build, Megatron-LM's save/load steps, NVRx import paths served by tasd, and tasd's requests on
megatron-core's own AsyncCallsQueue (forked and persistent workers, replication on).

Everything that changes ``sys.modules`` (the NVRx compatibility modules, megatron-core's queue
patched for CPU) runs in the rank processes of the ``ranks`` fixture: fresh processes, so nothing
leaks into this one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tasd import BasicTensorAwareStateDict
from tasd.adapters import megatron as adapter
from tasd.managers import LocalCheckpointManager
from tasd.managers.replication import LazyCliqueReplicationStrategy

#: Megatron-LM core_v0.16.1's flags, written down from megatron/training/training_config.py
#: (CheckpointConfig) and argument_utils.py (ArgumentGroupFactory): flag -> (dest, type, default,
#: choices, action). Kept independent of the adapter's own table on purpose.
MEGATRON_0_16_1 = {
    "--non-persistent-save-interval": ("non_persistent_save_interval", int, None, None, "store"),
    "--non-persistent-ckpt-type": ("non_persistent_ckpt_type", str, None, ("global", "local", "in_memory"), "store"),
    "--non-persistent-global-ckpt-dir": ("non_persistent_global_ckpt_dir", str, None, None, "store"),
    "--non-persistent-local-ckpt-dir": ("non_persistent_local_ckpt_dir", str, None, None, "store"),
    "--non-persistent-local-ckpt-algo": ("non_persistent_local_ckpt_algo", str, "fully_parallel",
                                         ("fully_parallel", "atomic"), "store"),
    "--async-save": ("async_save", None, False, None, "store_true"),
    "--use-persistent-ckpt-worker": ("use_persistent_ckpt_worker", None, False, None, "store_true"),
    "--ckpt-assume-constant-structure": ("ckpt_assume_constant_structure", None, False, None, "store_true"),
    "--replication": ("replication", None, False, None, "store_true"),
    "--replication-jump": ("replication_jump", int, None, None, "store"),
    "--replication-factor": ("replication_factor", int, 2, None, "store"),
}
ACTIONS = {"store": argparse._StoreAction, "store_true": argparse._StoreTrueAction}


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    return adapter.add_arguments(parser or argparse.ArgumentParser()).parse_args(argv)


def local_args(root, *extra: str) -> argparse.Namespace:
    return parse(["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", str(root), *extra])


# -- flags -----------------------------------------------------------------------------------------
def test_flags_have_megatrons_names_types_defaults_and_choices():
    parser = adapter.add_arguments(argparse.ArgumentParser())
    for flag, (dest, type_, default, choices, action) in MEGATRON_0_16_1.items():
        a = parser._option_string_actions[flag]
        assert (a.dest, a.type, a.default, a.choices) == (dest, type_, default, choices), flag
        assert type(a) is ACTIONS[action], flag
    extra = parser._option_string_actions["--replication-strategy"]
    assert (extra.dest, extra.default, tuple(extra.choices)) == ("replication_strategy", "clique", ("clique", "ring"))
    assert parser._option_string_actions["--local-ckpt-session-id"].default is None


def test_flags_parse_like_megatrons():
    args = parse([])
    assert args.non_persistent_ckpt_type is None and args.non_persistent_local_ckpt_algo == "fully_parallel"
    assert args.replication is False and args.replication_jump is None and args.replication_factor == 2
    assert args.async_save is False and args.use_persistent_ckpt_worker is False
    args = parse(["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", "/x", "--replication",
                  "--replication-jump", "8", "--replication-factor", "3", "--async-save",
                  "--use-persistent-ckpt-worker", "--ckpt-assume-constant-structure",
                  "--non-persistent-local-ckpt-algo", "atomic", "--non-persistent-save-interval", "50",
                  "--replication-strategy", "ring"])
    assert (args.replication_jump, args.replication_factor, args.non_persistent_save_interval) == (8, 3, 50)
    assert args.async_save and args.use_persistent_ckpt_worker and args.ckpt_assume_constant_structure
    assert (args.non_persistent_local_ckpt_algo, args.replication_strategy) == ("atomic", "ring")
    for bad in (["--non-persistent-ckpt-type", "disk"], ["--non-persistent-local-ckpt-algo", "any"],
                ["--replication-factor", "two"], ["--replication-strategy", "star"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_add_arguments_keeps_flags_the_parser_has_and_is_an_extra_args_provider():
    parser = argparse.ArgumentParser()
    parser.add_argument("--async-save", action="store_true", help="the caller's own")
    parser.add_argument("--replication-factor", type=int, default=3)
    assert adapter.add_arguments(parser) is parser  # Megatron-LM: extra_args_provider(parser) -> parser
    assert adapter.add_arguments(parser) is parser  # twice: nothing added again, no conflict
    assert parser._option_string_actions["--async-save"].help == "the caller's own"
    args = parser.parse_args(["--non-persistent-ckpt-type", "local"])
    assert args.replication_factor == 3 and args.non_persistent_ckpt_type == "local"
    assert args.replication_strategy == "clique"
    with pytest.raises(TypeError, match="ArgumentParser"):
        adapter.add_arguments(object())


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--non-persistent-ckpt-type", "in_memory"], "--non-persistent-ckpt-type"),
    (["--non-persistent-ckpt-type", "local"], "--non-persistent-local-ckpt-dir"),
    (["--replication", "--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", "/x"],
     "--replication-jump"),
    (["--replication", "--replication-jump", "1", "--non-persistent-ckpt-type", "global"],
     "--non-persistent-ckpt-type local"),
    (["--replication", "--replication-jump", "1"], "--non-persistent-ckpt-type local"),
    (["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", "/x", "--replication",
      "--replication-jump", "0"], "--replication-jump"),
    (["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", "/x", "--replication",
      "--replication-jump", "1", "--replication-factor", "0"], "--replication-factor"),
    (["--non-persistent-save-interval", "0"], "--non-persistent-save-interval"),
    (["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", "/x", "--local-ckpt-session-id",
      "a/b"], "--local-ckpt-session-id"),
])
def test_validate_args_errors_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        adapter.validate_args(parse(argv))


def test_validate_args_checks_the_placement_against_the_world_size():
    clique = local_args("/x", "--replication", "--replication-jump", "2", "--replication-factor", "2")
    with pytest.raises(ValueError, match="--replication-jump 2 and --replication-factor 2 does not fit world size 6"):
        adapter.validate_args(clique, world_size=6)
    adapter.validate_args(clique, world_size=8)
    ring = local_args("/x", "--replication", "--replication-jump", "2", "--replication-factor", "2",
                      "--replication-strategy", "ring")
    adapter.validate_args(ring, world_size=6)  # a ring fits where a clique does not
    ring.world_size = 2  # Megatron's args carry the world size
    with pytest.raises(ValueError, match="--replication-strategy ring"):
        adapter.validate_args(ring)


def test_validate_args_does_what_megatron_only_warns_about(caplog):
    args = parse(["--replication-jump", "4", "--async-save"])
    assert adapter.validate_args(args) is args
    assert args.replication_jump is None and args.async_save is False
    assert "--use-persistent-ckpt-worker" in caplog.text and "--replication-jump" in caplog.text
    kept = parse(["--async-save", "--use-persistent-ckpt-worker"])
    assert adapter.validate_args(kept).async_save is True
    legacy = parse(["--async-save"])
    legacy.ckpt_format = "torch"  # Megatron's rule applies to distributed checkpoint formats only
    assert adapter.validate_args(legacy).async_save is True
    with pytest.raises(ValueError, match="--async-save requires --use-persistent-ckpt-worker"):
        adapter.validate_args(parse(["--async-save"]), strict=True)
    with pytest.raises(ValueError, match="--replication-jump was given without --replication"):
        adapter.validate_args(parse(["--replication-jump", "4"]), strict=True)
    plain = argparse.Namespace()  # attributes missing: their flags' defaults
    assert adapter.validate_args(plain) is plain


# -- the manager -----------------------------------------------------------------------------------
def test_build_checkpoint_manager(tmp_path):
    assert adapter.build_checkpoint_manager(parse([])) is None
    assert adapter.build_checkpoint_manager(parse(["--non-persistent-ckpt-type", "global"])) is None
    with pytest.raises(ValueError, match="--non-persistent-local-ckpt-dir"):
        adapter.build_checkpoint_manager(parse(["--non-persistent-ckpt-type", "local"]))
    m = adapter.build_checkpoint_manager(local_args(tmp_path, "--local-ckpt-session-id", "run7"))
    assert isinstance(m, adapter.MegatronLocalCheckpointManager) and isinstance(m, LocalCheckpointManager)
    assert m.repl_strategy is None and m.local_ckpt_dir == tmp_path / "run7" / "0" and m.keep_loaded
    m = adapter.build_checkpoint_manager(local_args(tmp_path, "--replication", "--replication-jump", "1",
                                                    "--replication-factor", "1"), keep_loaded=False)
    assert type(m.repl_strategy) is LazyCliqueReplicationStrategy and not m.keep_loaded
    assert m.local_ckpt_dir == tmp_path / "0"
    with pytest.raises(ValueError, match="does not fit world size 1"):  # no torch.distributed: a world of one
        adapter.build_checkpoint_manager(local_args(tmp_path, "--replication", "--replication-jump", "1"))


def replicated_managers(rank, world, root):
    out = []
    for strategy in ("clique", "ring"):
        args = local_args(root, "--replication", "--replication-jump", "1", "--replication-strategy", strategy)
        m = adapter.build_checkpoint_manager(args)
        s = m.repl_strategy
        out.append((type(s).__name__, s.lazy, s.replication_jump, s.replication_factor, s.holders(rank, world)))
    return out


def test_build_checkpoint_manager_replication_strategies(ranks, tmp_path):
    for rank, got in enumerate(ranks(replicated_managers, 2, tmp_path)):
        assert got == [("LazyCliqueReplicationStrategy", True, 1, 2, [1 - rank]),
                       ("LazyRingReplicationStrategy", True, 1, 2, [1 - rank])]


# -- a resume loads twice; the second load reads nothing -------------------------------------------
BIG = 1 << 19  # float32 elements: 2 MiB, loaded into a mapping of its own (a view of it)


def rank_state(rank: int, iteration: int) -> dict:
    return {"big": torch.arange(BIG, dtype=torch.float32) + rank, "small": torch.arange(10.0) * (rank + 1),
            "ids": torch.arange(7) + 100 * rank, "iteration": iteration, "rank": rank}


def assert_state(sd: dict, rank: int, iteration: int) -> None:
    want = rank_state(rank, iteration)
    assert sd.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(sd[k], v) if torch.is_tensor(v) else sd[k] == v, k


def replicated_args(root):
    return local_args(root, "--replication", "--replication-jump", "1", "--replication-strategy", "ring")


def save_iteration(rank, world, root, iteration):
    m = adapter.build_checkpoint_manager(replicated_args(root))
    m.save(BasicTensorAwareStateDict(rank_state(rank, iteration)), iteration)


def count_io(root) -> dict:
    """Count, in this process from now on, files opened under ``root`` and replica exchanges of
    loads (tasd.managers.base_manager.exchange_parts calls)."""
    from tasd.managers import base_manager
    counts = {"opened": 0, "exchanges": 0}
    real_open, real_exchange = os.open, base_manager.exchange_parts

    def counting_open(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            counts["opened"] += 1
        return real_open(path, *args, **kwargs)

    def counting_exchange(*args, **kwargs):
        counts["exchanges"] += 1
        return real_exchange(*args, **kwargs)
    os.open = counting_open
    base_manager.exchange_parts = counting_exchange
    return counts


def resume_twice(rank, world, root, iteration):
    """Megatron-LM's resume: find_latest + load (reads the common part, drops the rest), then
    find_latest + load again (uses everything)."""
    counts = count_io(root)
    m = adapter.build_checkpoint_manager(replicated_args(root))
    assert m.find_latest() == iteration
    first, ckpt_id = m.load()
    assert_state(first.state_dict, rank, iteration)
    seen = dict(counts)
    pointers = {k: v.data_ptr() for k, v in first.state_dict.items() if torch.is_tensor(v)}
    del first  # what Megatron-LM does after reading the common part
    assert m.find_latest() == iteration
    second, again = m.load()
    assert again == ckpt_id == (iteration, rank, "")
    assert_state(second.state_dict, rank, iteration)
    second_io = {k: counts[k] - seen[k] for k in counts}
    handed_over = all(second.state_dict[k].data_ptr() == p for k, p in pointers.items())
    # A caller that keeps the first result gets an independent second one.
    m.find_latest()
    third, _ = m.load()  # the kept result was taken by the second load: this one reads
    third_io = {k: counts[k] - seen[k] - second_io[k] for k in counts}
    m.find_latest()
    fourth, _ = m.load()
    for t in third.state_dict.values():
        if torch.is_tensor(t):
            t.zero_()
    assert_state(fourth.state_dict, rank, iteration)
    # A caller that changes the first result in place makes the next load read again.
    m.find_latest()
    fifth, _ = m.load()
    fifth.state_dict["small"].add_(1)
    before = dict(counts)
    m.find_latest()
    sixth, _ = m.load()
    assert_state(sixth.state_dict, rank, iteration)
    changed_io = {k: counts[k] - before[k] for k in counts}
    return seen, second_io, handed_over, third_io, changed_io


@pytest.mark.parametrize("lose_rank_1", [False, True])
def test_the_second_load_of_a_resume_reads_no_file_and_moves_no_replica(ranks, tmp_path, lose_rank_1):
    ranks(save_iteration, 2, tmp_path, 4)
    if lose_rank_1:  # rank 1's node lost its disk: the first load fetches its part from rank 0
        shutil.rmtree(tmp_path / "1")
    for rank, (first, second, handed_over, third, changed) in enumerate(ranks(resume_twice, 2, tmp_path, 4)):
        reads = not (lose_rank_1 and rank == 1)  # a rank without files receives its part instead
        assert first["opened"] > 0 if reads else first["opened"] == 0
        assert first["exchanges"] == (1 if lose_rank_1 else 0)
        assert second == {"opened": 0, "exchanges": 0}, f"rank {rank}: the second load read or exchanged"
        assert handed_over, "a first result nobody holds any more is handed over, not copied"
        assert third["opened"] + third["exchanges"] > 0, "a third load reads again"
        assert changed["opened"] + changed["exchanges"] > 0, "a kept result changed in place is not reused"


def test_keep_loaded_in_one_process(tmp_path, monkeypatch):
    from tasd.managers import local_manager
    reads = []
    real = local_manager.read_part
    monkeypatch.setattr(local_manager, "read_part", lambda p: reads.append(p) or real(p))
    LocalCheckpointManager(tmp_path, "s").save(BasicTensorAwareStateDict(rank_state(0, 1)), 1)
    plain = LocalCheckpointManager(tmp_path, "s")  # the default keeps nothing: every load reads
    plain.load()
    plain.load()
    assert len(reads) == 2 and plain._last_load is None
    with pytest.raises(ValueError, match="keep_loaded"):
        LocalCheckpointManager(tmp_path, "s", keep_loaded=1)

    m = LocalCheckpointManager(tmp_path, "s", keep_loaded=True)
    first, _ = m.load()
    second, ckpt_id = m.load()  # not searched since: the same checkpoint
    assert len(reads) == 3 and ckpt_id == (1, 0, "s")
    first.state_dict["big"].zero_()  # the first result is still held: the second got copies
    assert_state(second.state_dict, 0, 1)
    m.load()  # the second load took the kept result: this one reads, and keeps its own
    assert len(reads) == 4 and m._last_load is not None
    m.save(BasicTensorAwareStateDict(rank_state(0, 2)), 2)  # a save lets the kept result go
    assert m._last_load is None
    m.load()
    assert len(reads) == 5
    assert m.find_latest() == 2 and m._last_load is not None  # the same checkpoint: still kept
    assert len(reads) == 5, "find_latest does not start reading a part the kept result holds"
    LocalCheckpointManager(tmp_path, "s").save(BasicTensorAwareStateDict(rank_state(0, 3)), 3)
    assert m.find_latest() == 3 and m._last_load is None  # another checkpoint chosen: let go


# -- NVRx import paths served by tasd ----------------------------------------------------------------
def nvrx_style_job(rank, world, root):
    """Code written against NVRx as Megatron-LM core_v0.16.1's training.py builds the manager."""
    assert adapter.install_nvrx_compat() is True
    assert adapter.install_nvrx_compat() is True  # idempotent
    from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import LocalCheckpointManager
    from nvidia_resiliency_ext.checkpointing.local.replication.group_utils import GroupWrapper, parse_group_sequence
    from nvidia_resiliency_ext.checkpointing.local.replication.strategies import CliqueReplicationStrategy
    from nvidia_resiliency_ext.checkpointing.local.base_state_dict import TensorAwareStateDict
    from nvidia_resiliency_ext.checkpointing.local.basic_state_dict import BasicTensorAwareStateDict as NVRxBasic
    from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.base_manager import CheckpointingException
    from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue, AsyncRequest
    import nvidia_resiliency_ext
    import tasd.managers
    import tasd.managers.async_ckpt

    assert not hasattr(nvidia_resiliency_ext, "__version__"), "no version is claimed"
    for missing in ("nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async",
                    "nvidia_resiliency_ext.checkpointing.local.replication.utils"):
        with pytest.raises(ModuleNotFoundError):
            __import__(missing)
    assert CheckpointingException is tasd.managers.CheckpointingException
    assert AsyncCallsQueue is tasd.managers.async_ckpt.AsyncCallsQueue
    assert AsyncRequest is tasd.managers.async_ckpt.AsyncRequest
    assert parse_group_sequence(1, 2, world) == [[0, 1]]
    group = GroupWrapper.wrap(None)
    assert (group.world_size, list(group.ranks), group.my_group_rank, group.my_global_rank) == (2, [0, 1], rank, rank)
    assert GroupWrapper.wrap(group) is group and group.all_gather_object(rank * 10) == [0, 10]
    data = torch.tensor([rank + 5])
    group.broadcast(data, src=1)
    assert data.item() == 6
    import torch.distributed as dist
    mine = GroupWrapper.from_list_of_groups([dist.new_group([0]), dist.new_group([1])])
    assert list(mine.ranks) == [rank] and mine.get_global_rank(0) == rank and mine.get_group_rank(rank) == 0

    repl_strategy = CliqueReplicationStrategy.from_replication_params(1, 2)  # as training.py does
    checkpointing_context = {"local_checkpoint_manager": LocalCheckpointManager(root, repl_strategy=repl_strategy)}
    manager = checkpointing_context["local_checkpoint_manager"]
    state = NVRxBasic({"w": torch.arange(4.0) + rank, "step": 9})
    assert isinstance(state, TensorAwareStateDict)  # every tasd state dict counts as NVRx's base
    queue = AsyncCallsQueue(persistent=False)
    queue.schedule_async_request(manager.save(state, 9, is_async=True))
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    return True


def nvrx_style_resume(rank, world, root):
    assert adapter.install_nvrx_compat()
    from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import LocalCheckpointManager
    from nvidia_resiliency_ext.checkpointing.local.replication.strategies import CliqueReplicationStrategy

    # megatron-core's own class, imported after the compatibility modules, subclasses NVRx's base
    # (tasd's ABC) and can be instantiated (its abstract members are all implemented).
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.tensor_aware_state_dict import HAVE_NVRX, MCoreTensorAwareStateDict
    import tasd
    assert HAVE_NVRX and issubclass(MCoreTensorAwareStateDict, tasd.TensorAwareStateDict)
    sharded = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(3.0), (0, rank, world))}
    mcore_sd, _ = MCoreTensorAwareStateDict.from_state_dict(sharded, algo="atomic")
    assert isinstance(mcore_sd, tasd.TensorAwareStateDict) and list(mcore_sd.tensors)[0].shape == (3,)

    manager = LocalCheckpointManager(root, repl_strategy=CliqueReplicationStrategy.from_replication_params(1, 2))
    latest = manager.find_latest()
    sd, ckpt_id = manager.load()
    return latest, ckpt_id, sd.state_dict["w"].tolist(), sd.state_dict["step"]


def test_code_written_against_nvrx_import_paths_runs_on_tasd(ranks, tmp_path):
    assert ranks(nvrx_style_job, 2, tmp_path) == [True, True]
    shutil.rmtree(tmp_path / "1")  # rank 1's node lost its disk: its part comes from rank 0's replica
    assert ranks(nvrx_style_resume, 2, tmp_path) == [(9, (9, 0, ""), [0.0, 1.0, 2.0, 3.0], 9),
                                                      (9, (9, 1, ""), [1.0, 2.0, 3.0, 4.0], 9)]


def compat_with_real_nvrx(rank, world, root):
    import importlib
    import sys
    fake = Path(root) / "site" / "nvidia_resiliency_ext"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.4.1'\n")
    sys.path.insert(0, str(fake.parent))
    importlib.invalidate_caches()
    installed = adapter.install_nvrx_compat()
    import nvidia_resiliency_ext
    registered = [n for n in sys.modules if n.startswith("nvidia_resiliency_ext.")]
    return installed, nvidia_resiliency_ext.__version__, registered


def compat_after_megatron_core(rank, world, root):
    import megatron.core.dist_checkpointing.tensor_aware_state_dict as m  # before the compat: no NVRx base
    assert not m.HAVE_NVRX
    with pytest.raises(RuntimeError, match="install_nvrx_compat"):
        adapter.install_nvrx_compat()
    from tasd.adapters import nvrx_compat
    return nvrx_compat.is_installed()


def test_compat_leaves_a_real_nvrx_alone_and_refuses_a_late_call(ranks, tmp_path):
    assert ranks(compat_with_real_nvrx, 1, tmp_path) == [(False, "0.4.1", [])]
    assert ranks(compat_after_megatron_core, 1, tmp_path) == [False]


# -- tasd's requests on megatron-core's AsyncCallsQueue ---------------------------------------------
def cpu_persistent_async_loop(*args, **kwargs):
    """megatron-core's persistent worker loop, on a machine without CUDA: its first statement,
    ``torch.cuda.set_device(rank % torch.cuda.device_count())``, needs a device. Runs in the
    spawned worker (this module is imported there by name)."""
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 1
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
    return PersistentAsyncCaller.async_loop(*args, **kwargs)


def megatron_core_queue_job(rank, world, root, persistent):
    from tasd.adapters import megatron_cpu
    megatron_cpu.enable()  # megatron-core's queue calls torch.cuda.current_device/synchronize
    from megatron.core.dist_checkpointing.strategies import async_utils
    if persistent:
        async_utils.PersistentAsyncCaller.async_loop = staticmethod(cpu_persistent_async_loop)
    args = adapter.validate_args(local_args(root, "--replication", "--replication-jump", "1", "--async-save",
                                            "--use-persistent-ckpt-worker"))
    manager = adapter.build_checkpoint_manager(args)
    queue = async_utils.AsyncCallsQueue(persistent=persistent)
    finalized, errors = [], []
    for iteration in (1, 2, 3):
        if iteration == 2 and rank == 1:  # this rank's writer will fail: a directory where it writes
            os.makedirs(manager.local_ckpt_dir / f"iter_{iteration:07d}_{rank}_local.tasd.pending.dirty")
        request = manager.save(BasicTensorAwareStateDict(rank_state(rank, iteration)), iteration,
                               is_async=bool(args.async_save))
        assert isinstance(request, async_utils.AsyncRequest), type(request)
        request.add_finalize_fn(lambda it=iteration: finalized.append(it))  # as Megatron-LM's save_checkpoint
        queue.schedule_async_request(request)
        try:
            queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        except Exception as e:
            errors.append((iteration, type(e).__name__, str(e)))
    queue.close()
    fresh = adapter.build_checkpoint_manager(args)
    latest = fresh.find_latest()
    sd, ckpt_id = fresh.load()
    assert_state(sd.state_dict, rank, 3)
    return finalized, errors, latest, ckpt_id


@pytest.mark.parametrize("persistent", [False, True], ids=["forked", "persistent"])
def test_tasd_requests_run_on_megatron_cores_queue(ranks, tmp_path, persistent):
    for rank, (finalized, errors, latest, ckpt_id) in enumerate(
            ranks(megatron_core_queue_job, 2, tmp_path, persistent, timeout_s=180)):
        assert finalized == [1, 3] and latest == 3 and ckpt_id == (3, rank, "")
        # rank 1's failed writer fails iteration 2 on every rank (never a hang of the worker loop),
        # with the writer's own error, reported from megatron-core's worker
        assert [(it, name) for it, name, _ in errors] == [(2, "CheckpointingException")]
        assert "rank 1" in errors[0][2] and "async writer of iteration 2 failed" in errors[0][2]
        assert "IsADirectoryError" in errors[0][2]


class Delayed:
    """An async_fn that sleeps ``seconds`` before running ``fn`` (a slow writer). Module-level:
    megatron-core's persistent worker unpickles it (this module is imported there by name)."""

    def __init__(self, fn, seconds):
        self.fn, self.seconds = fn, seconds

    def __call__(self, *args, **kwargs):
        import time
        time.sleep(self.seconds)
        return self.fn(*args, **kwargs)


def megatron_training_loop_job(rank, world, root, persistent):
    """Megatron-LM core_v0.16.1's calls around local async saves, on megatron-core's queue only:
    ``train()`` calls ``maybe_finalize_async_save(blocking=False)`` at the top of every iteration
    (it finalizes only calls finished on every rank); ``save_checkpoint`` starts the next save
    whether or not the last one is finalized (it prints "Starting a checkpoint save before previous
    has finished"), adds its finalize functions and schedules the request; the end of training
    finalizes blocking. Slow writers make every save start while the previous one is unfinalized;
    rank 1's writer of iteration 3 fails."""
    import time
    from tasd.adapters import megatron_cpu
    megatron_cpu.enable()
    from megatron.core.dist_checkpointing.strategies import async_utils
    if persistent:
        async_utils.PersistentAsyncCaller.async_loop = staticmethod(cpu_persistent_async_loop)
    args = adapter.validate_args(local_args(root, "--replication", "--replication-jump", "1", "--async-save",
                                            "--use-persistent-ckpt-worker"))
    manager = adapter.build_checkpoint_manager(args)
    published = []
    publish = manager._published
    manager._published = lambda it: (published.append(it), publish(it))[1]
    queue = async_utils.AsyncCallsQueue(persistent=persistent)
    unfinalized, finalized, errors = [], [], []
    for iteration in (1, 2, 3, 4):
        queue.maybe_finalize_async_calls(blocking=False, no_dist=False)  # top of train()'s loop
        unfinalized.append(queue.get_num_unfinalized_calls())  # save_checkpoint's is_empty_async_queue()
        if iteration == 3 and rank == 1:  # this rank's writer will fail: a directory where it writes
            os.makedirs(manager.local_ckpt_dir / f"iter_{iteration:07d}_{rank}_local.tasd.pending.dirty")
        try:
            request = manager.save(BasicTensorAwareStateDict(rank_state(rank, iteration)), iteration,
                                   is_async=True)
        except Exception as e:
            errors.append((iteration, type(e).__name__, str(e)))
            continue
        request = request._replace(async_fn=Delayed(request.async_fn, 1.0))  # keeps the handle
        request.add_finalize_fn(lambda it=iteration: finalized.append(it))  # Megatron-LM's iter_finalize_fn
        queue.schedule_async_request(request)
        time.sleep(0.05)
    try:
        queue.maybe_finalize_async_calls(blocking=True, no_dist=False)  # end of training
    except Exception as e:
        errors.append(("end", type(e).__name__, str(e)))
    queue.close()
    fresh = adapter.build_checkpoint_manager(args)
    latest = fresh.find_latest()
    sd, ckpt_id = fresh.load()
    assert_state(sd.state_dict, rank, 2)
    return unfinalized, published, finalized, errors, latest, ckpt_id


@pytest.mark.parametrize("persistent", [False, True], ids=["forked", "persistent"])
def test_a_save_started_before_megatron_finalized_the_last_one_publishes_it(ranks, tmp_path, persistent):
    """Megatron-LM 0.16.1 starts a save while megatron-core's queue still holds the last one: the
    last one is waited for (its writer reports from megatron-core's worker) and published, never
    dropped; a failed writer fails it on every rank, with the writer's error, and megatron-core's
    later finalize of it says it was not published instead of reporting a save."""
    for rank, (unfinalized, published, finalized, errors, latest, ckpt_id) in enumerate(
            ranks(megatron_training_loop_job, 2, tmp_path, persistent, timeout_s=180)):
        assert unfinalized[0] == 0 and all(n >= 1 for n in unfinalized[1:]), unfinalized
        assert published == [1, 2], "saves 1 and 2 were published, not dropped"
        assert finalized == [1, 2]
        (it, name, text), (end, end_name, end_text) = errors
        assert (it, name) == (4, "CheckpointingException") and "rank 1" in text and "IsADirectoryError" in text
        assert (end, end_name) == ("end", "CheckpointingException") and "iteration 3 was not published" in end_text
        assert latest == 2 and ckpt_id == (2, rank, "")


def tasd_queue_job(rank, world, root):
    from tasd.managers.async_ckpt import AsyncCallsQueue
    args = local_args(root, "--replication", "--replication-jump", "1")
    manager = adapter.build_checkpoint_manager(args)
    queue = AsyncCallsQueue(persistent=True)
    request = manager.save(BasicTensorAwareStateDict(rank_state(rank, 5)), 5, is_async=True)
    assert type(request).__name__ == "MegatronAsyncRequest" and request.handle is not None
    queue.schedule_async_request(request)
    scheduled_on = request.handle.queue  # tasd's queue told the save where its call runs
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    fresh = adapter.build_checkpoint_manager(args)
    sd, ckpt_id = fresh.load()
    assert_state(sd.state_dict, rank, 5)
    return scheduled_on is queue, ckpt_id


def test_megatron_requests_also_run_on_tasds_queue(ranks, tmp_path):
    assert ranks(tasd_queue_job, 2, tmp_path) == [(True, (5, 0, "")), (True, (5, 1, ""))]


def test_megatron_async_request_conversion():
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest as MCoreAsyncRequest
    from tasd.managers.async_ckpt import AsyncRequest

    handle = object()
    tasd_request = AsyncRequest(print, ("a", "b"), [], handle=handle)
    request = adapter.to_mcore_request(tasd_request)
    assert isinstance(request, MCoreAsyncRequest) and len(request._fields) == len(MCoreAsyncRequest._fields)
    assert request.handle is handle and adapter.to_mcore_request(request) is request
    frozen = request.freeze()
    assert frozen.is_frozen and frozen.handle is handle and frozen.finalize_fns is not request.finalize_fns
    assert frozen._replace(call_idx=3, finalize_fns=[]).handle is handle  # megatron-core's scheduling step
    copy = pickle.loads(pickle.dumps(frozen))  # what megatron-core's persistent worker receives
    assert type(copy) is type(request) and copy.handle is None and copy.async_fn_args == ("a", "b")
    assert copy.async_fn.fn is print  # its writer runs under a guard that logs instead of killing the loop
    assert copy.async_fn(object(), sep=object()) is None  # print raises TypeError: logged, not raised
    with pytest.raises(TypeError, match="tasd's AsyncRequest"):
        adapter.to_mcore_request(("not", "a", "request"))


# -- Megatron-LM's save and load steps on tasd.mcore ---------------------------------------------------
def _mcore_available() -> bool:
    try:
        import tasd.mcore  # noqa: F401
    except ImportError:
        return False
    return True


def sharded_state(rank, world, fill=None):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    shared = torch.arange(12.0) if fill is None else torch.full((12,), fill)
    own = torch.arange(6.0) + 10 * rank if fill is None else torch.full((6,), fill)
    return {
        # replicated on every data-parallel rank: fully_parallel saves it once
        "shared": ShardedTensor.from_rank_offsets("shared", shared, replica_id=rank),
        "own": ShardedTensor.from_rank_offsets("own", own, (0, rank, world)),
        "iteration": 7,
    }


def megatron_glue_job(rank, world, root):
    args = local_args(root, "--replication", "--replication-jump", "1", "--ckpt-assume-constant-structure")
    manager = adapter.build_checkpoint_manager(args)
    context = {}
    assert adapter.save_local_checkpoint(manager, sharded_state(rank, world), 6, args, context) is None
    cached = context[adapter.CONTEXT_CACHE_KEY]
    adapter.save_local_checkpoint(manager, sharded_state(rank, world), 7, args, context)
    counts = count_io(root)
    resumed = adapter.build_checkpoint_manager(args)
    common, ckpt_id = adapter.load_local_checkpoint(resumed, None, args)  # Megatron-LM's first load
    first = dict(counts)
    full, again = adapter.load_local_checkpoint(resumed, sharded_state(rank, world, fill=-1.0), args)
    second = {k: counts[k] - first[k] for k in counts}
    return (cached is not None, common["iteration"], ckpt_id == again == (7, rank, ""), full["shared"].tolist(),
            full["own"].tolist(), first["opened"] > 0, second)


@pytest.mark.skipif(not _mcore_available(), reason="tasd.mcore (the MCore backend) does not import yet")
def test_megatron_save_and_load_steps_with_the_mcore_backend(ranks, tmp_path):
    for rank, got in enumerate(ranks(megatron_glue_job, 2, tmp_path, timeout_s=180)):
        cached, iteration, same_id, shared, own, first_read, second = got
        assert cached and iteration == 7 and same_id and first_read
        assert shared == list(range(12)) and own == [10.0 * rank + i for i in range(6)]
        assert second == {"opened": 0, "exchanges": 0}


def routed_megatron_job(rank, world, root):
    assert adapter.install_nvrx_compat(route_mcore=True)
    from megatron.core.dist_checkpointing.tensor_aware_state_dict import MCoreTensorAwareStateDict
    import tasd.mcore
    assert MCoreTensorAwareStateDict is tasd.mcore.MCoreTensorAwareStateDict
    from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import LocalCheckpointManager
    from nvidia_resiliency_ext.checkpointing.local.replication.strategies import CliqueReplicationStrategy
    manager = LocalCheckpointManager(root, repl_strategy=CliqueReplicationStrategy.from_replication_params(1, 2))
    # Megatron-LM's save_checkpoint and _load_non_persistent_base_checkpoint, fully parallel on CPU
    ta, _ = MCoreTensorAwareStateDict.from_state_dict(sharded_state(rank, world), algo="fully_parallel")
    manager.save(ta, 7)
    assert manager.find_latest() == 7
    loaded, _ = manager.load()
    state = loaded.to_state_dict(sharded_state(rank, world, fill=-1.0), algo="fully_parallel")
    return state["shared"].tolist(), state["own"].tolist()


@pytest.mark.skipif(not _mcore_available(), reason="tasd.mcore (the MCore backend) does not import yet")
def test_route_mcore_gives_megatron_tasds_device_agnostic_class(ranks, tmp_path):
    for rank, (shared, own) in enumerate(ranks(routed_megatron_job, 2, tmp_path, timeout_s=180)):
        assert shared == list(range(12)) and own == [10.0 * rank + i for i in range(6)]
