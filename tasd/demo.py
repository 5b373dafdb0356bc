"""``tasd demo``: save local checkpoints on N CPU ranks, "crash", restart and resume bit-exactly.

Each rank is a process (``tasd.launch.run_ranks``, gloo) with a ``LocalCheckpointManager`` whose
directory ``<root>/demo/<rank>`` stands for that node's local disk.

1. ``train_phase``: every rank builds the same tiny model and trains it data-parallel with Adam on
   synthetic data drawn from a ``torch.Generator`` seeded by (step, rank). Every ``save_every``
   steps it saves model, optimizer, iteration and RNG state: asynchronously by default (``save``
   returns once the tensors are staged, the request runs on an AsyncCallsQueue while training
   goes on, and each step finalizes finished saves without blocking), or synchronously. Training
   goes on ``LOST_STEPS`` steps past the last save, work a real failure would lose. Each rank
   returns its save statistics (the training stall of each save and its total time) and snapshots
   of its state at the last checkpoint and at the final step.
2. ``restart_phase``: fresh processes and managers (nothing kept in memory) call ``find_latest``
   and ``load``, restore a freshly built model and optimizer, check them bitwise against the
   snapshot taken at the checkpoint, redo the lost steps and check the result bitwise against the
   final snapshot (same world size, same data, gloo: training is deterministic).

``run_demo`` runs both phases and prints a report with rich. Phases are separate functions so later
scenarios (losing a node's directory) slot in between them.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from tasd.basic import BasicTensorAwareStateDict
from tasd.launch import RankFailure, run_ranks
from tasd.managers import LocalCheckpointManager, ReplicationConfig
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest

SESSION = "demo"
SAVE_MODES = ("async-persistent", "async-temporal", "sync")
LOST_STEPS = 2  # steps trained after the last checkpoint, lost in the "crash"
_BATCH, _IN, _HIDDEN, _OUT = 16, 32, 64, 8


def print_rank_failures(console: Console, error: RankFailure) -> None:
    """Print each failed rank's report, identical tracebacks once (ranks grouped)."""
    by_report: dict[str, list[int]] = {}
    for rank, report in sorted(error.failures.items()):
        by_report.setdefault(report, []).append(rank)
    for report, failed in by_report.items():
        console.print(f"--- rank(s) {', '.join(map(str, failed))} ---\n{report}",
                      markup=False, highlight=False, soft_wrap=True)


