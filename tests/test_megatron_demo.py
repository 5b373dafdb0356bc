"""``tasd demo --backend megatron`` (tasd.megatron_demo) and examples/megatron_local_ckpt.py: a
megatron-core GPT with the distributed optimizer on CPU ranks saves local checkpoints through the
Megatron-LM adapter, loses a node, restarts and resumes bit-exactly."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("megatron.core")

from tasd.megatron_demo import run_megatron_demo, state_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "megatron_local_ckpt.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_demo(tmp_path: Path, **kw):
    out = io.StringIO()
    result = run_megatron_demo(directory=str(tmp_path), keep=True, console=Console(file=out, width=250), **kw)
    return result, " ".join(out.getvalue().split())


def check_restart(result, lost_rank: int, iteration: int) -> None:
    """What every demo run must show, checked here from the ranks' raw results."""
    assert result.ok, result.error
    assert result.lost_rank == lost_rank
    for trained, restarted in zip(result.trained, result.restarted):
        rank = restarted["rank"]
        assert [s["iteration"] for s in trained["saves"]][-1] == iteration
        assert restarted["found"] == iteration and restarted["problems"] == []
        # bit-exact restore: the restored model, optimizer and RNG states hash like phase 1's at the checkpoint
        assert restarted["restored_digest"] == state_digest(trained["at_ckpt"])
        assert restarted["resumed_digest"] == state_digest(trained["final"])
        assert restarted["restored_digest"] != restarted["resumed_digest"]
        # the redone steps' losses are the uninterrupted run's, bit for bit
        redone = sorted(restarted["losses"])
        assert redone == list(range(iteration + 1, trained["final"]["iteration"] + 1)) and redone
        assert restarted["losses"] == {s: trained["losses"][s] for s in redone}
        # the lost rank's part came from a peer; the others read their own; Megatron's second load read nothing
        assert restarted["from_peer"] == (rank == lost_rank)
        assert (restarted["first_opened"] == 0) == (rank == lost_rank)
        assert restarted["second_opened"] == 0


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """World 2, TP 1 (data parallel 2): synchronous saves, atomic, ring replication, rank 0's node lost."""
    root = tmp_path_factory.mktemp("world2")
    return root, *run_demo(root, ranks=2, tp=1, steps=4, save_every=2, save_mode="sync", algo="atomic",
                           replication="ring", lose_rank=0)


def test_world2_tp1_sync_atomic_ring(world2):
    root, result, text = world2
    check_restart(result, lost_rank=0, iteration=4)
    assert "tensor parallel 1, data parallel 2" in text and "(sync saves, atomic)" in text
    assert "--replication-strategy ring" in text and "--non-persistent-local-ckpt-algo atomic" in text
    assert "node of rank 0 lost" in text and "demo OK: restored iteration 4 on 2 ranks (rank 0's part" in text
    assert "Megatron's second load opened no file" in text
    assert not (root / "demo" / "0").exists() and sorted(p.name for p in (root / "demo" / "1").iterdir()) == [
        "iter_0000004_0_local.tasd", "iter_0000004_1_local.tasd"]


def test_world4_tp2_async_on_megatron_cores_persistent_worker(tmp_path):
    result, text = run_demo(tmp_path, ranks=4, tp=2, steps=2, save_every=2,
                            extra_args=["--hidden-size", "32", "--num-attention-heads", "2"])
    check_restart(result, lost_rank=3, iteration=2)
    assert "tensor parallel 2, data parallel 2" in text and "(async-persistent saves, fully_parallel)" in text
    assert "replication: clique, factor 2, jump 1" in text
    for flag in ("--async-save", "--use-persistent-ckpt-worker", "--ckpt-assume-constant-structure",
                 "--non-persistent-ckpt-type local", "--replication-jump 1 --replication-factor 2"):
        assert flag in text
    assert "demo OK: restored iteration 2 on 4 ranks (rank 3's part recovered from a peer)" in text
    assert all(trained["saves"][0]["is_async"] for trained in result.trained)


def test_demo_refuses_bad_settings_before_starting_ranks(tmp_path):
    for kw, message in (({"ranks": 3, "tp": 2}, "must divide the number of ranks 3"),
                        ({"ranks": 2, "tp": 1, "save_mode": "async-temporal"}, "requires --use-persistent-ckpt-worker"),
                        ({"ranks": 2, "tp": 1, "lose_rank": 5}, "not a rank of 2"),
                        ({"ranks": 2, "tp": 1, "replication_factor": 3}, "world size 2")):
        result, text = run_demo(tmp_path, **kw)
        assert not result.ok and result.exit_code == 1 and message in text and message in result.error
        assert not result.trained


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasd", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_cli_backend_megatron():
    out = cli("--backend", "megatron", "--help")
    assert out.returncode == 0 and "--backend {basic,megatron,fsdp}" in out.stdout and "--tp" in out.stdout
    out = cli("--backend", "megatron", "--ranks", "3", "--tp", "2")
    assert out.returncode == 1 and "must divide the number of ranks 3" in " ".join(out.stdout.split())
    out = cli("--tp", "2")  # the basic backend has no tensor parallelism
    assert out.returncode == 2 and "--tp applies to --backend megatron only" in out.stderr


def run_example(root: Path, *flags: str) -> str:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir",
           str(root), "--non-persistent-save-interval", "2", "--replication", "--replication-jump", "1", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_example_script_with_torchrun_saves_and_resumes(tmp_path, world2):
    first = run_example(tmp_path, "--train-iters", "2", "--async-save", "--use-persistent-ckpt-worker",
                        "--ckpt-assume-constant-structure")
    assert "no local checkpoint: training from scratch" in first
    assert "saved local checkpoint of iteration 2 (async)" in first
    session = tmp_path / "megatron-example"
    assert sorted(p.name for p in (session / "0").iterdir()) == ["iter_0000002_0_local.tasd",
                                                                  "iter_0000002_1_local.tasd"]
    (session / "1" / "iter_0000002_1_local.tasd").unlink()  # rank 1 lost its own part; rank 0 holds a replica
    second = run_example(tmp_path, "--train-iters", "3")
    assert "resumed from the local checkpoint of iteration 2" in second
    assert "iteration 1:" not in second and "iteration 2:" not in second
    # The same model, data and seed as the demo's world-2 run: the resumed step's loss is that run's.
    uninterrupted = world2[1].trained[0]["losses"]
    assert float(re.search(r"iteration 3: loss (\S+)", second).group(1)) == pytest.approx(uninterrupted[3], abs=5e-7)


def test_example_script_needs_a_launcher(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLE), "--train-iters", "1"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "RANK"})
    assert out.returncode == 1 and "run under torchrun, or pass --nproc N" in out.stderr
