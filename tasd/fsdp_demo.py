"""``tasd demo --backend fsdp``: an FSDP2 model trained on CPU ranks saves local checkpoints with
``tasd.adapters.fsdp.FSDPCheckpointer``, loses a node, restarts and resumes bit-exactly.

Each rank is a process (``tasd.launch.run_ranks``, gloo); ``<root>/demo/<rank>`` stands for that
node's local disk. The model (:func:`build_model`) is a small MLP with every Linear and the root
``fully_shard``'ed on a 1-D CPU device mesh, trained with Adam and a StepLR scheduler on a stream
of synthetic batches (:class:`SyntheticBatches`, a stand-in for a stateful data loader: its
position is part of the checkpoint's extra state, with the scheduler's).

1. :func:`train_phase`: train ``steps + LOST_STEPS`` steps, ``ckpt.finalize()`` once per step and
   ``ckpt.save(step, extra_state=...)`` every ``save_every`` steps (asynchronously by default); the
   last ``LOST_STEPS`` steps are lost in the "crash". Each rank returns its losses, its save
   figures and a snapshot (local shards, optimizer state, scheduler and data position) taken when
   the last checkpoint was saved.
2. One rank's directory is deleted (its node is lost).
3. :func:`restart_phase`: fresh processes build the model from another seed (nothing matches
   unless the checkpoint restores it), ``ckpt.load(extra_state=...)`` restores model, optimizer,
   scheduler and data position (the lost rank's part comes from a peer's replica), the state is
   checked bitwise against the snapshot, and the lost steps are trained again: their losses must
   equal the uninterrupted run's (same world, same data, gloo: deterministic on CPU).

:func:`build_model`, :class:`SyntheticBatches` and :func:`train_step` are also what
``examples/fsdp_train.py`` (the torchrun script) trains. :func:`run_fsdp_demo` prints the report
with rich.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tasd.demo import _mean, _mismatches, print_rank_failures
from tasd.launch import RankFailure, run_ranks

logger = logging.getLogger(__name__)

SESSION = "demo"
LOST_STEPS = 2  # steps trained after the last checkpoint, lost in the "crash"
SAVE_MODES = ("async-persistent", "async-temporal", "sync")
#: Layer sizes of the model: Linear(16, 64), Linear(64, 64), Linear(64, 4).
SIZES = (16, 64, 64, 4)
BATCH = 8
#: Modules the fork server that starts the ranks imports once.
PRELOAD = ("torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "tasd.fsdp", "tasd.adapters.fsdp")


# -- what the example trains ------------------------------------------------------------------------
def build_model(mesh: Any, seed: int = 0, lr: float = 0.01) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """(model, optimizer, scheduler): an MLP of :data:`SIZES` (Tanh between layers), initialized
    from ``seed`` (the same on every rank), every Linear and the root ``fully_shard``'ed on
    ``mesh``; Adam and ``StepLR(step_size=4, gamma=0.7)``. Local (``fully_shard`` on a CPU mesh
    communicates nothing)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    return model, optimizer, scheduler