def _build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model on every rank (fixed seed) and an Adam optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(_IN, _HIDDEN), torch.nn.ReLU(), torch.nn.Linear(_HIDDEN, _OUT))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    """One data-parallel step. Gradients are averaged with one all_reduce per parameter, in a fixed
    order, so that the run is bit-reproducible after a restart (DDP's buckets are laid out
    differently on its first iteration, which changes gloo's summation order)."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)  # data depends on (step, rank) only
    x, y = torch.randn(_BATCH, _IN, generator=g), torch.randn(_BATCH, _OUT, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())
    opt.step()


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "iteration": step, "rng": torch.get_rng_state().clone()}


def _mismatches(got: Any, want: Any, path: str = "") -> list[str]:
    """Paths where ``got`` differs from ``want``: tensors bitwise (dtype, shape, values), the rest by ==."""
    if isinstance(want, torch.Tensor):
        ok = (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
              and torch.equal(got, want))
        return [] if ok else [path or "<root>"]
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [path or "<root>"]
        return [m for k in want for m in _mismatches(got[k], want[k], f"{path}.{k}" if path else str(k))]
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return [path or "<root>"]
        return [m for i, (a, b) in enumerate(zip(got, want)) for m in _mismatches(a, b, f"{path}[{i}]")]
    return [] if got == want else [path or "<root>"]


def _manager(root: str, replication: dict | None) -> LocalCheckpointManager:
    strategy = None if replication is None else ReplicationConfig(**replication).build()
    return LocalCheckpointManager(root, session_id=SESSION, repl_strategy=strategy)


def train_phase(rank: int, world_size: int, root: str, steps: int, save_every: int,
                replication: dict | None, save_mode: str = "async-persistent") -> dict:
    """Phase 1 on one rank: train ``steps + LOST_STEPS`` steps, saving every ``save_every``
    (``save_mode``: one of SAVE_MODES)."""
    torch.set_num_threads(1)
    model, opt = _build()
    manager = _manager(root, replication)
    queue = None if save_mode == "sync" else AsyncCallsQueue(persistent=save_mode == "async-persistent")
    if queue is not None and queue.persistent:
        # Start the persistent worker while the job sets up (a real job's saves are minutes apart;
        # here they are milliseconds apart, and a second save waits for the first to finish).
        queue.schedule_async_request(AsyncRequest(None, (), []))
        queue.maybe_finalize_async_calls(blocking=True)
    saves, stalls, at_ckpt = [], {}, None

    def record() -> None:  # runs when a save is published
        stats = asdict(manager.last_save)
        stats.pop("extra", None)
        saves.append({**stats, "stall_s": stalls[stats["iteration"]]})

    for step in range(1, steps + LOST_STEPS + 1):
        _train_step(model, opt, step, rank)
        if queue is not None:
            queue.maybe_finalize_async_calls(blocking=False)
        if step <= steps and step % save_every == 0:
            sd = BasicTensorAwareStateDict({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "iteration": step, "rng": torch.get_rng_state()})
            t0 = time.perf_counter()
            request = manager.save(sd, iteration=step, is_async=queue is not None)
            if queue is not None:
                request.add_finalize_fn(record)
                queue.schedule_async_request(request)
            stalls[step] = time.perf_counter() - t0  # the time training waited for this save
            if queue is None:
                record()
            at_ckpt = _snapshot(model, opt, step)
    if queue is not None:
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    return {"rank": rank, "saves": saves, "at_ckpt": at_ckpt,
            "final": _snapshot(model, opt, steps + LOST_STEPS),
            "ckpt_dir": str(manager.local_ckpt_dir)}


def restart_phase(rank: int, world_size: int, root: str, expected: list[dict], replication: dict | None) -> dict:
    """Phase 2 on one rank: find, load (a rank whose node was lost gets its part from a peer),
    verify, redo the lost steps, verify again. ``expected`` is phase 1's result list (by rank)."""
    torch.set_num_threads(1)
    at_ckpt, final = expected[rank]["at_ckpt"], expected[rank]["final"]
    model, opt = _build()
    manager = _manager(root, replication)
    from_peer = not manager.local_ckpt_dir.exists()
    t0 = time.perf_counter()
    found = manager.find_latest()
    t1 = time.perf_counter()
    sd, ckpt_id = manager.load()
    t2 = time.perf_counter()
    state = sd.state_dict
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    problems = []
    want_it = at_ckpt["iteration"] if at_ckpt else -1
    if (found, ckpt_id[0], state["iteration"]) != (want_it,) * 3:
        problems.append(f"expected iteration {want_it}, find_latest gave {found}, load gave "
                        f"{ckpt_id[0]}, the state dict says {state['iteration']}")
    restored = _snapshot(model, opt, state["iteration"])
    problems += [f"restored {p} differs from the saved one" for p in _mismatches(restored, at_ckpt)]
    for step in range(state["iteration"] + 1, final["iteration"] + 1):
        _train_step(model, opt, step, rank)
    resumed = _snapshot(model, opt, final["iteration"])
    problems += [f"after resuming, {p} differs from phase 1" for p in _mismatches(resumed, final)]
    return {"rank": rank, "found": found, "find_s": t1 - t0, "load_s": t2 - t1, "from_peer": from_peer,
            "verified": not problems, "problems": problems}


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def _train_table(results: list[dict], save_mode: str) -> Table:
    t = Table(title=f"phase 1: train and save ({save_mode})")
    for col in ("rank", "saved iterations", "bytes/ckpt (own + replicas)", "training stall s (mean)",
                "stall s (max)", "save total s (mean)", "exchange s (mean)"):
        t.add_column(col, justify="left" if col == "saved iterations" else "right")
    for r in results:
        s = r["saves"]
        t.add_row(str(r["rank"]), ", ".join(str(x["iteration"]) for x in s) or "-",
                  f"{s[-1]['file_bytes']:,}" if s else "-",
                  f"{_mean([x['stall_s'] for x in s]):.4f}", f"{max([x['stall_s'] for x in s], default=0):.4f}",
                  f"{_mean([x['total_s'] for x in s]):.4f}", f"{_mean([x['exchange_s'] for x in s]):.4f}")
    return t