class SyntheticBatches:
    """An endless stream of ``(x, y)`` batches for one rank, standing in for a stateful data
    loader: batch ``i`` of rank ``r`` is drawn from a generator seeded by ``(seed, r, i)`` and
    ``y`` is a fixed smooth function of ``x``, so the stream depends on its position only.
    ``state_dict()`` / ``load_state_dict()`` save and restore the position (what a resume needs
    so as not to see the same data twice)."""

    def __init__(self, rank: int, seed: int = 0, batch: int = BATCH):
        self.rank, self.seed, self.batch = rank, seed, batch
        self.position = 0
        g = torch.Generator().manual_seed(seed)
        self._target = torch.randn(SIZES[0], SIZES[-1], generator=g) / SIZES[0] ** 0.5

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.position)
        self.position += 1
        x = torch.randn(self.batch, SIZES[0], generator=g)
        return x, torch.sin(3 * x @ self._target)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(f"data state of seed {state['seed']} rank {state['rank']} loaded into the stream of "
                             f"seed {self.seed} rank {self.rank}")
        self.position = int(state["position"])


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """One step (FSDP2 gathers parameters and reduce-scatters gradients: collective); returns this
    rank's loss."""
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             data: SyntheticBatches) -> dict:
    """A picklable copy of what a checkpoint restores: every DTensor of the model's and the
    optimizer's sharded state dicts as a clone of its local shard, the scheduler's and the data
    stream's state. Local."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    def plain(x: Any) -> Any:
        if isinstance(x, DTensor):
            return x.to_local().detach().clone()
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(plain(v) for v in x)
        return x

    msd, osd = get_state_dict(model, optimizer)
    return plain({"model": msd, "optim": osd, "scheduler": scheduler.state_dict(), "data": data.state_dict()})


# -- the demo's phases (run on every rank) ---------------------------------------------------------------
def _checkpointer(model: Any, optimizer: Any, root: str, replication: dict | None, save_mode: str) -> Any:
    from tasd.adapters.fsdp import FSDPCheckpointer
    from tasd.managers import ReplicationConfig

    return FSDPCheckpointer(model, optimizer, root, None if replication is None else ReplicationConfig(**replication),
                            async_save=save_mode != "sync", session_id=SESSION,
                            persistent_worker=save_mode == "async-persistent")


def _mesh(world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))


def train_phase(rank: int, world_size: int, root: str, steps: int, save_every: int, replication: dict | None,
                save_mode: str) -> dict:
    """Phase 1 on one rank: train ``steps + LOST_STEPS`` steps, saving every ``save_every``."""
    torch.set_num_threads(1)
    model, optimizer, scheduler = build_model(_mesh(world_size))
    data = SyntheticBatches(rank)
    losses: dict[int, float] = {}
    saves: list[dict] = []
    stalls: dict[int, float] = {}
    at_ckpt = None

    def record(published: list) -> None:
        saves.extend({"iteration": s.iteration, "stall_s": stalls.get(s.iteration, s.stall_s),
                      "total_s": s.total_s, "file_bytes": s.file_bytes} for s in published)

    with _checkpointer(model, optimizer, root, replication, save_mode) as ckpt:
        # Wait until the async worker has started, as a job's setup would (here saves come milliseconds
        # apart, in a real job minutes: a save waits for the previous one to be published).
        ckpt.finalize(blocking=True)
        for step in range(1, steps + LOST_STEPS + 1):
            record(ckpt.finalize())  # once per step: publishes saves that finished
            losses[step] = train_step(model, optimizer, scheduler, next(data))
            if step <= steps and step % save_every == 0:
                t0 = time.perf_counter()
                ckpt.save(step, extra_state={"scheduler": scheduler, "data": data})
                stalls[step] = time.perf_counter() - t0  # what training waited for
                at_ckpt = (step, snapshot(model, optimizer, scheduler, data))
        record(ckpt.finalize(blocking=True))
    return {"rank": rank, "losses": losses, "saves": saves, "at_ckpt": at_ckpt}


def restart_phase(rank: int, world_size: int, root: str, expected: list[dict], replication: dict | None,
                  save_mode: str) -> dict:
    """Phase 2 on one rank, in a fresh process: load, check bitwise, redo the lost steps."""
    torch.set_num_threads(1)
    model, optimizer, scheduler = build_model(_mesh(world_size), seed=1)  # another init: the load must overwrite it
    data = SyntheticBatches(rank)
    want_it, want = expected[rank]["at_ckpt"]
    uninterrupted = expected[rank]["losses"]
    problems: list[str] = []
    with _checkpointer(model, optimizer, root, replication, save_mode) as ckpt:
        from_peer = not ckpt.manager.local_ckpt_dir.exists()
        t0 = time.perf_counter()
        start = ckpt.load(extra_state={"scheduler": scheduler, "data": data})
        load_s = time.perf_counter() - t0
        if start != want_it:
            problems.append(f"load restored iteration {start}, the last checkpoint is {want_it}")
        problems += [f"restored {p} differs from the saved one"
                     for p in _mismatches(snapshot(model, optimizer, scheduler, data), want)]
        resumed = {step: train_step(model, optimizer, scheduler, next(data))
                   for step in range(start + 1, max(uninterrupted) + 1)}
    problems += [f"step {s}: resumed loss {resumed[s]!r} differs from the uninterrupted run's {uninterrupted[s]!r}"
                 for s in resumed if resumed[s] != uninterrupted.get(s)]
    return {"rank": rank, "found": start, "load_s": load_s, "from_peer": from_peer, "losses": resumed,
            "verified": not problems, "problems": problems}


# -- the report ------------------------------------------------------------------------------------------
@dataclass
class FSDPDemoResult:
    """What :func:`run_fsdp_demo` found: phase results by rank (empty when a phase did not run)."""

    ok: bool = False
    trained: list[dict] = field(default_factory=list)
    restarted: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def _train_table(results: list[dict], save_mode: str) -> Table:
    t = Table(title=f"phase 1: train and save ({save_mode})")
    for col in ("rank", "saved iterations", "bytes/ckpt (own + replicas)", "training stall s (each save)",
                "save total s (mean)"):
        t.add_column(col, justify="left" if col == "saved iterations" else "right")
    for r in results:
        s = r["saves"]
        t.add_row(str(r["rank"]), ", ".join(str(x["iteration"]) for x in s) or "-",
                  f"{s[-1]['file_bytes']:,}" if s else "-", ", ".join(f"{x['stall_s']:.4f}" for x in s) or "-",
                  f"{_mean([x['total_s'] for x in s]):.4f}")
    return t


def _restart_table(results: list[dict]) -> Table:
    t = Table(title="phase 2: restart, load and resume")
    for col in ("rank", "restored iteration", "load s", "part came from", "verified"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["rank"]), str(r["found"]), f"{r['load_s']:.3f}",
                  "[yellow]a peer[/]" if r["from_peer"] else "local disk",
                  "[green]yes[/]" if r["verified"] else "[red]NO[/]")
    return t


def _loss_table(trained: list[dict], restarted: list[dict]) -> Table:
    t = Table(title="losses of the redone steps (rank 0)")
    for col in ("step", "uninterrupted run", "resumed run", "equal"):
        t.add_column(col, justify="right")
    first, again = trained[0]["losses"], restarted[0]["losses"]
    for step, loss in again.items():
        t.add_row(str(step), f"{first[step]:.9f}", f"{loss:.9f}",
                  "[green]bitwise[/]" if loss == first[step] else "[red]NO[/]")
    return t


def run_fsdp_demo(ranks: int = 2, steps: int = 8, save_every: int = 4, directory: str | None = None,
                  keep: bool = False, replication: dict | None = None, lose_rank: int | None = -1,
                  save_mode: str = "async-persistent", console: Console | None = None) -> FSDPDemoResult:
    """Run the phases and print the report (module docstring). ``replication``: a
    ReplicationConfig's fields as a dict (None: no replication; a lost node then cannot be
    recovered). ``lose_rank``: the rank whose directory is deleted before the restart (-1: the
    last rank when replicating, None: none). Checkpoints are removed afterwards unless ``keep``
    or the run failed. Never raises for a failed run: the result says what happened."""
    console = console or Console()
    result = FSDPDemoResult()

    def refuse(message: str) -> FSDPDemoResult:
        console.print(f"[red]{message}[/]")
        result.error = message
        return result

    if save_mode not in SAVE_MODES:
        return refuse(f"save mode must be one of {', '.join(SAVE_MODES)}, got {save_mode!r}")
    if ranks < 1 or save_every < 1 or steps < save_every:
        return refuse("demo needs ranks >= 1 and steps >= save-every >= 1")
    if lose_rank == -1:
        lose_rank = ranks - 1 if replication is not None else None
    try:
        if replication is not None:
            from tasd.managers import ReplicationConfig
            ReplicationConfig(**replication).check_world_size(ranks)
        if lose_rank is not None and not 0 <= lose_rank < ranks:
            raise ValueError(f"--lose-rank {lose_rank} is not a rank of {ranks}")
    except ValueError as e:
        return refuse(str(e))
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="tasd-fsdp-demo-"))
    session_dir = root / SESSION
    if session_dir.exists() and any(session_dir.iterdir()):
        return refuse(f"{session_dir} already holds files: remove it or choose another --dir")
    described = ("none" if replication is None else
                 f"{replication.get('strategy', 'ring')}, factor {replication.get('replication_factor', 2)}, "
                 f"jump {replication.get('replication_jump', 1)}")
    console.print(f"tasd demo --backend fsdp: {ranks} ranks (FSDP2 fully_shard on a CPU mesh, gloo), {steps} steps "
                  f"(+{LOST_STEPS} lost), checkpoint every {save_every} steps ({save_mode} saves) with "
                  f"tasd.adapters.fsdp.FSDPCheckpointer, replication: {described}, in {session_dir}")
    try:
        t0 = time.perf_counter()
        result.trained = run_ranks(train_phase, ranks, str(root), steps, save_every, replication, save_mode,
                                   preload=PRELOAD, timeout_s=120, collective_timeout_s=30)
        console.print(_train_table(result.trained, save_mode))
        last = result.trained[0]["at_ckpt"][0]
        console.print(f"phase 1 took {time.perf_counter() - t0:.1f}s; the job now \"crashes\": steps after "
                      f"iteration {last} are lost")
        if lose_rank is not None:
            shutil.rmtree(session_dir / str(lose_rank))
            console.print(f"[yellow]node of rank {lose_rank} lost[/]: deleted its local disk "
                          f"{session_dir / str(lose_rank)}")
        t0 = time.perf_counter()
        result.restarted = run_ranks(restart_phase, ranks, str(root), result.trained, replication, save_mode,
                                     preload=PRELOAD, timeout_s=120, collective_timeout_s=30)
        console.print(_restart_table(result.restarted))
        console.print(_loss_table(result.trained, result.restarted))
        console.print(f"phase 2 took {time.perf_counter() - t0:.1f}s")
        for r in result.restarted:
            for p in r["problems"]:
                console.print(f"[red]rank {r['rank']}: {p}[/]")
        result.ok = all(r["verified"] for r in result.restarted)
        if result.ok:
            lost = f" (rank {lose_rank}'s part recovered from a peer)" if lose_rank is not None else ""
            console.print(f"[bold green]demo OK[/]: restored iteration {result.restarted[0]['found']} on {ranks} "
                          f"rank{'s' if ranks > 1 else ''}{lost}; parameters, optimizer state, LR scheduler and "
                          "data position equal to the saved ones bitwise; the resumed losses equal the "
                          "uninterrupted run's")
        else:
            result.error = "the restored or resumed state differs"
            console.print("[bold red]demo FAILED[/]: the restored or resumed state differs (see above)")
    except RankFailure as e:
        result.error = f"ranks {sorted(e.failures)} failed"
        console.print(f"[bold red]demo FAILED[/]: ranks {sorted(e.failures)} failed")
        print_rank_failures(console, e)
    finally:
        if result.ok and not keep:
            shutil.rmtree(session_dir if directory else root, ignore_errors=True)
        else:
            console.print(f"checkpoints kept in {session_dir}")
    return result