def _restart_table(results: list[dict]) -> Table:
    t = Table(title="phase 2: restart, load and resume")
    for col in ("rank", "found iteration", "find_latest s", "load s", "part came from", "verified"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["rank"]), str(r["found"]), f"{r['find_s']:.4f}", f"{r['load_s']:.4f}",
                  "[yellow]a peer[/]" if r["from_peer"] else "local disk",
                  "[green]yes[/]" if r["verified"] else "[red]NO[/]")
    return t


def run_demo(ranks: int = 4, steps: int = 12, save_every: int = 4, directory: str | None = None,
             keep: bool = False, replication: ReplicationConfig | None = ReplicationConfig(),
             lose_rank: int | None = -1, console: Console | None = None,
             save_mode: str = "async-persistent") -> int:
    """Run both phases and print the report; 0 on success, 1 on failure. Between the phases the
    node of ``lose_rank`` is lost (its directory deleted; -1: the last rank, None: no loss).
    ``save_mode``: one of SAVE_MODES.
    Checkpoints are removed afterwards unless ``keep`` or the run failed."""
    console = console or Console()
    if save_mode not in SAVE_MODES:
        console.print(f"[red]save mode must be one of {', '.join(SAVE_MODES)}, got {save_mode!r}[/]")
        return 1
    if ranks < 1 or save_every < 1 or steps < save_every:
        console.print("[red]demo needs ranks >= 1 and steps >= save-every >= 1[/]")
        return 1
    if lose_rank == -1:
        lose_rank = ranks - 1 if replication is not None else None
    try:
        if replication is not None:
            replication.check_world_size(ranks)
        if lose_rank is not None and not 0 <= lose_rank < ranks:
            raise ValueError(f"--lose-rank {lose_rank} is not a rank of {ranks}")
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        return 1
    settings = None if replication is None else replication.settings
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="tasd-demo-"))
    session_dir = root / SESSION
    if session_dir.exists() and any(session_dir.iterdir()):
        console.print(f"[red]{session_dir} already holds files: remove it or choose another --dir[/]")
        return 1
    console.print(f"tasd demo: {ranks} ranks (gloo, CPU), {steps} steps (+{LOST_STEPS} lost), "
                  f"checkpoint every {save_every} steps ({save_mode} saves), replication: "
                  f"{replication.describe() if replication else 'none'}, in {session_dir}")
    ok = False
    try:
        t0 = time.perf_counter()
        trained = run_ranks(train_phase, ranks, str(root), steps, save_every, settings, save_mode)
        console.print(_train_table(trained, save_mode))
        console.print(f"phase 1 took {time.perf_counter() - t0:.1f}s; the job now \"crashes\": "
                      f"steps after iteration {trained[0]['saves'][-1]['iteration']} are lost")
        if lose_rank is not None:
            shutil.rmtree(session_dir / str(lose_rank))
            console.print(f"[yellow]node of rank {lose_rank} lost[/]: deleted its local disk {session_dir / str(lose_rank)}")
        t0 = time.perf_counter()
        restarted = run_ranks(restart_phase, ranks, str(root), trained, settings)
        console.print(_restart_table(restarted))
        console.print(f"phase 2 took {time.perf_counter() - t0:.1f}s")
        for r in restarted:
            for p in r["problems"]:
                console.print(f"[red]rank {r['rank']}: {p}[/]")
        ok = all(r["verified"] for r in restarted)
        if ok:
            lost = f" (rank {lose_rank}'s part recovered from a peer)" if lose_rank is not None else ""
            console.print(f"[bold green]demo OK[/]: restored iteration {restarted[0]['found']} on {ranks} "
                          f"rank{'s' if ranks > 1 else ''}{lost}, model and optimizer equal to the saved ones, "
                          "resumed training matches")
        else:
            console.print("[bold red]demo FAILED[/]: the restored or resumed state differs (see above)")
    except RankFailure as e:
        console.print(f"[bold red]demo FAILED[/]: ranks {sorted(e.failures)} failed")
        print_rank_failures(console, e)
    finally:
        if ok and not keep:
            shutil.rmtree(session_dir if directory else root, ignore_errors=True)
        else:
            console.print(f"checkpoints kept in {session_dir}")
    return 0 if ok else 1
